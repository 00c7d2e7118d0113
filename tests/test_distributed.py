"""The same recipe under torchrun: two CPU processes (gloo) train one model, each on its share of
the batches; only the main process speaks and writes the run directory."""
import json
import math
import os
import subprocess
import sys


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
