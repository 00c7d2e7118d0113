"""question_answering: SQuAD-style records, long contexts in strided windows, answers mapped
back to text through offsets, SQuAD exact match and F1, the Loss(sum, count) contract, and
composition with full, freeze and lora."""
import json

import pytest
import torch

from plugtune import cli, loop, testing
from plugtune.data import Record
from plugtune.plugins import question_answering as qa

from test_heads import minilm

PLACES = ["river", "stone", "cloud", "piano"]
NAMES = ["apple", "lemon", "tiger", "candle"]


def toy_qa(n=24):
    """`NAME lives by the PLACE.` among filler words: where does NAME live? -> PLACE. Some
    contexts are long enough to need several windows."""
    records = []
    for i in range(n):
        name, place = NAMES[i % 4], PLACES[(i // 4) % 4]
        before = " ".join(["cloud tiger"] * (i % 3) * 6)
        context = f"{before} {name} lives by the {place}. {'apple stone ' * (i % 5)}".strip()
        start = context.index(f"the {place}") + len("the ")
        records.append({"context": context, "question": f"where does {name} live?",
                        "answers": {"text": [place], "answer_start": [start]}})
    return records


def qa_recipe(tmp_path, model, plugins=("full",), records=None, **sections):
    data = testing.write_jsonl(tmp_path / "qa.jsonl", records or toy_qa())
    base = {"description": "tiny qa", "model": str(model),
            "plugins": ["question_answering", *plugins],
            "data": {"train": str(data), "validation": str(data)},
            "question_answering": {"stride": 8, "max_answer_length": 4},
            "train": {"max_steps": 40, "lr": 3e-3, "batch_size": 8, "max_length": 32},
            "output": {"dir": str(tmp_path / "runs"), "name": "qa"}}
    base.update(sections)
    return testing.write_recipe(tmp_path / "recipe.yaml", **base)


def test_long_contexts_are_windows_whose_answer_maps_back_to_the_text(tmp_path, tiny_llama):
    recipe, pm = testing.load_recipe(qa_recipe(tmp_path, tiny_llama))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    examples = run.data["train"].examples
    assert len(examples) > 24  # long contexts gave several windows
    for record, source in enumerate(toy_qa()):
        windows = [e for e in examples if e["record"] == record]
        assert all(len(e["input_ids"]) <= 32 for e in windows)
        first = source["answers"]["answer_start"][0]
        last = first + len(source["answers"]["text"][0])
        # which windows hold the answer, read off their offsets, not off the labels under test
        holding = [e for e in windows if min(o[0] for o in e["offsets"] if o) <= first
                   and max(o[1] for o in e["offsets"] if o) >= last]
        assert holding, f"record {record}: no window holds the answer"
        for e in holding:
            start = e["offsets"][e["start_positions"]][0]
            end = e["offsets"][e["end_positions"]][1]
            assert e["start_positions"] > 0
            assert e["context"][start:end].strip() == e["answers"][0]
        for e in windows:  # a window without the answer points at its first token
            if e not in holding:
                assert e["start_positions"] == e["end_positions"] == 0


def test_loss_is_summed_over_windows_with_their_count(tmp_path, tiny_llama):
    recipe, pm = testing.load_recipe(qa_recipe(tmp_path, tiny_llama))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    batch = run.data["train"].collate(run.data["train"].examples[:5])
    loss = loop.loss_of(run, run.model, batch)
    assert int(loss.count) == 5
    out = run.model(**{k: v for k, v in batch.items() if k not in qa.POSITIONS})
    ce = torch.nn.functional.cross_entropy
    mean = (ce(out.start_logits, batch["start_positions"]) +
            ce(out.end_logits, batch["end_positions"])) / 2  # transformers' QA loss
    torch.testing.assert_close(loss.mean, mean)


@pytest.mark.parametrize("plugins", [("full",), ("freeze",), ("lora",)])
def test_learns_to_answer_with_full_freeze_and_lora(tmp_path, tiny_llama, plugins):
    sections = {"freeze": {"last_n_blocks": 1}} if plugins == ("freeze",) else {}
    if plugins == ("lora",):
        sections = {"lora": {"r": 8, "target_modules": "all-linear"}}
    summary, run = testing.run(qa_recipe(tmp_path, tiny_llama, plugins, **sections))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["f1"] > before["f1"] and after["f1"] > 0.5
    saved = {"lora": "adapter"}.get(plugins[0], "model")
    assert (run.dir / saved).is_dir()
    if plugins == ("lora",):  # the head is saved with the adapter, in full
        from safetensors.torch import load_file

        keys = load_file(run.dir / "adapter" / "adapter_model.safetensors").keys()
        assert any("qa_outputs" in k for k in keys)
    # `plugtune eval` repeats the final figures from the saved model
    assert cli.main(["eval", str(run.dir)]) == 0
    metrics = json.loads((run.dir / "eval-validation.json").read_text())["metrics"]
    assert metrics["f1"] == pytest.approx(after["f1"])


def test_squad_metrics_normalize_like_the_official_script():
    pairs = [("The Tiger!", ["tiger"]), ("by the river", ["river", "the river bank"]),
             ("", ["stone"]), ("a cloud", ["cloud"])]
    got = qa.squad_metrics(pairs)
    assert got["exact_match"] == pytest.approx(2 / 4)
    # "by the river" vs "river": precision 1/2, recall 1 -> 2/3; vs "river bank" also 2/3
    assert got["f1"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)


def test_best_span_stays_inside_the_context_and_in_order():
    offsets = [None, None, (0, 5), (6, 11), (12, 17), None]
    start = [9.0, 0, 1.0, 5.0, 0, 0]
    end = [9.0, 0, 4.0, 0, 3.0, 9.0]
    score, (a, b) = qa.best_span(start, end, offsets, n_best=6, max_answer_length=3)
    assert (a, b) == (6, 17) and score == 8.0


@pytest.mark.parametrize("bad, message", [
    ({"answers": {"text": ["tiger"], "answer_start": [0]}},
     "answer 'tiger' is not at character 0 of the context (found 'cloud'); fix answer_start"),
    ({"answers": {"text": ["x"]}}, "'answers' must be {\"text\": [strings], \"answer_start\""),
    ({"question": ""}, "'question' must be a non-empty string"),
    ({"context": None}, "'context' must be a non-empty string"),
])
def test_bad_records_are_one_line_naming_the_record(tmp_path, tiny_llama, capsys, bad, message):
    records = toy_qa(4)
    records[2] = {**records[2], **bad}
    assert cli.main(["validate", str(qa_recipe(tmp_path, tiny_llama, records=records))]) == 2
    err = capsys.readouterr().err  # the file is both splits: one line for each
    assert err.startswith("plugtune: error: 2 problem(s)") and "Traceback" not in err
    assert f"data.train: {tmp_path / 'qa.jsonl'}:3: {message}" in err


def test_one_task_plugin(tmp_path, tiny_llama, capsys):
    recipe = qa_recipe(tmp_path, tiny_llama, plugins=("full", "causal_lm"))
    assert cli.main(["validate", str(recipe)]) == 2
    assert "`question_answering` and `causal_lm` both fill the role `task`" in \
        capsys.readouterr().err


def test_the_planner_counts_the_head(tmp_path, tiny_llama):
    from plugtune import plan

    recipe, pm = testing.load_recipe(qa_recipe(tmp_path, tiny_llama))
    estimate = plan.estimate(recipe, pm, "cpu")
    heads = [p for p in estimate.plan.params if "qa_outputs" in p.name]
    assert heads and all(p.trainable for p in heads)


def test_minilm_encoder_learns_the_toy_task(tmp_path):
    summary, run = testing.run(qa_recipe(tmp_path, minilm(), train={
        "max_steps": 30, "lr": 1e-4, "batch_size": 8, "max_length": 32}))
    assert type(run.model).__name__ == "BertForQuestionAnswering"
    assert "token_type_ids" in run.data["train"].examples[0]
    assert summary["eval_after"]["f1"] > summary["eval_before"]["f1"]


def test_windows_of_a_record(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    record = Record(toy_qa()[12], "mem", 1)
    context, question, answers = qa.parse(record, qa.QuestionAnsweringSection())
    enc = qa.windows(tokenizer, question, context, 24, 8, record.where)
    assert len(enc["input_ids"]) > 1


def test_prompt_tuning_is_refused(tmp_path, tiny_llama, capsys):
    recipe = qa_recipe(tmp_path, tiny_llama, plugins=("prompt_tuning",))
    assert cli.main(["validate", str(recipe)]) == 2
    assert "`prompt_tuning` adds virtual tokens to the input, which question_answering would " \
        "have to tag or leave out of its target positions" in capsys.readouterr().err
