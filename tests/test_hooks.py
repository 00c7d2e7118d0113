"""The hook lifecycle, pinned: a golden test of the call order over a whole run, and one test
per hookspec showing that an implementation of it changes the run in a way a user notices.

``test_every_hook_has_a_test`` fails when a hookspec is added without a test here, and
``test_every_hook_is_documented`` when docs/hooks.md does not show its signature.
"""
import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel
from transformers import AutoModelForCausalLM

from plugtune import Loss, artifacts, hookdoc, hookimpl, hookspecs, loop, manager, testing
from plugtune.data import Record, Splits
from plugtune.errors import PluginError, PlugtuneError, RecipeError
from plugtune.plugins import causal_lm, peft_family

DOCS = Path(__file__).parent.parent / "docs" / "hooks.md"
HOOK_TESTS = {}


def covers(hook):
    """Mark a test as the dedicated test of ``hook``."""
    def mark(test):
        HOOK_TESTS[hook] = test
        return test
    return mark


@pytest.fixture
def quick(make_recipe):
    """``quick(**sections) -> recipe path``: one optimizer step of the tiny Llama, no
    generation at evaluation."""
    def make(**sections):
        train = {"max_steps": 1, **sections.pop("train", {})}
        return make_recipe(train=train, causal_lm={"exact_match": False}, **sections)
    return make


def set_up(recipe_path, *plugins):
    """``(run, printed lines)`` after the data and model phases, with ``plugins`` active."""
    recipe, pm = testing.load_recipe(recipe_path, extra_plugins=plugins)
    lines = []
    return loop.setup(recipe, pm, echo=lines.append), lines


def metrics(run):
    return [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]


def trainable_line(lines):
    return next(line for line in lines if line.startswith("parameters:"))


# ---------------------------------------------------------------------------------------------
# The lifecycle
# ---------------------------------------------------------------------------------------------

RECIPE = ["recipe_sections", "check_recipe"]
RECORDS = ["read_data", "check_records", "check_records"]  # validate checks train, validation
SETUP = RECIPE + RECORDS + [
    "load_tokenizer", "read_data", "tokenize", "tokenize", "model_kwargs", "model_class",
    "load_model", "prepare_base", "prepare_model", "wrap_model", "select_trainable",
    "build_optimizer", "build_scheduler", "train_start"]
EVAL = ["compute_loss", "evaluate", "log", "eval_end"]  # one validation batch
STEP = ["compute_loss", "step_end", "log"]  # one micro-batch per step, logged every step
END = ["steps_done", *EVAL, "save_model", "train_end", "teardown"]
#: Called by `plugtune plan` (and before `plugtune run` loads anything), not by a run itself.
PLANNING = {"plugtune_model_config", "plugtune_estimate_memory", "plugtune_fit_variants"}
#: Called by `plugtune resume` only (test_golden_hook_order_of_a_resumed_run).
RESUME = {"plugtune_load_checkpoint"}
#: Called by `plugtune export`/`generate`/`eval` on a finished run's adapter (test_a_strangers_
#: adapter_exports_and_merges_through_its_own_hooks), and by `export --format`
#: (test_a_strangers_format_exports_the_merged_model).
ARTIFACT = {"plugtune_load_artifact", "plugtune_merge_artifact", "plugtune_export_formats"}
#: Called under DeepSpeed only (tests/test_deepspeed.py; its count checked on every task there).
DEEPSPEED = {"plugtune_count_targets"}


def test_golden_hook_order(quick):
    """Two steps, evaluating and checkpointing after each: no evaluation twice at the last
    step."""
    recorder = testing.HookRecorder()
    testing.run(quick(train={"max_steps": 2, "eval_every": 1, "save_every": 1}),
                extra_plugins=[recorder])
    expected = (SETUP + EVAL + STEP + EVAL + ["save_checkpoint"] + STEP + ["save_checkpoint"]
                + END)
    assert recorder.calls == ["plugtune_" + name for name in expected]
    assert set(recorder.calls) == (set(testing.hook_names()) - PLANNING - RESUME - ARTIFACT
                                   - DEEPSPEED)


@covers("plugtune_count_targets")
def test_count_targets_is_the_count_of_the_loss(quick):
    """causal_lm's up-front count of a batch is the count its loss gives (every built-in task:
    tests/test_deepspeed.py::test_every_task_states_its_count_before_the_forward)."""
    run, _ = set_up(quick())
    batch = run.data["train"].collate(run.data["train"].examples[:3])
    stated = run.pm.hook.plugtune_count_targets(batch=batch, recipe=run.recipe)
    assert int(stated) == int(loop.loss_of(run, run.model, batch).count) > 0


def test_golden_hook_order_of_a_resumed_run(quick):
    """A resumed run loads its checkpoint before train_start and evaluates no baseline."""
    from plugtune import resume

    summary, run = testing.run(quick(train={"max_steps": 2, "save_every": 1}))
    (run.dir / "checkpoints" / "step-2").rename(run.dir / "checkpoints" / "step-1-later")
    shutil.rmtree(run.dir / "model")
    manifest = json.loads((run.dir / "manifest.json").read_text())
    (run.dir / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    recorder = testing.HookRecorder()
    recipe, pm = testing.load_recipe(run.dir / "recipe.yaml", extra_plugins=[recorder],
                                     check_files=False)
    resumed = loop.train(loop.setup(recipe, pm, echo=lambda *a: None), echo=lambda *a: None,
                         resume=(run.dir, run.dir / "checkpoints" / "step-1"))
    # the run's own recipe.yaml is reloaded without checking its files (nor reading records)
    expected = (RECIPE + SETUP[len(RECIPE + RECORDS):-1] + ["load_checkpoint", "train_start"]
                + STEP + ["save_checkpoint"] + END)
    assert recorder.calls == ["plugtune_" + name for name in expected]
    assert resumed["steps"] == 2


@pytest.mark.parametrize("hook", testing.hook_names())
def test_every_hook_has_a_test(hook):
    assert hook in HOOK_TESTS, f"{hook} has no test: add one marked @covers({hook!r})"


def test_the_hook_table_in_the_docs_is_generated_from_the_specs():
    text = DOCS.read_text()
    assert hookdoc.rewrite(text) == text, ("docs/hooks.md's hook table differs from "
                                           "core/hookspecs.py: python -m plugtune.hookdoc "
                                           "docs/hooks.md")


@pytest.mark.parametrize("hook", testing.hook_names())
def test_every_hook_is_documented(hook):
    params = inspect.signature(getattr(hookspecs, hook)).parameters  # names, not annotations
    signature = f"{hook}({', '.join(params)})"
    assert signature in DOCS.read_text(), f"docs/hooks.md does not show {signature}"


# ---------------------------------------------------------------------------------------------
# Recipe phase
# ---------------------------------------------------------------------------------------------


class Greeting(BaseModel):
    model_config = {"extra": "forbid"}
    text: str = "hello"
    times: int = 1


class GreetingPlugin:
    @hookimpl
    def plugtune_recipe_sections(self, register):
        register("greeting", Greeting)


@covers("plugtune_recipe_sections")
def test_recipe_sections_claims_a_validated_section(quick):
    recipe, _ = testing.load_recipe(quick(greeting={"times": 3}), extra_plugins=[GreetingPlugin])
    assert (recipe["greeting"].text, recipe["greeting"].times) == ("hello", 3)
    assert recipe.resolved()["greeting"] == {"text": "hello", "times": 3}
    with pytest.raises(RecipeError) as info:
        testing.load_recipe(quick(greeting={"txet": "hi", "times": "many"}),
                            extra_plugins=[GreetingPlugin])
    assert "greeting.txet: unknown key (did you mean 'text'?)" in str(info.value)
    assert "greeting.times:" in str(info.value)


class LrLimit:
    @hookimpl
    def plugtune_check_recipe(self, recipe):
        if recipe.train.lr > 1e-3:
            return ["train.lr: above 1e-3 diverges with this plugin; use train.lr=1e-4"]


@covers("plugtune_check_recipe")
def test_check_recipe_problems_are_reported_with_all_others(quick):
    with pytest.raises(RecipeError) as info:
        testing.load_recipe(quick(trian={}), extra_plugins=[LrLimit])
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "train.lr: above 1e-3 diverges" in message and "trian: unknown key" in message
    recipe, _ = testing.load_recipe(quick(train={"lr": 1e-4}), extra_plugins=[LrLimit])
    assert recipe.train.lr == 1e-4


# ---------------------------------------------------------------------------------------------
# Data phase
# ---------------------------------------------------------------------------------------------

PLAIN = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:\n{% endif %}")


class PlainTemplate:
    @hookimpl
    def plugtune_load_tokenizer(self, recipe):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(recipe.model.name)
        tokenizer.chat_template = PLAIN
        return tokenizer


@covers("plugtune_load_tokenizer")
def test_load_tokenizer_decides_how_records_are_rendered(quick):
    run, _ = set_up(quick(), PlainTemplate)
    example = run.data["train"].examples[0]
    text = run.tokenizer.decode(example["input_ids"])
    assert text.startswith("user:\nEcho: ") and "<|im_start|>" not in text
    learnt = run.tokenizer.decode([t for t in example["labels"] if t != causal_lm.IGNORE])
    assert learnt == text.split("assistant:\n")[1]  # the answer and its newline


class Generated:
    """Records made in code instead of read from the recipe's files."""

    @hookimpl
    def plugtune_read_data(self, recipe):
        records = [Record({"text": f"zebra {i}"}, "generated", i) for i in range(6)]
        return Splits(records[:4], records[4:])


@covers("plugtune_read_data")
def test_read_data_supplies_the_records(quick):
    run, lines = set_up(quick(), Generated)
    assert [r.data["text"] for r in run.data["train"].records] == [f"zebra {i}" for i in range(4)]
    assert any(line.startswith("data: validation 2 records") for line in lines)


class NoZebras:
    """A task's record check: refuses records that mention zebras."""

    @hookimpl
    def plugtune_check_records(self, split, records):
        return [f"{r.where}: {split} record mentions a zebra" for r in records
                if "zebra" in r.data.get("text", "")]


@covers("plugtune_check_records")
def test_check_records_sees_the_records_the_data_plugin_read(quick, tmp_path):
    path = testing.write_jsonl(tmp_path / "zoo.jsonl", [{"text": "a cat"}, {"text": "a zebra"}])
    recipe = quick(data={"train": str(path), "validation": str(path)})
    with pytest.raises(RecipeError) as caught:
        testing.load_recipe(recipe, extra_plugins=[NoZebras])
    assert caught.value.problems == [f"data.train: {path}:2: train record mentions a zebra",
                                     f"data.validation: {path}:2: validation record mentions "
                                     "a zebra"]
    testing.load_recipe(recipe, extra_plugins=[NoZebras], check_files=False)  # not read then


class FirstThree:
    @hookimpl
    def plugtune_tokenize(self, records, tokenizer, recipe, split):
        return causal_lm.plugtune_tokenize(records=records[:3], tokenizer=tokenizer,
                                           recipe=recipe)


@covers("plugtune_tokenize")
def test_tokenize_decides_the_examples(quick):
    run, lines = set_up(quick(), FirstThree)
    assert len(run.data["train"].examples) == 3
    assert any(line.startswith("data: train 3 records") for line in lines)


# ---------------------------------------------------------------------------------------------
# Model phase
# ---------------------------------------------------------------------------------------------


class EagerAttention:
    @hookimpl
    def plugtune_model_kwargs(self, recipe):
        return {"attn_implementation": "eager"}


@covers("plugtune_model_kwargs")
def test_model_kwargs_reach_from_pretrained(quick):
    run, _ = set_up(quick(), EagerAttention)
    assert run.model.config._attn_implementation == "eager"
    with pytest.raises(PluginError, match="attn_implementation"):
        set_up(quick(), EagerAttention, EagerAttention)


class ThreeWayClassifier:
    """A task head: the model is loaded as a sequence classifier with three labels."""

    @hookimpl
    def plugtune_model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    @hookimpl
    def plugtune_model_kwargs(self, tokenizer):
        return {"num_labels": 3, "pad_token_id": tokenizer.pad_token_id}


@covers("plugtune_model_class")
def test_model_class_decides_what_is_loaded(quick):
    run, _ = set_up(quick(), ThreeWayClassifier)
    assert type(run.model).__name__ == "LlamaForSequenceClassification"
    assert run.model.score.out_features == 3


class OneLayer:
    def __init__(self):
        self.kwargs = None

    @hookimpl
    def plugtune_load_model(self, recipe, model_kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = model_kwargs
        return AutoModelForCausalLM.from_pretrained(recipe.model.name, num_hidden_layers=1,
                                                    **model_kwargs)


@covers("plugtune_load_model")
def test_load_model_supplies_the_model(quick):
    plugin = OneLayer()
    run, lines = set_up(quick(), plugin, EagerAttention)
    assert len(run.model.model.layers) == 1
    assert plugin.kwargs == {"attn_implementation": "eager"}
    total = sum(p.numel() for p in run.model.parameters())
    assert trainable_line(lines).endswith(f"of {total:,} (100.00%)")


class FreezeEmbeddingsEarly:
    @hookimpl
    def plugtune_prepare_base(self, model):
        model.get_input_embeddings().weight.requires_grad_(False)


@covers("plugtune_prepare_base")
def test_prepare_base_changes_the_model_in_place(quick):
    run, lines = set_up(quick(plugins=["causal_lm"]), FreezeEmbeddingsEarly)
    embed = run.model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in run.model.parameters())
    assert trainable_line(lines).startswith(f"parameters: {total - embed:,} trainable")


class Checkpointing:
    @hookimpl
    def plugtune_prepare_model(self, model):
        model.gradient_checkpointing_enable()


@covers("plugtune_prepare_model")
def test_prepare_model_changes_the_model_in_place(quick):
    run, _ = set_up(quick(), Checkpointing)
    assert run.model.is_gradient_checkpointing


class Lora:
    @hookimpl
    def plugtune_wrap_model(self, model):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


@covers("plugtune_wrap_model")
def test_wrap_model_replaces_the_model(quick):
    from peft import PeftModel

    run, lines = set_up(quick(plugins=["causal_lm"]), Lora)
    assert isinstance(run.model, PeftModel)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert trainable_line(lines).startswith(f"parameters: {trainable:,} trainable")
    assert all("lora_" in n for n, p in run.model.named_parameters() if p.requires_grad)


class OnlyNorms:
    @hookimpl
    def plugtune_select_trainable(self, model):
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)


class Nothing:
    @hookimpl
    def plugtune_select_trainable(self, model):
        model.requires_grad_(False)


@covers("plugtune_select_trainable")
def test_select_trainable_decides_what_trains(quick):
    run, lines = set_up(quick(plugins=["causal_lm"]), OnlyNorms)
    norms = sum(p.numel() for n, p in run.model.named_parameters() if "norm" in n)
    assert trainable_line(lines).startswith(f"parameters: {norms:,} trainable")
    with pytest.raises(PluginError, match="no parameter is trainable"):
        set_up(quick(plugins=["causal_lm"]), Nothing)


# ---------------------------------------------------------------------------------------------
# Optimization phase
# ---------------------------------------------------------------------------------------------


class StandStill:
    """SGD at learning rate 0: nothing may change."""

    @hookimpl
    def plugtune_build_optimizer(self, params):
        return torch.optim.SGD(params, lr=0.0)


@covers("plugtune_build_optimizer")
def test_build_optimizer_supplies_the_optimizer(quick, tiny_llama):
    from safetensors.torch import load_file

    summary, run = testing.run(quick(train={"max_steps": 2}), extra_plugins=[StandStill])
    assert summary["eval_after"]["eval_loss"] == summary["eval_before"]["eval_loss"]
    assert [m["lr"] for m in metrics(run) if "lr" in m] == [0.0, 0.0]
    before = load_file(tiny_llama / "model.safetensors")
    after = load_file(Path(summary["artifact"]) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


class HalfLr:
    def __init__(self):
        self.total_steps = None

    @hookimpl
    def plugtune_build_scheduler(self, optimizer, total_steps):
        self.total_steps = total_steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)


@covers("plugtune_build_scheduler")
def test_build_scheduler_sets_the_learning_rate(quick):
    plugin = HalfLr()
    _, run = testing.run(quick(train={"max_steps": 2, "lr": 1e-3}), extra_plugins=[plugin])
    assert plugin.total_steps == 2
    assert [m["lr"] for m in metrics(run) if "lr" in m] == [5e-4, 5e-4]


# ---------------------------------------------------------------------------------------------
# Training phase
# ---------------------------------------------------------------------------------------------


class Notes:
    """Writes a file into the run directory when training starts."""

    @hookimpl
    def plugtune_train_start(self, run):
        (run.dir / "notes.txt").write_text(f"{run.total_steps} steps on {run.model.dtype}\n")


@covers("plugtune_train_start")
def test_train_start_sees_the_run_directory(quick):
    _, run = testing.run(quick(train={"max_steps": 2}), extra_plugins=[Notes])
    assert (run.dir / "notes.txt").read_text() == "2 steps on torch.float32\n"


class PlusHundred:
    """Every target's loss plus 100, as a sum and a count (the hook's contract)."""

    @hookimpl
    def plugtune_compute_loss(self, model, batch, recipe):
        loss = causal_lm.plugtune_compute_loss(model=model, batch=batch, recipe=recipe)
        return Loss(loss.sum + 100.0 * loss.count, loss.count)


class LegacyMean:
    """A plugin written for plugtune 0.1: the micro-batch's mean as a bare tensor."""

    @hookimpl
    def plugtune_compute_loss(self, model, batch):
        return model(**batch).loss + 100.0


@covers("plugtune_compute_loss")
def test_compute_loss_is_the_trained_and_evaluated_loss(quick):
    summary, run = testing.run(quick(), extra_plugins=[PlusHundred])
    logged = metrics(run)
    assert all(m.get("loss", 101) > 100 and m.get("eval_loss", 101) > 100 for m in logged)
    assert summary["eval_before"]["eval_loss"] > 100
    # a bare tensor (the 0.1 contract) still trains, with a warning saying how to migrate
    with pytest.warns(FutureWarning, match=r"return plugtune.Loss\(sum, count\)"):
        summary, run = testing.run(quick(output={"name": "legacy"}), extra_plugins=[LegacyMean])
    assert all(m.get("loss", 101) > 100 for m in metrics(run))


class Figures:
    """Wraps the task's loss and reports two figures with it: the summed loss again (its mean
    over the step's count is the step's loss) and a share with a count of its own."""

    @hookimpl(wrapper=True)
    def plugtune_compute_loss(self, model, batch):
        loss = yield
        rows = torch.tensor(float(batch["input_ids"].shape[0]))
        loss.metrics = {"again": loss.sum.detach(), "rows_share": (rows, 2 * rows)}
        return loss


@pytest.mark.parametrize("batch_size,grad_accum", [(4, 1), (2, 2), (1, 4)])
def test_loss_metrics_are_reported_as_means_over_the_step_and_the_split(quick, batch_size,
                                                                        grad_accum):
    """``Loss.metrics``: summed over micro-batches like the loss, then divided by the step's
    (or the split's) count, or by their own count; the same however the step is split."""
    _, run = testing.run(quick(train={"max_steps": 2, "batch_size": batch_size,
                                      "grad_accum": grad_accum, "eval_every": 1,
                                      "eval_batch_size": 3}),
                         extra_plugins=[Figures()])
    steps = [m for m in metrics(run) if "loss" in m]
    evals = [m for m in metrics(run) if "eval_loss" in m]
    assert len(steps) == 2 and len(evals) == 3
    for m in steps:
        assert m["again"] == pytest.approx(m["loss"], rel=1e-6) and m["rows_share"] == 0.5
    for m in evals:
        assert m["again"] == pytest.approx(m["eval_loss"], rel=1e-6) and m["rows_share"] == 0.5


def test_loss_metrics_do_not_depend_on_the_split_of_a_step(quick):
    runs = []
    for batch_size, grad_accum in [(4, 1), (1, 4)]:
        _, run = testing.run(quick(train={"max_steps": 2, "batch_size": batch_size,
                                          "grad_accum": grad_accum},
                                   output={"name": f"split-{batch_size}"}),
                             extra_plugins=[Figures()])
        runs.append([m["again"] for m in metrics(run) if "loss" in m])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


class StepLog:
    def __init__(self):
        self.seen = []

    @hookimpl
    def plugtune_step_end(self, run, step, metrics):
        self.seen.append((step, run.step, dict(metrics)))


@covers("plugtune_step_end")
def test_step_end_once_per_optimizer_step_with_its_metrics(quick):
    plugin = StepLog()
    _, run = testing.run(quick(train={"max_steps": 2, "batch_size": 4, "grad_accum": 2}),
                         extra_plugins=[plugin])
    assert [(step, now) for step, now, _ in plugin.seen] == [(1, 1), (2, 2)]
    assert [m for _, _, m in plugin.seen] == [m for m in metrics(run) if "loss" in m]
    assert set(plugin.seen[0][2]) >= {"step", "loss", "lr", "tokens_per_s", "epoch"}


class CountAnswers:
    @hookimpl
    def plugtune_evaluate(self, run, step, eval_loss):
        return {"answers": len(run.data["validation"].examples), "evaluated_at": step,
                "loss_seen": eval_loss}


@covers("plugtune_evaluate")
def test_evaluate_adds_metrics_to_metrics_jsonl(quick):
    summary, run = testing.run(quick(train={"max_steps": 2}), extra_plugins=[CountAnswers])
    evals = [m for m in metrics(run) if "eval_loss" in m]
    assert [(m["step"], m["answers"], m["evaluated_at"]) for m in evals] == [(0, 8, 0), (2, 8, 2)]
    assert all(m["loss_seen"] == m["eval_loss"] for m in evals)
    assert summary["eval_after"]["answers"] == 8


class CsvLog:
    def __init__(self):
        self.records = []

    @hookimpl
    def plugtune_log(self, run, record):
        self.records.append(record)
        with open(run.dir / "log.csv", "a") as f:
            f.write(f"{record['step']},{record.get('loss', record.get('eval_loss'))}\n")


@covers("plugtune_log")
def test_log_receives_every_logged_record(quick):
    plugin = CsvLog()
    _, run = testing.run(quick(train={"max_steps": 4, "batch_size": 2, "log_every": 2}),
                         extra_plugins=[plugin])
    assert plugin.records == metrics(run)
    assert [r["step"] for r in plugin.records] == [0, 2, 4, 4]  # eval, train, train, eval
    assert len((run.dir / "log.csv").read_text().splitlines()) == 4


class StateDictOnly:
    @hookimpl
    def plugtune_save_model(self, model, path):
        torch.save(model.state_dict(), path / "weights.pt")
        return "checkpoint"


@covers("plugtune_save_model")
def test_save_model_chooses_format_and_directory(quick):
    summary, run = testing.run(quick(), extra_plugins=[StateDictOnly])
    assert summary["artifact"] == str(run.dir / "checkpoint")
    assert sorted(p.name for p in run.dir.iterdir()) == [
        "checkpoint", "loss.png", "manifest.json", "metrics.jsonl", "recipe.yaml"]
    state = torch.load(run.dir / "checkpoint" / "weights.pt")
    assert set(state) == set(run.accelerator.unwrap_model(run.model).state_dict())


class NormDelta:
    """A stranger's adapter method: a trained offset on the final norm's weight (a
    parametrization), saved in its own format, loaded and merged by its own hooks."""

    PLUGTUNE_ROLES = {"adapter"}

    @staticmethod
    def attach(model):
        for p in model.parameters():
            p.requires_grad_(False)
        norm = model.model.norm
        delta = torch.nn.Parameter(torch.zeros_like(norm.weight))
        torch.nn.utils.parametrize.register_parametrization(norm, "weight", Offset(delta))
        return model

    @hookimpl
    def plugtune_wrap_model(self, model):
        return self.attach(model)

    @hookimpl
    def plugtune_save_model(self, model, tokenizer, path):
        torch.save(model.model.norm.parametrizations.weight[0].delta.detach(), path / "delta.pt")
        tokenizer.save_pretrained(path)
        return "adapter"

    @hookimpl
    def plugtune_load_artifact(self, path, base):
        model = self.attach(base)
        model.model.norm.parametrizations.weight[0].delta.data.copy_(
            torch.load(path / "delta.pt"))
        return model

    @hookimpl
    def plugtune_merge_artifact(self, model):
        torch.nn.utils.parametrize.remove_parametrizations(model.model.norm, "weight")
        return model


class Offset(torch.nn.Module):
    def __init__(self, delta):
        super().__init__()
        self.delta = delta

    def forward(self, weight):
        return weight + self.delta


@covers("plugtune_load_artifact")
@covers("plugtune_merge_artifact")
def test_a_strangers_adapter_exports_and_merges_through_its_own_hooks(quick, tmp_path):
    summary, run = testing.run(quick(plugins=["causal_lm"], train={"max_steps": 3, "lr": 0.05}),
                               extra_plugins=[NormDelta()])
    assert summary["artifact"] == str(run.dir / "adapter")
    assert float(torch.load(run.dir / "adapter" / "delta.pt").abs().max()) > 0  # it trained
    ids = torch.tensor([[3, 17, 42, 5, 99, 23, 7, 64]])
    with torch.no_grad():
        trained = run.model.eval()(input_ids=ids).logits
    installed = testing.with_plugins([NormDelta()])
    loaded = artifacts.load(run.dir, discovered=installed)
    assert loaded.kind == "adapter"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, trained)
    artifacts.export(run.dir, tmp_path / "merged", merge=True, discovered=installed)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained)


class NumpyExport:
    """A stranger's export format: the merged weights as one .npz (active in every run)."""

    PLUGTUNE_DEFAULT = True

    @hookimpl
    def plugtune_export_formats(self):
        return {"npz": self.write}

    def write(self, option, out, load, name):
        import numpy as np

        np.savez(out / f"weights-{option}.npz",
                 **{k: v.float().numpy() for k, v in load().model.state_dict().items()})
        return [f"wrote {name / f'weights-{option}.npz'}"]


@covers("plugtune_export_formats")
def test_a_strangers_format_exports_the_merged_model(quick, tmp_path):
    import numpy as np

    _, run = testing.run(quick(plugins=["causal_lm", "lora"], train={"lr": 0.05}))
    installed = testing.with_plugins([NumpyExport()])
    notes, lines = artifacts.export_format(run.dir, tmp_path / "out", "npz:f32",
                                           discovered=installed)
    assert lines == [f"wrote {tmp_path / 'out' / 'weights-f32.npz'}"]
    written = np.load(tmp_path / "out" / "weights-f32.npz")
    merged = artifacts.load(run.dir, merge=True).model  # the adapter folded in
    assert not any("lora" in key for key in written.files)
    for key, value in merged.state_dict().items():
        np.testing.assert_array_equal(written[key], value.float().numpy())
    twice = testing.with_plugins([NumpyExport(), NumpyExport()])
    with pytest.raises(PlugtuneError, match="'npz' is written by two plugins, NumpyExport and "
                                            "NumpyExport-2"):
        artifacts.export_format(run.dir, tmp_path / "again", "npz:f32", discovered=twice)
    assert not (tmp_path / "again").exists()


class PeftLayerNorm:
    """A stranger's peft method written before plugin API 1.1: it saves with peft_family and
    answers neither artifact hook."""

    PLUGTUNE_ROLES = {"adapter"}

    @hookimpl
    def plugtune_wrap_model(self, model):
        from peft import LNTuningConfig

        return peft_family.wrap(model, LNTuningConfig)

    plugtune_save_model = staticmethod(peft_family.plugtune_save_model)


def test_a_peft_adapter_without_artifact_hooks_still_exports_merged(quick, tmp_path):
    _, run = testing.run(quick(plugins=["causal_lm"], train={"max_steps": 2, "lr": 0.05}),
                         extra_plugins=[PeftLayerNorm()])
    ids = torch.tensor([[3, 17, 42, 5, 99, 23, 7, 64]])
    with torch.no_grad():
        trained = run.model.eval()(input_ids=ids).logits
    artifacts.export(run.dir, tmp_path / "merged", merge=True,
                     discovered=testing.with_plugins([PeftLayerNorm()]))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained)


class Summary:
    @hookimpl
    def plugtune_train_end(self, run, summary):
        (run.dir / "summary.json").write_text(json.dumps(summary, default=str))


@covers("plugtune_train_end")
def test_train_end_receives_the_summary_after_saving(quick):
    summary, run = testing.run(quick(), extra_plugins=[Summary])
    written = json.loads((run.dir / "summary.json").read_text())
    assert written["steps"] == 1 and written["artifact"] == str(run.dir / "model")
    assert set(written) == {"steps", "seconds", "eval_before", "eval_after", "test", "truncated",
                            "trainable", "total", "artifact", "skipped_steps", "stopped_early"}
    assert written["eval_after"] == summary["eval_after"]


class Boom:
    @hookimpl
    def plugtune_step_end(self, step):
        raise RuntimeError(f"boom at step {step}")


class Teardown:
    def __init__(self):
        self.errors = []

    @hookimpl
    def plugtune_teardown(self, run, error):
        self.errors.append(error)


@covers("plugtune_teardown")
def test_teardown_runs_last_and_receives_the_error(quick, tmp_path):
    plugin = Teardown()
    testing.run(quick(), extra_plugins=[plugin])
    assert plugin.errors == [None]
    with pytest.raises(manager.PluginFault) as info:
        testing.run(quick(train={"max_steps": 3}, output={"name": "failed"}),
                    extra_plugins=[Boom, plugin])
    assert str(info.value) == ("plugin Boom (distribution plugtune.testing test) failed in "
                               "plugtune_step_end at step 1: RuntimeError: boom at step 1")
    assert isinstance(info.value.__cause__, RuntimeError)  # the traceback stays available
    assert plugin.errors == [None, info.value]
    failed = tmp_path / "runs" / "failed"
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["status"] == f"failed at step 1: PluginFault: {info.value}"
    assert not (failed / "model").exists()
    # the step had been taken: a checkpoint of it lets `plugtune resume` go on
    assert json.loads((failed / "checkpoints" / "step-1" / "state.json").read_text())["step"] == 1


class StopAtLoss:
    """Stops the run when the held-out loss falls below a bar, as a stranger's plugin would."""

    def __init__(self, bar):
        self.bar, self.seen = bar, []

    @hookimpl
    def plugtune_eval_end(self, run, step, metrics):
        self.seen.append((step, metrics["eval_loss"]))
        if metrics["eval_loss"] < self.bar:
            run.stop(f"eval_loss {metrics['eval_loss']:.3f} below {self.bar}")


@covers("plugtune_eval_end")
def test_eval_end_sees_each_evaluation_and_can_stop_the_run(quick):
    plugin = StopAtLoss(bar=5.5)
    summary, run = testing.run(quick(train={"max_steps": 10, "eval_every": 1}),
                               extra_plugins=[plugin])
    assert [m["step"] for m in metrics(run) if "eval_loss" in m] == [s for s, _ in plugin.seen]
    stop = next(s for s, loss in plugin.seen if s and loss < 5.5)
    assert summary["steps"] == stop < 10  # stopped after that step
    # not evaluated again: the weights are those just evaluated
    assert [s for s, _ in plugin.seen].count(stop) == 1
    assert summary["eval_after"]["eval_loss"] == plugin.seen[-1][1]
    assert json.loads((run.dir / "manifest.json").read_text())["status"].startswith(
        "stopped early: eval_loss")


class Counter:
    """Counts steps and keeps the count in checkpoints (as an EMA plugin keeps its weights)."""

    def __init__(self):
        self.count = 0

    @hookimpl
    def plugtune_step_end(self):
        self.count += 1

    @hookimpl
    def plugtune_save_checkpoint(self, path):
        (path / "counter.txt").write_text(str(self.count))

    @hookimpl
    def plugtune_load_checkpoint(self, path):
        self.count = int((path / "counter.txt").read_text())


@covers("plugtune_save_checkpoint")
def test_save_checkpoint_adds_a_plugins_files(quick):
    _, run = testing.run(quick(train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 2}),
                         extra_plugins=[Counter()])
    kept = sorted((run.dir / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-2", "step-3"]
    assert [(p / "counter.txt").read_text() for p in kept] == ["2", "3"]


@covers("plugtune_load_checkpoint")
def test_load_checkpoint_restores_a_plugins_state(quick):
    from plugtune import resume

    _, run = testing.run(quick(train={"max_steps": 3, "save_every": 1, "keep_checkpoints": None}),
                         extra_plugins=[Counter()])
    shutil.rmtree(run.dir / "checkpoints" / "step-3")
    shutil.rmtree(run.dir / "model")
    counter = Counter()
    counter.count = 100
    recipe, pm = testing.load_recipe(run.dir / "recipe.yaml", extra_plugins=[counter],
                                     check_files=False)
    loop.train(loop.setup(recipe, pm, echo=lambda *a: None), echo=lambda *a: None,
               resume=(run.dir, run.dir / "checkpoints" / "step-2"))
    assert counter.count == 3  # 2 from the checkpoint, then the one step left


class Zeroed:
    """Zeroes the weights after the last step: what is evaluated and saved is what it left."""

    @hookimpl
    def plugtune_steps_done(self, run):
        with torch.no_grad():
            for p in run.model.parameters():
                p.zero_()


@covers("plugtune_steps_done")
def test_steps_done_changes_what_is_evaluated_and_saved(quick):
    from safetensors.torch import load_file

    summary, run = testing.run(quick(), extra_plugins=[Zeroed])
    vocab = run.accelerator.unwrap_model(run.model).config.vocab_size
    assert summary["eval_after"]["eval_loss"] == pytest.approx(math.log(vocab), rel=1e-5)
    saved = load_file(Path(summary["artifact"]) / "model.safetensors")
    assert all(not t.any() for t in saved.values())


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


class TwelveLayers:
    """Answers the config question for the planner: the model as if it had 12 blocks."""

    @hookimpl
    def plugtune_model_config(self, recipe):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(recipe.model.name, num_hidden_layers=12)


@covers("plugtune_model_config")
def test_model_config_is_what_the_planner_plans(quick):
    from plugtune import plan

    recipe, pm = testing.load_recipe(quick(), extra_plugins=[TwelveLayers])
    est = plan.estimate(recipe, pm, "cpu")
    assert len(est.acts.blocks) == 12
    assert "12 blocks" in "\n".join(plan.describe(est))


class ReferenceModel:
    """Holds a frozen copy of the weights for the whole run, and reports it."""

    @hookimpl
    def plugtune_estimate_memory(self, plan):
        plan.add("reference model", sum(p.bytes for p in plan.params), "a frozen copy")


@covers("plugtune_estimate_memory")
def test_estimate_memory_reports_a_plugins_own_bytes(quick):
    from plugtune import plan

    before = plan.estimate(*testing.load_recipe(quick()), "cpu")
    after = plan.estimate(*testing.load_recipe(quick(), extra_plugins=[ReferenceModel]), "cpu")
    assert after.peak().total - before.peak().total == before.weights
    assert any(line.startswith("reference model") for line in plan.describe(after))



class NormOnly:
    """A third party's memory saver: only the final norm trains. It offers itself to
    `plugtune plan --fit` between freezing blocks and adapters."""

    @hookimpl
    def plugtune_fit_variants(self, recipe, blocks):
        from plugtune.plan import Variant

        return [Variant("norm only", 15, ["norm_only"])]

    @hookimpl
    def plugtune_select_trainable(self, model):
        for name, p in model.named_parameters():
            p.requires_grad_(name == "model.norm.weight")


@covers("plugtune_fit_variants")
def test_fit_variants_lets_fit_pick_a_plugins_own_variant(quick, tmp_path):
    """Installed only in this test (not active in the recipe), the plugin's variant is tried in
    the order of its rank and --fit writes it where it is the cheapest that fits."""
    from plugtune import cli, plan

    norm_only = type("norm_only", (NormOnly,), {})
    installed = testing.with_plugins([norm_only])
    path = quick(train={"batch_size": 1, "max_length": 32})

    def total(plugins, *overrides):
        recipe, pm = testing.load_recipe(path, [f"plugins={json.dumps(plugins)}", *overrides],
                                         extra_plugins=[norm_only] * ("norm_only" in plugins))
        return plan.estimate(recipe, pm, "cuda").total()

    ours = total(["causal_lm", "norm_only"])
    assert total(["causal_lm", "freeze", "gradient_checkpointing"],  # freezing: too big
                 "freeze.last_n_blocks=1") > ours
    out, lines = tmp_path / "fit.yaml", []
    args = cli.parser().parse_args(["plan", str(path), "--gpu", f"{ours}B", "--fit",
                                    "--out", str(out)])
    assert plan.command(args, echo=lines.append, discovered=installed) == 0
    tried = [line.strip().split(",")[0] for line in lines if line.startswith("  ")
             and "accumulated" in line]
    assert tried[0] == "full" and tried[-1] == "norm only"
    assert any(t.startswith("freeze") for t in tried) and "lora" not in tried
    written = yaml.safe_load(out.read_text())
    assert written["plugins"] == ["causal_lm", "norm_only"]
    assert "# changed: plugins: full -> norm_only" in out.read_text()
