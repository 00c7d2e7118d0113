"""Long runs you can trust: a token-exact objective, evaluation independent of its batch size,
what is logged is what happened, data order from the seed alone, the NaN guard, the stop
control and early stopping, checkpoints, and `plugtune reproduce`. (Killing real runs and
resuming them is tests/test_resume.py.)"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plugtune import Loss, cli, hookimpl, loop, testing
from plugtune.data import Record
from plugtune.errors import RecipeError
from plugtune.plugins import causal_lm

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]


def uneven_records(n=8):
    """``n`` text records from 1 to about 120 tokens: a micro-batch's own mean and the step's
    token mean weigh them very differently."""
    return [{"text": " ".join(WORDS[(i + j) % 8] for j in range(1 + (i * 37) % 60 * (i % 2)))}
            for i in range(n)]


class SGD:
    """Plain SGD, so the update is the gradient itself (AdamW's first step is about lr times
    its sign, which hides how the gradient was scaled)."""

    @hookimpl
    def plugtune_build_optimizer(self, params, recipe):
        return torch.optim.SGD(params, lr=recipe.train.lr)


class MeanOfMicroBatches:
    """The plugtune 0.1 contract: each micro-batch's own mean as a bare tensor."""

    @hookimpl
    def plugtune_compute_loss(self, model, batch):
        return model(**batch).loss


@pytest.fixture
def uneven(make_recipe, tmp_path):
    data = testing.write_jsonl(tmp_path / "uneven.jsonl", uneven_records())

    def make(name, **train):
        return make_recipe(f"{name}.yaml", data={"train": str(data), "validation": str(data)},
                           train={"max_steps": 1, "lr": 0.5, "max_grad_norm": None,
                                  "eval_every": None, **train},
                           output={"name": name})
    return make


def weights(path):
    return load_file(path / "model.safetensors")


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


SPLITS = [(8, 1), (4, 2), (2, 4), (1, 8)]


def test_one_step_is_the_same_however_the_batch_is_split(uneven):
    """8 examples of very uneven length, one optimizer step as 8x1, 4x2, 2x4 and 1x8: the same
    weights (float32). With the old per-micro-batch mean they differ: the test can fail."""
    runs = {}
    for plugins, label in (([SGD], "tokens"), ([SGD, MeanOfMicroBatches], "means")):
        for batch, accum in SPLITS:
            name = f"{label}-{batch}x{accum}"
            summary, _ = testing.run(uneven(name, batch_size=batch, grad_accum=accum),
                                     extra_plugins=[p() for p in plugins])
            runs[name] = weights(Path(summary["artifact"]))
    for batch, accum in SPLITS[1:]:
        assert max_difference(runs["tokens-8x1"], runs[f"tokens-{batch}x{accum}"]) < 1e-5
    assert max_difference(runs["means-8x1"], runs["means-1x8"]) > 1e-3


def test_two_processes_take_the_same_step_as_one(uneven, tmp_path):
    """2 CPU processes x 4x1 (torchrun) == 1 process x 8x1 == 1 process x 1x8, with AdamW over
    two optimizer steps (16 examples)."""
    data = testing.write_jsonl(tmp_path / "sixteen.jsonl", uneven_records(16))
    over = [f"data.train={data}", f"data.validation={data}", "train.max_steps=2", "train.lr=1e-3"]
    one, _ = testing.run(uneven("one", batch_size=8), over)
    accumulated, _ = testing.run(uneven("accum", batch_size=1, grad_accum=8), over)
    recipe = uneven("two", batch_size=1, grad_accum=4)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "plugtune.cli", "run", str(recipe), *over],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = weights(tmp_path / "runs" / "two" / "model")
    reference = weights(Path(one["artifact"]))
    assert max_difference(reference, weights(Path(accumulated["artifact"]))) < 1e-5
    assert max_difference(reference, two) < 1e-5
    logged = [json.loads(line) for line in
              (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in
            (Path(one["artifact"]).parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in ones], rel=1e-5)


def test_eval_loss_does_not_depend_on_the_eval_batch_size(uneven):
    recipe, pm = testing.load_recipe(uneven("eval"))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    losses = []
    for size in (1, 3, 8):
        run.recipe.train.eval_batch_size = size
        losses.append(loop.evaluate(run, 0)["eval_loss"])
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)
    # and it is the mean over every target token of the split
    data = run.data["validation"]
    batch = data.collate(data.examples)
    with torch.no_grad():
        logits = run.model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert losses[0] == pytest.approx(per_token.item(), rel=1e-5)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_logged_lr_is_the_rate_the_step_was_taken_at(make_recipe):
    summary, run = testing.run(make_recipe(train={"max_steps": 4, "warmup_steps": 4,
                                                  "lr": 1e-3, "schedule": "linear"}))
    lrs = [m["lr"] for m in metrics(run.dir) if "loss" in m]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # a single warm-up step is taken at a rate above 0: it changes the model
    summary, run = testing.run(make_recipe(train={"max_steps": 1, "warmup_steps": 2,
                                                  "lr": 1e-3}, output={"name": "one"}))
    assert [m["lr"] for m in metrics(run.dir) if "loss" in m] == [5e-4]
    assert summary["eval_after"]["eval_loss"] != summary["eval_before"]["eval_loss"]


class SlowEvaluation:
    @hookimpl
    def plugtune_evaluate(self):
        time.sleep(0.4)


def test_tokens_per_s_leaves_evaluation_time_out(make_recipe):
    _, run = testing.run(make_recipe(train={"max_steps": 6, "eval_every": 2}),
                         extra_plugins=[SlowEvaluation])
    rates = {m["step"]: m["tokens_per_s"] for m in metrics(run.dir) if "loss" in m}
    after_eval = [rates[3], rates[5]]
    others = sorted([rates[2], rates[4], rates[6]])
    assert min(after_eval) > 0.2 * others[1]


class SeenBatches:
    """Records the training batches the task plugin is given."""

    def __init__(self):
        self.batches, self.modes = [], []

    @hookimpl(wrapper=True)
    def plugtune_compute_loss(self, model, batch):
        if model.training:
            self.batches.append(batch["input_ids"].tolist())
        self.modes.append(model.training)
        return (yield)


def test_data_order_depends_on_the_seed_alone(make_recipe):
    """Full fine-tuning and LoRA of two ranks draw different numbers of random numbers while
    the model is built; with the same seed they see the same batches."""
    seen = []
    for plugins, lora, name in ((["causal_lm", "full"], None, "full"),
                                (["causal_lm", "lora"], {"r": 4}, "r4"),
                                (["causal_lm", "lora"], {"r": 16}, "r16")):
        plugin = SeenBatches()
        sections = {"lora": lora} if lora else {}
        testing.run(make_recipe(f"{name}.yaml", plugins=plugins, output={"name": name},
                                train={"max_steps": 6, "batch_size": 4}, **sections),
                    extra_plugins=[plugin])
        seen.append(plugin.batches)
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 6
    other = SeenBatches()
    testing.run(make_recipe("seed1.yaml", output={"name": "seed1"},
                            train={"max_steps": 6, "batch_size": 4, "seed": 1}),
                extra_plugins=[other])
    assert other.batches != seen[0]


def test_training_runs_in_train_mode_without_any_evaluation(make_recipe):
    plugin = SeenBatches()
    summary, run = testing.run(make_recipe(train={"max_steps": 2, "eval_every": None}),
                               extra_plugins=[plugin])
    assert plugin.modes == [True, True]  # no evaluation at all, and dropout on
    assert summary["eval_before"] is None and summary["eval_after"] is None
    assert all("eval_loss" not in m for m in metrics(run.dir))


def bos_tokenizer(path):
    """The tiny test tokenizer, made to add its BOS token as Llama's does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def test_text_and_prompt_records_start_with_the_tokenizers_bos(tiny_llama):
    from transformers import AutoTokenizer

    tok = bos_tokenizer(tiny_llama)
    assert tok("hello")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds one itself
    prefix = causal_lm.special_prefix(tok)
    assert prefix == [tok.bos_token_id]
    ids, labels, _, _ = causal_lm.encode(Record({"text": "hello world"}, "f", 1), tok, prefix)
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    assert ids[1:-1] == tok("hello world", add_special_tokens=False)["input_ids"]
    ids, labels, prompt, _ = causal_lm.encode(
        Record({"prompt": "Echo: apple", "completion": " APPLE"}, "f", 1), tok, prefix)
    assert ids[0] == prompt[0] == tok.bos_token_id
    # the prompt fed to generate at evaluation is what `plugtune generate` feeds too
    assert prompt == tok("Echo: apple")["input_ids"]
    # a tokenizer that adds nothing (GPT-2 style) gets nothing
    assert causal_lm.special_prefix(AutoTokenizer.from_pretrained(tiny_llama)) == []


@pytest.mark.parametrize("plugins", [["causal_lm", "full"], ["causal_lm", "freeze"]])
def test_float16_weights_that_train_are_refused_before_loading(make_recipe, plugins):
    recipe = make_recipe(plugins=plugins, model={"name": "unused", "dtype": "float16"},
                         freeze={"last_n_blocks": 1})
    with pytest.raises(RecipeError, match="model.dtype: float16 weights cannot train"):
        testing.load_recipe(recipe)


@pytest.mark.parametrize("key,value", [("lr", ".inf"), ("lr", ".nan"),
                                       ("weight_decay", ".inf"), ("max_grad_norm", ".nan")])
def test_non_finite_numbers_are_refused(make_recipe, key, value):
    with pytest.raises(RecipeError, match=f"train.{key}"):
        testing.load_recipe(make_recipe(), [f"train.{key}={value}"])


def test_a_diverging_run_stops_and_saves_no_model(make_recipe, tmp_path, capsys):
    recipe = make_recipe(train={"max_steps": 10, "lr": 1e30, "max_grad_norm": None,
                                "save_every": 1, "keep_checkpoints": 1})
    assert cli.main(["run", str(recipe)]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("plugtune")]
    assert len(err) == 1 and err[0].startswith("plugtune: error: training diverged: 3 ")
    assert "learning rate is too high" in err[0] and "no gradient clipping" in err[0]
    run_dir = tmp_path / "runs" / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"].startswith("failed at step 4: Diverged: training diverged")
    assert not (run_dir / "model").exists()
    # the last good checkpoint is the one before the bad steps, and holds finite weights
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step-1"]
    saved = load_file(run_dir / "checkpoints" / "step-1" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    bad = [m for m in metrics(run_dir) if m.get("skipped")]
    assert [m["step"] for m in bad] == [2, 3, 4]
    assert all(m["loss"] is None or m["grad_norm"] is None for m in bad)


class NanAtStep:
    """A loss that is NaN on the training micro-batches of some optimizer steps (counted as
    training micro-batches: one per step without accumulation)."""

    def __init__(self, *steps):
        self.steps, self.calls = steps, 0

    @hookimpl(wrapper=True)
    def plugtune_compute_loss(self, model):
        loss = yield
        if model.training:
            self.calls += 1
            if self.calls in self.steps:
                return Loss(loss.sum * float("nan"), loss.count, loss.metrics)
        return loss


def test_a_non_finite_step_is_skipped_and_counted(make_recipe):
    snapshot = testing.WeightSnapshot()
    summary, run = testing.run(make_recipe(train={"max_steps": 4}),
                               extra_plugins=[NanAtStep(2), snapshot])
    assert summary["skipped_steps"] == 1
    logged = [m for m in metrics(run.dir) if "loss" in m]
    assert [m.get("skipped", False) for m in logged] == [False, True, False, False]
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert math.isfinite(summary["eval_after"]["eval_loss"])
    assert json.loads((run.dir / "manifest.json").read_text())["status"] == "completed"


def test_early_stopping_keeps_and_restores_the_best(make_recipe, capsys):
    """With mode max, a falling loss never improves: the run stops after `patience`
    evaluations, the model is the one of the first evaluation."""
    recipe = make_recipe(plugins=["causal_lm", "full", "early_stopping"],
                         train={"max_steps": 30, "eval_every": 2},
                         early_stopping={"metric": "eval_loss", "mode": "max", "patience": 2})
    assert cli.main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    run_dir = recipe.parent / "runs" / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == ("stopped early: eval_loss has not improved for 2 "
                                  f"evaluations (best {manifest_best(run_dir):.4g} at step 2)")
    assert "stopped early" in out and manifest["steps"] == 6
    evals = [m for m in metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4, 6, 6]
    assert evals[-1]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-6)
    assert json.loads((run_dir / "best" / "state.json").read_text())["step"] == 2
    assert weights(run_dir / "model").keys() >= {"model.norm.weight"}


def manifest_best(run_dir):
    return [m for m in metrics(run_dir) if "eval_loss" in m][1]["eval_loss"]


def test_early_stopping_needs_evaluations(make_recipe):
    with pytest.raises(RecipeError, match="early_stopping: needs evaluations"):
        testing.load_recipe(make_recipe(plugins=["causal_lm", "full", "early_stopping"]))


def test_checkpoints_hold_what_trains_and_keep_the_newest(make_recipe):
    _, run = testing.run(make_recipe(plugins=["causal_lm", "lora"], lora={"r": 4},
                                     train={"max_steps": 5, "save_every": 2}))
    kept = sorted(p.name for p in (run.dir / "checkpoints").iterdir())
    assert kept == ["step-2", "step-4"]  # keep_checkpoints: 2 by default; nothing half-written
    ckpt = run.dir / "checkpoints" / "step-4"
    assert {p.name for p in ckpt.iterdir()} == {"trainable.safetensors", "optimizer.pt",
                                                "scheduler.pt", "rng.pt", "state.json",
                                                "checksums.json"}
    saved = load_file(ckpt / "trainable.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapter only, not the base
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4


def test_reproduce_says_identical_or_where_it_differs(make_recipe, capsys):
    summary, run = testing.run(make_recipe(train={"max_steps": 4}))
    assert cli.main(["reproduce", str(run.dir)]) == 0
    assert "identical: the loss of all 4 steps compared" in capsys.readouterr().out
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    changed = [json.dumps({**json.loads(x), "loss": 9.0}) if '"step": 3' in x and '"loss"' in x
               else x for x in lines]
    (run.dir / "metrics.jsonl").write_text("\n".join(changed) + "\n")
    assert cli.main(["reproduce", str(run.dir), "--steps", "2"]) == 0
    assert cli.main(["reproduce", str(run.dir)]) == 1
    assert "differs from step 3: recorded loss 9.0" in capsys.readouterr().out


def test_group_by_length_pads_less_and_keeps_every_example_once(uneven, tmp_path):
    data = testing.write_jsonl(tmp_path / "many.jsonl", uneven_records(64))
    recipe, _ = testing.load_recipe(uneven("grouped", batch_size=4),
                                    [f"data.train={data}", "train.group_by_length=true"])
    lengths = [1 + (i * 7919) % 97 for i in range(64)]

    def padding(t):
        plan = loop.epoch_plan(lengths, t, 0, 0, 1)
        batches = [indices for step in plan for indices, _ in step]
        assert sorted(i for b in batches for i in b) == list(range(64))  # each once
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
                   for b in batches), batches

    grouped, batches = padding(recipe.train)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest goes first
    assert padding(recipe.train)[1] == batches  # the seed decides
    recipe.train.group_by_length = False
    assert grouped < padding(recipe.train)[0] / 3
