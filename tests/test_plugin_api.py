"""What docs/hooks.md and docs/plugins.md promise a plugin author, used as an author would: the
public helpers (the task's loss of any model, an evaluation), the batch a task plugin collates,
and the end-of-run summary for a metric that only the trained model has."""
import math

import torch

from plugtune import Loss, hookimpl, loss_of, testing
from plugtune.cli import report


class LateMetric:
    """A metric that exists only once the model has trained (NaN before)."""

    @hookimpl
    def plugtune_evaluate(self, step):
        return {"late_score": math.nan if step == 0 else 0.52}


def test_a_metric_only_the_trained_model_has_prints_as_arrow_value(make_recipe):
    summary, run = testing.run(make_recipe(train={"max_steps": 1},
                                           causal_lm={"exact_match": False}),
                               extra_plugins=[LateMetric()])
    lines = []
    report(summary, run, lines.append)
    assert "  held-out late_score: -> 0.5200" in lines
    assert any(line.startswith("  held-out eval_loss: ") and " -> " in line
               and not line.startswith("  held-out eval_loss: ->") for line in lines)


class SecondOpinion:
    """Computes the task's loss on a frozen copy of the model at each evaluation: what an EMA
    or a distillation plugin does with ``plugtune.loss_of``."""

    def __init__(self):
        self.copy, self.losses = None, []

    @hookimpl
    def plugtune_train_start(self, run):
        import copy

        self.copy = copy.deepcopy(run.accelerator.unwrap_model(run.model)).eval()

    @hookimpl
    def plugtune_evaluate(self, run):
        data = run.data["validation"]
        batch = data.collate(data.examples[:4])
        with torch.no_grad():
            loss = loss_of(run, self.copy, {k: v.to(run.accelerator.device)
                                            for k, v in batch.items()})
        self.losses.append(loss)
        return {"untrained_loss": float(loss.mean)}


def test_loss_of_gives_the_task_loss_of_another_model(make_recipe):
    plugin = SecondOpinion()
    summary, run = testing.run(make_recipe(train={"max_steps": 15},
                                           causal_lm={"exact_match": False}),
                               extra_plugins=[plugin])
    assert all(isinstance(loss, Loss) and int(loss.count) > 0 for loss in plugin.losses)
    # the copy never trains: the same loss before and after, while the model's fell below it
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["untrained_loss"] == after["untrained_loss"]
    assert after["eval_loss"] < after["untrained_loss"]


def test_causal_lm_batch_is_as_documented(make_recipe):
    """docs/hooks.md, "Batches": input_ids, attention_mask, labels unshifted with -100."""
    recipe, pm = testing.load_recipe(make_recipe())
    from plugtune import loop

    run = loop.setup(recipe, pm, echo=lambda *a: None)
    data = run.data["train"]
    batch = data.collate(data.examples[:3])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].shape == batch["input_ids"].shape
    target = batch["labels"] != -100
    assert torch.equal(batch["labels"][target], batch["input_ids"][target])  # not shifted
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert not target[:, 0].any()  # the prompt (user turn) is not a target


def test_head_batches_are_as_documented(tmp_path, tiny_llama):
    """docs/hooks.md, "Batches": a classifier's labels are one id per row, a token classifier's
    one per token with -100 where a token is not scored."""
    from plugtune import loop
    from test_heads import head_recipe, toy_tags, toy_texts

    for task, records in (("sequence_classification", toy_texts()),
                          ("token_classification", toy_tags())):
        recipe, pm = testing.load_recipe(head_recipe(tmp_path, tiny_llama, task, records,
                                                     name=f"{task}.yaml"))
        run = loop.setup(recipe, pm, echo=lambda *a: None)
        data = run.data["train"]
        batch = data.collate(data.examples[:3])
        assert {"input_ids", "attention_mask", "labels"} <= set(batch) <= {
            "input_ids", "attention_mask", "labels", "position_ids"}
        if task == "sequence_classification":
            assert batch["labels"].shape == (3,)
        else:
            assert batch["labels"].shape == batch["input_ids"].shape
            assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


#: Built-in plugins whose names are not also English words or transformers' own attributes
#: (`full`, `metrics`, `plot`, `progress`, `hf`, `data` are; so is a module's
#: `gradient_checkpointing` flag, which the planner reads).
BUILT_IN = ["causal_lm", "freeze", "lora", "int8", "nf4", "adamw", "adamw_8bit",
            "sequence_classification", "token_classification", "early_stopping"]


def test_the_core_names_no_plugin():
    """Outside docstrings and comments, no string or name in core/ is a built-in plugin's."""
    import ast
    import re
    from pathlib import Path

    pattern = re.compile(r"\b(" + "|".join(BUILT_IN) + r")\b")
    found = []
    for path in sorted((Path(__file__).parent.parent / "core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                      and isinstance(node.value, ast.Constant)}
        for node in ast.walk(tree):
            text = (node.value if isinstance(node, ast.Constant) and id(node) not in docstrings
                    and isinstance(node.value, str) else
                    node.id if isinstance(node, ast.Name) else
                    node.attr if isinstance(node, ast.Attribute) else "")
            if pattern.search(text):
                found.append(f"{path.name}:{node.lineno}: {text[:60]!r}")
    assert found == []


class ReadsWeights:
    """A model-phase hook that reads values: `.item()` fails on the planner's meta model."""

    def __init__(self, skip_meta):
        self.skip_meta, self.seen = skip_meta, []

    @hookimpl
    def plugtune_prepare_model(self, model):
        weight = next(model.parameters())
        if self.skip_meta and weight.is_meta:
            return
        self.seen.append(float(weight.flatten()[0].item()))


def test_model_phase_hooks_run_on_the_meta_model_first_as_documented(make_recipe):
    """docs/hooks.md, "Model-phase hooks on the meta device": the planner calls them on a meta
    model before the run does on the real one; a hook that skips meta tensors keeps the plan, one
    that reads values loses it (one line), and neither stops the run."""
    from plugtune import loop, plan

    for skip_meta, available in ((True, True), (False, False)):
        plugin = ReadsWeights(skip_meta)
        recipe, pm = testing.load_recipe(make_recipe(train={"max_steps": 1},
                                                     causal_lm={"exact_match": False},
                                                     output={"name": f"skip-{skip_meta}"}),
                                         extra_plugins=[plugin])
        lines = []
        plan.preflight(recipe, pm, echo=lines.append)
        assert lines[0].startswith("memory plan: unavailable") != available, lines
        summary = loop.train(loop.setup(recipe, pm, echo=lines.append), echo=lines.append)
        assert summary["steps"] == 1 and len(plugin.seen) == 1  # the real model, once
