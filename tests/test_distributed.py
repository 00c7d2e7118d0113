"""The same recipe under torchrun: two CPU processes (gloo) train one model, each on its share of
the batches; only the main process speaks and writes the run directory. They train what one
process would, also when a step's micro-batches do not divide among them, and a resumed run
with dropout goes on as if uninterrupted.

Run as a script (under torchrun), this file trains recipes with plain SGD: see the end."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from plugtune import checkpoint, testing

from test_long_runs import SGD, uneven_records
from test_resume import logged_steps


def test_two_processes_share_the_epoch_and_write_one_run(make_recipe, echo_data, tmp_path):
    recipe = make_recipe(train={"max_steps": None, "epochs": 1, "batch_size": 4, "lr": 3e-3})
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "plugtune.cli", "run", str(recipe)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: ") == 1 and "x 2 processes" in done.stdout
    run_dir = tmp_path / "runs" / "run"
    assert {"recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png", "model"} <= {
        p.name for p in run_dir.iterdir()}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batches = math.ceil(len(echo_data[0].read_text().splitlines()) / 4)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, math.ceil(batches / 2) + 1))
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "completed"


ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def interrupted(command, env, run_dir):
    """Start ``command`` (a 2-process launch training into ``run_dir``), send it SIGTERM once
    it has logged 2 steps; the step its checkpoint was taken at (the manifest says so)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while logged_steps(run_dir) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    status = json.loads((run_dir / "manifest.json").read_text())["status"]
    assert status.startswith("interrupted at step"), (status, out, err[-3000:])
    stopped = int(status.split()[-1])
    return stopped


def torchrun(*args):
    """``plugtune ARGS`` in 2 CPU processes."""
    return subprocess.run([*TORCHRUN, "-m", "plugtune.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_two_processes_evaluate_their_shares_and_agree_with_one(make_recipe, tmp_path,
                                                                tiny_llama):
    """`plugtune eval` under torchrun: each process evaluates (and generates for) its share of
    an uneven held-out set; the metrics are those of one process."""
    from plugtune import cli, testing

    from test_heads import head_recipe, toy_texts

    runs = []
    chat = make_recipe(train={"max_steps": 6, "eval_every": None, "eval_batch_size": 3})
    runs.append(testing.run(chat)[0]["artifact"])
    texts = toy_texts()[:13]
    head = head_recipe(tmp_path, tiny_llama, "sequence_classification", texts,
                       output={"name": "head"}, train={"max_steps": 4, "eval_batch_size": 2,
                                                       "eval_every": None})
    runs.append(testing.run(head)[0]["artifact"])
    for artifact in runs:
        run_dir = os.path.dirname(artifact)
        assert cli.main(["eval", run_dir]) == 0
        path = os.path.join(run_dir, "eval-validation.json")
        one = json.loads(open(path).read())["metrics"]
        os.remove(path)
        done = torchrun("eval", run_dir)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote ") == 1
        two = json.loads(open(path).read())["metrics"]
        assert one.keys() == two.keys() and len(one) > 2
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-6), key


def under_torchrun(out, *tasks):
    """Run ``tasks`` one after another in one 2-process torchrun of this file (one start-up for
    all): ``sgd=RECIPE`` trains with plain SGD, each process writing its final trainable weights
    to ``out/rank{R}-{recipe stem}.safetensors``; ``run=RECIPE``, ``resume=RUN`` are
    ``plugtune run`` / ``plugtune resume``."""
    return subprocess.run([*TORCHRUN, __file__, str(out), *map(str, tasks)], env=ENV,
                          capture_output=True, text=True, timeout=300)


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_an_uneven_last_step_trains_as_one_process(make_recipe, tmp_path):
    """7 records of very uneven length, batch 1: one process accumulating 4 micro-batches and
    2 processes x 2 take the same steps on the same examples, the last of each epoch 3
    micro-batches (2 on one process, 1 on the other). With plain SGD (the update is the
    gradient) over 3 epochs both processes end with the one process's weights, with and
    without clipping; the saved model is the one process's."""
    data = testing.write_jsonl(tmp_path / "seven.jsonl", uneven_records(7))

    def recipe(name, grad_accum, clip):
        return make_recipe(f"{name}.yaml", data={"train": str(data), "validation": str(data)},
                           train={"max_steps": None, "epochs": 3, "batch_size": 1,
                                  "grad_accum": grad_accum, "lr": 0.1, "eval_every": None,
                                  "max_grad_norm": clip},
                           output={"name": name})
    clips = {"unclipped": None, "clipped": 0.05}
    ones = {}
    for case, clip in clips.items():
        snapshot = testing.WeightSnapshot()
        summary, run = testing.run(recipe(f"one-{case}", 4, clip),
                                   extra_plugins=[SGD(), snapshot])
        assert summary["steps"] == 6 and len(snapshot.changed(run.model)) > 10
        ones[case] = checkpoint.trainable_state(run.model)
        norms = [r["grad_norm"] for r in map(json.loads, (run.dir / "metrics.jsonl")
                                             .read_text().splitlines()) if "loss" in r]
        assert len(norms) == 6 and min(norms) > 0.05  # clipping (0.05) cuts every step
    done = under_torchrun(tmp_path, *(f"sgd={recipe(f'two-{case}', 2, clip)}"
                                      for case, clip in clips.items()))
    assert done.returncode == 0, done.stderr[-3000:]
    for case in clips:
        for rank in (0, 1):
            apart = largest_difference(
                ones[case], load_file(tmp_path / f"rank{rank}-two-{case}.safetensors"))
            assert apart < 1e-6, (case, rank)
        apart = largest_difference(*(
            load_file(tmp_path / "runs" / f"{n}-{case}" / "model" / "model.safetensors")
            for n in ("one", "two")))
        assert apart < 1e-6, case


def test_two_processes_resume_with_dropout_as_if_uninterrupted(make_recipe, tiny_gpt2, tmp_path):
    """A 2-process run of a GPT-2 with dropout, stopped by a SIGTERM to torchrun (as a
    scheduler sends) and resumed under torchrun, ends bit-identical to an uninterrupted one:
    each process draws its own dropout masks (its micro-batches differ in length), so each
    needs its own random state back, not the main process's."""
    data = testing.write_jsonl(tmp_path / "sixteen.jsonl", uneven_records(16))
    assert json.loads((tiny_gpt2 / "config.json").read_text())["resid_pdrop"] > 0

    def recipe(name):
        return make_recipe(f"{name}.yaml", model=str(tiny_gpt2),
                           data={"train": str(data), "validation": str(data)},
                           train={"max_steps": 40, "batch_size": 1, "lr": 1e-3,
                                  "eval_every": None}, output={"name": name})
    cut = tmp_path / "runs" / "cut"
    stopped = interrupted([*TORCHRUN, "-m", "plugtune.cli", "run", str(recipe("cut"))], ENV, cut)
    assert 2 <= stopped < 40 and (cut / "checkpoints" / f"step-{stopped}").is_dir()
    resumed = under_torchrun(tmp_path, f"run={recipe('whole')}", f"resume={cut}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {stopped} of 40" in resumed.stdout
    expected, got = (load_file(tmp_path / "runs" / name / "model" / "model.safetensors")
                     for name in ("whole", "cut"))
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


def test_each_process_takes_its_own_random_state_and_old_checkpoints_still_load(tmp_path):
    """``rng.pt`` is a list by rank (one process here: rank 0 takes the first); an older
    checkpoint's holds one state, which still restores."""
    state = checkpoint.rng_state()
    expected = torch.rand(4)
    other = checkpoint.rng_state()
    for saved in (state, [state], [state, other]):
        torch.save(saved, tmp_path / "rng.pt")
        torch.rand(10)
        checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
        assert torch.equal(torch.rand(4), expected)


if __name__ == "__main__":  # under torchrun, from under_torchrun
    from plugtune import cli

    for task in sys.argv[2:]:
        what, path = task.split("=", 1)
        if what != "sgd":
            if cli.main([what, path]) != 0:
                sys.exit(f"plugtune {what} {path} failed")
            continue
        _, trained = testing.run(path, extra_plugins=[SGD()])
        rank = trained.accelerator.process_index
        save_file(checkpoint.trainable_state(trained.accelerator.unwrap_model(trained.model)),
                  Path(sys.argv[1]) / f"rank{rank}-{Path(path).stem}.safetensors")
