"""End-to-end on a tiny model: the loss falls and the run directory is complete."""
import json

from plugtune import testing


def test_tiny_llama_learns_and_writes_run_directory(make_recipe):
    summary, run = testing.run(make_recipe())
    assert summary["eval_after"]["eval_loss"] < 0.5 * summary["eval_before"]["eval_loss"]
    names = {p.name for p in run.dir.iterdir()}
    assert {"recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png", "model"} <= names
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
