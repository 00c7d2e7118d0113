"""The same recipe under torchrun: two CPU processes (gloo) train one model, each on its share of
the batches; only the main process speaks and writes the run directory."""
import json
import math
import os
import subprocess
import sys

import pytest


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


def torchrun(*args):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "plugtune.cli", *args], env=env, capture_output=True, text=True, timeout=300)


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
