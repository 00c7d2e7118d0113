"""Streamed training data (``data.streaming: true``): records read as steps need them through a
seeded shuffle buffer, never the whole file; a resumed stream goes on from the exact record
(bit-identical to an uninterrupted run, across the end of a pass); what streaming needs is
said at validate in one line each."""
import itertools
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from plugtune import cli, testing
from plugtune.errors import DataError
from plugtune.plugins.data_stream import stream_source
from plugtune.stream import shuffled

from conftest import echo_records
from test_data_sources import write_parquet


def test_the_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(100))
    out = list(shuffled(items, 10, random.Random(3)))
    assert sorted(out) == items and out != items
    assert list(shuffled(items, 10, random.Random(3))) == out
    assert list(shuffled(items, 1, random.Random(3))) == items  # a buffer of one: in order
    # a record leaves the buffer at most ~size places early
    assert all(out.index(i) >= i - 10 for i in items)


def test_streamed_sources_give_the_records_the_whole_readers_give(tmp_path):
    import datasets

    from plugtune.plugins.data import read_source

    records = echo_records()
    texts = [{"text": f"line {i}, \"quoted\""} for i in range(40)]
    jsonl = testing.write_jsonl(tmp_path / "a.jsonl", records)
    parquet = write_parquet(tmp_path / "a.parquet", [{"text": str(r)} for r in records])
    (tmp_path / "a.txt").write_text("\n\n".join(t["text"] for t in texts) + "\n")
    with open(tmp_path / "a.csv", "w", newline="") as f:
        import csv

        writer = csv.DictWriter(f, ["text"])
        writer.writeheader()
        writer.writerows(texts)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(texts)}).save_to_disk(str(saved))
    for path in (jsonl, parquet, tmp_path / "a.txt", tmp_path / "a.csv", saved):
        whole = [(r.data, r.where) for r in read_source(str(path), "train")]
        assert [(r.data, r.where) for r in stream_source(str(path), "train")] == whole, path
        assert len(whole) in (32, 40)


def stream_of(sizes):
    from plugtune.data import Record, Stream

    parts = [lambda k=k, n=n: iter([Record({"i": i}, f"s{k}", i + 1, source=k)
                                    for i in range(n)]) for k, n in enumerate(sizes)]
    return Stream(lambda: (r for p in parts for r in p()), "test", parts)


def test_streamed_mixtures_sample_by_weight_with_the_exhaustion_rule():
    from collections import Counter

    from plugtune.stream import interleaved, passes

    stream = stream_of([300, 100])
    under = list(interleaved(stream, "0:0", 10, "interleave_under", [1.0, 1.0]))
    seen = Counter(r.source for r in under)
    assert seen[1] == 100 and 70 < seen[0] < 140  # b ran out first: the pass ended
    assert len({(r.source, r.line) for r in under}) == len(under)  # no repeats
    over = list(interleaved(stream, "0:0", 10, "interleave_over", [1.0, 1.0]))
    seen = Counter(r.source for r in over)
    assert seen[0] == 300 and 230 < seen[1] < 370  # until a ran out: b read about 3 times
    assert list(interleaved(stream, "0:0", 10, "interleave_over", [1.0, 1.0])) == over
    assert [r.source for r in itertools.islice(
        passes(stream, 0, 10, "interleave_over", [1.0, 0.0]), 700)] == [0] * 700  # weight 0
    with pytest.raises(DataError, match=r"data.train\[1\]: no records"):
        list(interleaved(stream_of([5, 0]), "0:0", 10, "interleave_over", [1.0, 1.0]))


def test_a_bad_line_is_named_as_the_whole_file_reader_names_it(tmp_path):
    from plugtune.plugins.data import read_file

    path = tmp_path / "bad.jsonl"
    good = "".join(json.dumps({"text": f"line {i}"}) + "\r\n" for i in range(3000))
    path.write_bytes(good.encode() + '{"text": "caf\u00e9"}\n'.encode("latin1"))
    for bad in ('{"text": "cut sho\n', None):
        with pytest.raises(DataError) as whole:
            read_file(str(path))
        with pytest.raises(DataError) as streamed_:
            list(stream_source(str(path), "train"))
        assert str(streamed_.value) == str(whole.value) and ":3001: " in str(whole.value)
        if bad:
            path.write_bytes(good.encode() + bad.encode())


@pytest.fixture
def streamed(make_recipe, tmp_path, echo_data):
    def make(name, data=None, extra=None, **train):
        return make_recipe(f"{name}.yaml", plugins=["causal_lm", "lora"],
                           lora={"r": 4, "dropout": 0.1},
                           data={"train": str(data or echo_data[0]),
                                 "validation": str(echo_data[1]),
                                 "streaming": True, "buffer_size": 8, **(extra or {})},
                           train={"max_steps": 12, "batch_size": 4, "lr": 1e-3, **train},
                           causal_lm={"exact_match": False}, output={"name": name})
    return make


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl")
                                                .read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("mix", [None, "interleave_over"])
def test_a_stream_trains_and_resumes_at_the_exact_record(streamed, tmp_path, echo_data, mix):
    # 32 records, 4 a step: the stream's second pass starts at step 9
    extra = None if mix is None else {"train": [str(echo_data[0]), str(echo_data[1])],
                                      "weights": [2, 1], "mix": mix}
    lines = []
    summary, run = testing.run(streamed("straight", extra=extra), echo=lines.append)
    assert any(x.startswith("data: train streamed from ") for x in lines), lines
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]

    _, cut = testing.run(streamed("cut", extra=extra, save_every=5))
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
    assert losses(cut.dir) == losses(run.dir) and len(losses(run.dir)) == 12


def test_a_stream_reads_only_what_the_steps_need(streamed, tmp_path):
    """A broken line after the records validate reads and the steps use: never read."""
    records = echo_records() * 40  # 1280 records; validate reads 1000, 3 steps read 12
    path = testing.write_jsonl(tmp_path / "big.jsonl", records)
    with open(path, "a") as f:
        f.write('{"text": "cut sho\n')
    summary, _ = testing.run(streamed("lazy", data=path, max_steps=3, eval_every=None))
    assert summary["steps"] == 3


@pytest.mark.parametrize("data, train, said", [
    ({}, {"max_steps": None}, "data.streaming: needs train.max_steps"),
    ({"validation": None}, {}, "data.streaming: needs data.validation"),
    ({}, {"group_by_length": True}, "train.group_by_length: needs every example's length"),
    ({"train": "JSON"}, {}, ".json: data.streaming reads .jsonl, .txt, .csv, .parquet files"),
])
def test_what_streaming_needs_is_one_line_at_validate(streamed, tmp_path, capsys, data, train,
                                                       said):
    if data.get("train") == "JSON":
        data["train"] = str(tmp_path / "list.json")
        (tmp_path / "list.json").write_text(json.dumps(echo_records()))
    assert cli.main(["validate", str(streamed("bad", extra=data, **train))]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err


def test_a_mixture_and_a_stream_train_under_two_processes_as_under_one(make_recipe, tmp_path,
                                                                      echo_data):
    """Plain SGD, batch 2: one process accumulating 2 micro-batches and 2 processes x 1 take the
    same examples each step (micro-batch j on process j % 2), for an interleaved mixture, a
    stream (whose second pass starts within the run) and a streamed mixture: the same
    weights."""
    from plugtune import checkpoint

    from test_distributed import largest_difference, under_torchrun
    from test_long_runs import SGD

    a, b = (testing.write_jsonl(tmp_path / f"{n}.jsonl", r)
            for n, r in (("a", echo_records()[:20]), ("b", echo_records()[20:26])))
    cases = {"mix": {"train": [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}],
                     "mix": "interleave_over"},
             "stream": {"train": [str(a), str(b)], "streaming": True, "buffer_size": 4},
             "stream-mix": {"train": [str(a), str(b)], "streaming": True, "buffer_size": 4,
                            "weights": [1, 1], "mix": "interleave_under"}}

    def recipe(name, case, grad_accum):
        return make_recipe(f"{name}.yaml", data={**cases[case], "validation": str(echo_data[1])},
                           train={"max_steps": 8, "batch_size": 2, "grad_accum": grad_accum,
                                  "lr": 0.1, "eval_every": None}, output={"name": name})
    ones = {}
    for case in cases:
        _, run = testing.run(recipe(f"one-{case}", case, 2), extra_plugins=[SGD()])
        ones[case] = checkpoint.trainable_state(run.model)
    done = under_torchrun(tmp_path, *(f"sgd={recipe(f'two-{case}', case, 1)}" for case in cases))
    assert done.returncode == 0, done.stderr[-3000:]
    for case in cases:
        for rank in (0, 1):
            two = load_file(tmp_path / f"rank{rank}-two-{case}.safetensors")
            assert largest_difference(ones[case], two) < 1e-6, (case, rank)


def test_a_stream_stopped_by_sigterm_resumes_bit_identical(make_recipe, tmp_path, echo_data):
    """`plugtune run` in a subprocess, SIGTERM after some steps (its rescue checkpoint is at
    whatever step it had reached), `plugtune resume`: the adapter and every step's loss are
    those of an uninterrupted run (the stream read again up to the checkpoint's record)."""
    import signal

    from test_resume import echo_words, plugtune, resume, start_and_kill, train_losses

    records = [{"text": " ".join([w] * 60)} for w in echo_words() for _ in range(3)]
    data = testing.write_jsonl(tmp_path / "long.jsonl", records)  # 24 records: 6 steps a pass

    def make(name):
        return make_recipe(f"{name}.yaml", plugins=["causal_lm", "lora"],
                           lora={"r": 4, "dropout": 0.1},
                           data={"train": str(data), "validation": str(echo_data[1]),
                                 "streaming": True, "buffer_size": 5},
                           train={"max_steps": 30, "batch_size": 4, "lr": 1e-3,
                                  "eval_every": None}, output={"name": name})
    straight = plugtune("run", make("straight"))
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-2000:]
    runs = tmp_path / "runs"
    code, _, err = start_and_kill(make("term"), runs / "term", signal.SIGTERM, 8)
    assert code == 143, err[-2000:]
    code, out, err = resume(runs / "term")
    assert code == 0 and "resuming at step" in out, err[-2000:]
    adapter = "adapter/adapter_model.safetensors"
    assert (runs / "term" / adapter).read_bytes() == (runs / "straight" / adapter).read_bytes()
    assert train_losses(runs / "term") == train_losses(runs / "straight")
