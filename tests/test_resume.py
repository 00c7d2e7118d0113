"""Real runs killed and resumed: `plugtune run` in a subprocess, stopped with SIGINT, SIGTERM or
SIGKILL after some checkpoints, then `plugtune resume`: the final weights are bit-identical
to an uninterrupted run's, and so is the loss at every step."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from plugtune import cli, rundir, testing

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = 40


@pytest.fixture
def long_recipe(make_recipe, tmp_path):
    """LoRA with dropout (so the random state matters) over 40 steps, crossing epochs, with a
    checkpoint every 4 steps; records long enough that a step takes a noticeable time."""
    records = [{"text": " ".join([w] * 60)} for w in echo_words() for _ in range(2)]
    data = testing.write_jsonl(tmp_path / "long.jsonl", records)

    def make(name):
        return make_recipe(f"{name}.yaml", plugins=["causal_lm", "lora"],
                           lora={"r": 4, "dropout": 0.1},
                           data={"train": str(data), "validation": str(data)},
                           train={"max_steps": STEPS, "batch_size": 4, "save_every": 4,
                                  "lr": 1e-3, "eval_every": 10},
                           causal_lm={"exact_match": False}, output={"name": name})
    return make


def echo_words():
    return ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]


def plugtune(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "plugtune.cli", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if '"loss"' in x]
    return max(steps, default=0)


def start_and_kill(recipe, run_dir, sig, after_step, again=None):
    proc = plugtune("run", recipe)
    deadline = time.time() + 240
    while logged_steps(run_dir) < after_step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    if again is not None:
        proc.send_signal(again)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def train_losses(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), "a step recorded twice"
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records]


def resume(run_dir, *flags):
    proc = plugtune("resume", run_dir, *flags)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def adapter(run_dir):
    path = run_dir / "adapter" / "adapter_model.safetensors"
    return path.read_bytes(), load_file(path)


def test_interrupted_and_killed_runs_resume_bit_identical(long_recipe, tmp_path):
    runs = tmp_path / "runs"
    reference = plugtune("run", long_recipe("straight"))
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]

    # SIGINT: the step finishes, a checkpoint is written, the manifest says so
    code, out, err = start_and_kill(long_recipe("sigint"), runs / "sigint", signal.SIGINT, 9)
    assert code == 130, err[-2000:]
    manifest = json.loads((runs / "sigint" / "manifest.json").read_text())
    step = int(manifest["status"].removeprefix("interrupted at step "))
    assert 9 <= step < STEPS
    assert (runs / "sigint" / "checkpoints" / f"step-{step}" / "state.json").is_file()
    assert f"plugtune resume {runs / 'sigint'}" in err
    assert len([x for x in err.splitlines() if x.startswith("plugtune: error")]) == 1

    # SIGKILL: nothing runs; the last checkpoint is whole
    code, _, _ = start_and_kill(long_recipe("sigkill"), runs / "sigkill", signal.SIGKILL, 14)
    assert code == -signal.SIGKILL
    assert json.loads((runs / "sigkill" / "manifest.json").read_text())["status"] == "running"

    for name in ("sigint", "sigkill"):
        code, out, err = resume(runs / name)
        assert code == 0, err[-2000:]
        assert "resuming at step" in out
        assert adapter(runs / name)[0] == adapter(runs / "straight")[0]
        assert train_losses(runs / name) == train_losses(runs / "straight")
        manifest = json.loads((runs / name / "manifest.json").read_text())
        assert manifest["status"] == "completed" and manifest["steps"] == STEPS
        assert len(manifest["resumed"]) == 1

    # a finished run is not resumed
    code, _, err = resume(runs / "straight")
    assert code == 1 and "has finished (completed)" in err


def test_sigterm_then_a_second_signal_stops_at_once_leaving_whole_checkpoints(long_recipe,
                                                                              tmp_path):
    run_dir = tmp_path / "runs" / "term"
    code, _, err = start_and_kill(long_recipe("term"), run_dir, signal.SIGTERM, 6,
                                  again=signal.SIGINT)
    assert code in (130, 143), err[-2000:]
    assert json.loads((run_dir / "manifest.json").read_text())["status"].startswith(
        "interrupted at step")
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names and all(n.startswith("step-") for n in names)  # no temporary leftovers
    assert all((run_dir / "checkpoints" / n / "state.json").is_file() for n in names)


def test_sigterm_alone_exits_143(long_recipe, tmp_path):
    run_dir = tmp_path / "runs" / "term"
    code, _, err = start_and_kill(long_recipe("term"), run_dir, signal.SIGTERM, 5)
    assert code == 143, err[-2000:]
    assert "SIGTERM: interrupted at step" in err


def interrupted(recipe, steps=6, at=4):
    """Run ``recipe`` in-process with a checkpoint every 2 steps, then make it look
    interrupted after step ``at``: later checkpoints and the saved model removed, the manifest
    saying so."""
    summary, run = testing.run(recipe, [f"train.max_steps={steps}"])
    for p in (run.dir / "checkpoints").iterdir():
        if p.name != f"step-{at}":
            shutil.rmtree(p)
    shutil.rmtree(run.dir / "model")
    manifest = json.loads((run.dir / "manifest.json").read_text())
    (run.dir / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    return run.dir


def test_resume_refuses_changed_data_unless_forced(make_recipe, tmp_path, capsys, echo_data):
    run_dir = interrupted(make_recipe(train={"max_steps": 6, "save_every": 2}))
    with open(echo_data[0], "a") as f:
        f.write(json.dumps({"text": "a new record"}) + "\n")
    assert cli.main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"data file {echo_data[0]} changed" in err and "--force" in err
    assert cli.main(["resume", str(run_dir), "--force"]) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert "changed" in manifest["resumed"][0]["forced"][0]


def test_resume_refuses_a_model_changed_in_place(make_recipe, tiny_llama, tmp_path, capsys):
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    run_dir = interrupted(make_recipe(model=str(model), train={"save_every": 2}))
    testing.tiny_model(model, "llama", ["other words"], seed=1)  # another model, same path
    assert cli.main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"model {model}: its files changed since the run started" in err
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"


def test_model_fingerprint_reads_only_the_ends_of_large_files(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HASHED_IN_FULL", 1000)
    monkeypatch.setattr(rundir, "ENDS", 100)
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(5000))
    before = rundir.model_fingerprint(str(tmp_path))
    weights.write_bytes(bytes(2000) + b"x" + bytes(2999))  # the middle of a large file: unread
    assert rundir.model_fingerprint(str(tmp_path)) == before
    weights.write_bytes(bytes(4999) + b"x")
    assert rundir.model_fingerprint(str(tmp_path)) != before
    (tmp_path / "config.json").write_text('{"a": 1}')  # small files in full
    assert rundir.model_fingerprint(str(tmp_path)) not in (before, None)
    assert rundir.model_fingerprint("HuggingFaceTB/SmolLM2-135M") is None  # a hub id
