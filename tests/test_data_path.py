"""One data path: the plugin in the ``data`` role reads the records, once; task plugins check
them through ``plugtune_check_records`` without opening a file, so a stranger's reader
(tests/plugins/plugtune-tsv, pip-installed for real) gets ``causal_lm``'s checks and the
core's splitting for free, and each bad record is reported once. Packed batches tell the loop
their real tokens through the declared ``num_real_tokens`` entry."""
import pytest
import torch
from test_plugins_thirdparty import pip_install, plugtune

from plugtune import hookimpl, loop, testing
from plugtune.data import REAL_TOKENS


@pytest.fixture(scope="module")
def tsv_site(tmp_path_factory):
    return pip_install("plugtune-tsv", tmp_path_factory)


def tsv(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_strangers_reader_gets_the_tasks_record_check(tsv_site, make_recipe, tmp_path):
    """A line the reader turns into a record without a completion is refused by causal_lm at
    validate, once, naming its file and line; the reader itself checks nothing."""
    data = tsv(tmp_path / "pairs.tsv", ["Say hi\thi", "Say yo\tyo", "no tab here", "Ok?\tok"])
    result = plugtune("validate", make_recipe(plugins=["causal_lm", "full", "tsv"],
                                              data={"train": str(data), "validation": None}),
                      sites=[tsv_site])
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"plugtune: error: {result.args[-1]}: data.train: {data}:3: a causal_lm record needs "
        "\"text\", \"prompt\" and \"completion\", or \"messages\"; this one has ['prompt'] (map "
        "other column names with data.columns; data.format reads ShareGPT and Alpaca records)"]


def test_a_strangers_reader_gets_the_validation_split_and_columns(tsv_site, make_recipe,
                                                                  tmp_path, monkeypatch):
    """``read_splits`` holds out data.val_fraction (seeded) and maps data.columns for the
    reader, as the built-in reader does."""
    monkeypatch.syspath_prepend(str(tsv_site))
    data = tsv(tmp_path / "pairs.tsv", [f"Say {i}\t{i}" for i in range(20)])
    recipe, pm = testing.load_recipe(make_recipe(
        plugins=["causal_lm", "full", "tsv"], data={
            "train": str(data), "validation": None, "val_fraction": 0.25,
            "columns": {"prompt": "completion", "completion": "prompt"}}))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    train, validation = run.data["train"].records, run.data["validation"].records
    assert (len(train), len(validation)) == (15, 5)
    assert sorted(r.line for r in train + validation) == list(range(1, 21))
    assert all(r.data["completion"] == f"Say {r.line - 1}" for r in train)  # columns swapped


def validate(path):
    """``(exit status, stderr)`` of ``plugtune validate``."""
    result = plugtune("validate", path)
    return result.returncode, result.stderr


@pytest.mark.parametrize("line, problem", [
    ('{"text": null}', '"text" must be a string, got null'),
    ('{"text": "cut', "not valid JSON"),
])
def test_the_built_in_path_reports_each_bad_line_once(make_recipe, tmp_path, line, problem):
    """A bad line is named once, whoever finds it (the reader: not JSON; the task: not a
    string), also where the validation split is held out of the same file."""
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(['{"text": "one"}', line] + ['{"text": "more"}'] * 8) + "\n")
    status, err = validate(make_recipe(data={"train": str(path), "validation": None}))
    assert status == 2
    assert err.count(f"{path}:2:") == 1, err
    assert problem in err


class Keys:
    """Records the batch keys the task's loss is handed."""

    def __init__(self):
        self.seen = []

    @hookimpl(wrapper=True)
    def plugtune_compute_loss(self, batch):
        self.seen.append(set(batch))
        return (yield)


def test_packed_batches_declare_their_real_tokens(make_recipe):
    """The packed collator's ``num_real_tokens`` is what the loop counts for tokens_per_s (the
    examples' tokens, no filler), and the model never sees it."""
    keys = Keys()
    recipe, pm = testing.load_recipe(make_recipe(train={"packing": True, "max_length": 64}),
                                     extra_plugins=[keys])
    recipe.model.attn_implementation = "eager"  # rows of max_length, a filler segment or more
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    examples = run.data["train"].examples[:8]
    batch = run.data["train"].collate(examples)
    real = sum(len(e["input_ids"]) for e in examples)
    assert batch[REAL_TOKENS].item() == real < batch["input_ids"].numel()
    assert loop.real_tokens(batch).item() == real
    loop.loss_of(run, run.model, batch)
    assert keys.seen == [{"input_ids", "labels", "position_ids"}]


def test_the_old_tokens_key_still_counts_for_one_release():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert loop.real_tokens({"input_ids": ids, "_tokens": torch.tensor(7)}).item() == 7
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert loop.real_tokens({"input_ids": ids, "attention_mask": mask}).item() == 8
