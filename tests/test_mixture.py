"""Mixtures of training sources (``data.train`` entries with weights, ``data.mix``): each
source's share of an epoch, the exhaustion rules, the draw fixed by the seed, the manifest
recording each source's hash and weight, bad weights refused at validate in one line, and a
resumed mixture bit-identical to an uninterrupted one."""
import json
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from plugtune import cli, rundir, testing
from plugtune.data import Record, Tokenized
from plugtune.order import epoch_plan, epoch_seed, mixture


def tokenized(sizes):
    records = [Record({"text": "x"}, f"s{k}", i, source=k)
               for k, n in enumerate(sizes) for i in range(n)]
    return Tokenized([{"input_ids": [1, 2]} for _ in records], None, 0, records)


def recipe(mix, weights, n_sources):
    return SimpleNamespace(data=SimpleNamespace(mix=mix, weights=weights,
                                                train=["f"] * n_sources))


def drawn(mix, data, seed=0, epoch=0):
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return mix.draw(g)


def sources_of(order, data):
    return Counter(data.records[i].source for i in order)


def test_interleave_under_ends_where_the_first_source_runs_out():
    data = tokenized([100, 10])  # weights 1:1: b runs out first, a gives 10 of its 100
    mix = mixture(recipe("interleave_under", [1.0, 1.0], 2), data)
    assert mix.counts == [10, 10] and mix.size == 20
    order = drawn(mix, data)
    assert sources_of(order, data) == {0: 10, 1: 10}
    assert len(set(order)) == 20  # no repeats: a is undersampled
    other = drawn(mix, data, epoch=1)
    assert set(other) != set(order)  # another epoch sees another share of a
    assert drawn(mix, data) == order  # the same seed and epoch: the same draw
    assert drawn(mix, data, seed=1) != order


def test_interleave_over_repeats_until_every_source_is_seen_whole():
    data = tokenized([30, 5])  # weights 2:1: a needs 30, so b gives 15: each record 3 times
    mix = mixture(recipe("interleave_over", [2.0, 1.0], 2), data)
    assert mix.counts == [30, 15]
    order = drawn(mix, data)
    seen = Counter(order)
    assert all(seen[i] == 1 for i in range(30)) and all(seen[i] == 3 for i in range(30, 35))


def test_zero_weight_leaves_a_source_out_and_concat_is_the_old_order():
    data = tokenized([6, 6, 6])
    assert mixture(recipe("interleave_over", [1.0, 0.0, 3.0], 3), data).counts == [6, 0, 18]
    assert mixture(recipe("interleave_under", [1.0, 0.0, 3.0], 3), data).counts == [2, 0, 6]
    assert mixture(recipe("concat", None, 3), data) is None
    t = SimpleNamespace(seed=3, batch_size=2, grad_accum=1, group_by_length=False)
    plain = epoch_plan([2] * 18, t, 0, 0, 1)
    g = torch.Generator().manual_seed(epoch_seed(3, 0))
    assert [i for step in plain for m, _ in step for i in m] == \
        torch.randperm(18, generator=g).tolist()


@pytest.mark.parametrize("data, said", [
    ({"train": [{"path": "A", "weight": -1}, {"path": "B", "weight": 1}],
      "mix": "interleave_under"}, "data.weights: the weight of data.train[0] is -1, below 0"),
    ({"train": [{"path": "A", "weight": 0}, {"path": "B", "weight": 0}],
      "mix": "interleave_under"}, "data.weights: every weight is 0"),
    ({"train": [{"path": "A", "weight": "lots"}, "B"], "mix": "interleave_over"},
     "data.weights: the weight of data.train[0] is 'lots', not a number"),
    ({"train": ["A", "B"], "weights": [1, 2, 3], "mix": "interleave_over"},
     "data.weights: 3 weight(s) for 2 data.train source(s)"),
    ({"train": [{"path": "A", "weight": 2}, "B"]},
     "data.weights: data.mix: concat (the default) reads every record once"),
    ({"train": ["A", "B"], "mix": "interleave"}, "data.mix: Input should be 'concat'"),
    ({"train": [{"path": "A", "wieght": 2}, "B"], "mix": "interleave_over"},
     "data.train: unknown key 'wieght' in a {path: ...} entry (did you mean 'weight'?)"),
])
def test_bad_weights_are_one_line_at_validate(make_recipe, echo_data, capsys, data, said):
    files = {"A": str(echo_data[0]), "B": str(echo_data[1])}
    data["train"] = [files.get(s, s) if isinstance(s, str) else
                     {**s, "path": files[s["path"]]} for s in data["train"]]
    assert cli.main(["validate", str(make_recipe(data=data))]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err


def two_sources(tmp_path):
    """Two files of the echo task: four words (24 records) and the other four (4 records)."""
    from conftest import echo_records

    records = echo_records()
    a = testing.write_jsonl(tmp_path / "a.jsonl", records[:24])
    b = testing.write_jsonl(tmp_path / "b.jsonl", records[24:28])
    return a, b


@pytest.fixture
def mixed(make_recipe, tmp_path, echo_data):
    a, b = two_sources(tmp_path)

    def make(name, **train):
        return make_recipe(f"{name}.yaml", plugins=["causal_lm", "lora"],
                           lora={"r": 4, "dropout": 0.1},
                           data={"train": [{"path": str(a), "weight": 2},
                                           {"path": str(b), "weight": 1}],
                                 "validation": str(echo_data[1]), "mix": "interleave_over"},
                           train={"max_steps": 14, "batch_size": 4, "lr": 1e-3, **train},
                           output={"name": name})
    return make, a, b


def test_a_mixture_trains_records_its_sources_and_resumes_bit_identical(mixed, tmp_path):
    make, a, b = mixed
    lines = []
    summary, run = testing.run(make("straight"), echo=lines.append)
    # interleave_over, weights 2:1: a's 24 records once and b's 4 records 3 times each
    assert "data: mixture interleave_over: 24 + 12 examples an epoch" in lines, lines
    assert any("(9 steps per epoch)" in line for line in lines), lines
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert manifest["mixture"] == {"mix": "interleave_over", "sources": [
        {"source": str(a), "sha256": rundir.sha256(a), "weight": 2.0},
        {"source": str(b), "sha256": rundir.sha256(b), "weight": 1.0}]}
    assert cli.main(["eval", str(run.dir)]) == 0  # its validation file, read once

    # interrupted after step 10 (the second epoch), then resumed
    _, cut = testing.run(make("cut", save_every=5), ["train.max_steps=14"])
    for p in (cut.dir / "checkpoints").iterdir():
        if p.name != "step-10":
            shutil.rmtree(p)
    shutil.rmtree(cut.dir / "adapter")
    state = json.loads((cut.dir / "manifest.json").read_text())
    (cut.dir / "manifest.json").write_text(json.dumps({**state, "status": "interrupted"}))
    (cut.dir / "metrics.jsonl").write_text("".join(
        x + "\n" for x in (cut.dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(x).get("step", 0) <= 10))
    assert cli.main(["resume", str(cut.dir)]) == 0
    mine = load_file(cut.dir / "adapter" / "adapter_model.safetensors")
    straight = load_file(run.dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(mine[k], straight[k]) for k in straight)
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl")
                                                     .read_text().splitlines()) if "loss" in r]
              for d in (cut.dir, run.dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 14


def test_weights_in_dataset_entries_and_in_data_weights_say_the_same(make_recipe, tmp_path,
                                                                      echo_data):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "a b"}] * 4).save_to_disk(str(saved))
    one = testing.load_recipe(make_recipe(
        "one.yaml", data={"train": [{"dataset": str(saved), "weight": 3}, str(echo_data[0])],
                          "validation": str(echo_data[1]), "mix": "interleave_under"}))[0]
    other = testing.load_recipe(make_recipe(
        "other.yaml", data={"train": [{"dataset": str(saved)}, str(echo_data[0])],
                            "weights": [3, 1], "validation": str(echo_data[1]),
                            "mix": "interleave_under"}))[0]
    assert one.data == other.data and one.data.weights == [3.0, 1.0]
    assert one.data.train[0].dataset == str(saved)
    assert rundir.mixture_record(one, rundir.data_hashes(one))["sources"][0] == {
        "source": str(saved), "sha256": rundir.sha256(saved), "weight": 3.0}
