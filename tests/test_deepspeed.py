"""The same recipe under DeepSpeed ZeRO-2 and ZeRO-3 through accelerate, in two CPU processes
(gloo): training, evaluation over uneven shares, checkpoints, a SIGTERM and `plugtune resume`,
and the final save; the losses, the saved model / adapter and the merged export equal a single
process's. And, without DeepSpeed: every built-in task states a batch's target count before the
forward (``plugtune_count_targets``), equal to the count its loss gives.

DeepSpeed runs on CPUs (its CPU accelerator, gloo), but accelerate 1.15 counts the processes only
on GPUs and other accelerators: under DeepSpeed on CPU processes it reports one process of two
(plugtune refuses that in one line: tested below). This file, run as a script under torchrun
(see the end), has accelerate read the process count from torch.distributed, which DeepSpeed
initialised; everything after (accelerate's DeepSpeed preparation, the engine, plugtune's code)
is what runs on GPUs. See docs/distributed.md. The DeepSpeed tests are skipped where deepspeed
is not installed (``pip install deepspeed``; not in the test extra)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from plugtune import artifacts, cli, hookimpl, testing
from plugtune.loss import cross_entropy

from test_distributed import ENV, TORCHRUN, interrupted, largest_difference
from test_fsdp import evals, recipes  # noqa: F401  (a fixture)
from test_heads import head_recipe, toy_tags, toy_texts
from test_long_runs import SGD, uneven_records
from test_preference import pairs
from test_question_answering import qa_recipe
from test_reward_kto import kto_records, pair_records, recipe_maker

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install deepspeed)")

#: ``PLUGTUNE_DEEPSPEED_ON_GPUS=1`` (benchmarks/gpu_check_distributed.sh): the same tests on two
#: CUDA GPUs, where accelerate counts the processes itself (NCCL), nothing switched
ON_GPUS = os.environ.get("PLUGTUNE_DEEPSPEED_ON_GPUS") == "1"
BASE = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
#: How far two ZeRO processes may be from one process: float32 1e-5; bf16 1e-3, since the
#: engine computes with bf16 copies of the weights (float32 masters kept apart), where one
#: process's autocast computes in bf16 from float32 weights (measured on CPU: 2.5e-4)
TOLERANCE = {"no": 1e-5, "bf16": 1e-3}


def zero(stage):
    return {**BASE, "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}


def under_deepspeed(stage, *tasks, switch=True):
    """``tasks`` one after another in one 2-process torchrun of this file under ZeRO-``stage``:
    ``sgd=RECIPE`` trains with plain SGD, ``run=RECIPE``/``resume=RUN`` are the CLI's."""
    env = {**zero(stage), **({} if switch else {"PLUGTUNE_NO_SWITCH": "1"})}
    return subprocess.run([*TORCHRUN, __file__, *map(str, tasks)], env=env,
                          capture_output=True, text=True, timeout=300)


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                   .splitlines()) if "loss" in r]


@needs_deepspeed
@pytest.mark.parametrize("stage,precision", [(2, "no"), (3, "no"), (2, "bf16"), (3, "bf16")])
def test_zero_trains_saves_and_exports_what_one_process_does(recipes, tmp_path, stage,  # noqa: F811
                                                             precision):
    """Full fine-tuning and LoRA (with early_stopping restoring an earlier best) with plain SGD
    (the update is the gradient) under ZeRO-2/3 on two processes: the loss of every step, the
    held-out losses over uneven shares, the checkpoints, the saved model / adapter and the
    merged export equal one process's accumulating the same step (max |dw| < 1e-5; bf16 mixed
    precision: 1e-3)."""
    cases = {"full": ["full"], "lora": ["lora", "early_stopping"]}
    mixed, tolerance = {"mixed_precision": precision}, TOLERANCE[precision]
    for case, plugins in cases.items():
        one = recipes(f"one-{case}", plugins, 1, **mixed)
        if precision == "no":
            testing.run(one, extra_plugins=[SGD()])
        else:  # a process of its own: this one's accelerate state is float32 for good
            alone = subprocess.run([sys.executable, __file__, f"sgd={one}"], env=BASE,
                                   capture_output=True, text=True, timeout=300)
            assert alone.returncode == 0, alone.stderr[-3000:]
    for case, plugins in cases.items():  # a launch each, as a user runs them (under bf16 a
        # second engine in the same processes aborts at exit, on CPU)
        done = under_deepspeed(stage, f"sgd={recipes(f'two-{case}', plugins, 2, **mixed)}")
        assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "runs"
    for case, artifact, weights in (("full", "model", "model.safetensors"),
                                    ("lora", "adapter", "adapter_model.safetensors")):
        one, two = runs / f"one-{case}", runs / f"two-{case}"
        assert losses(two) == pytest.approx(losses(one), rel=tolerance, abs=1e-6)
        saved = [load_file(r / artifact / weights) for r in (one, two)]
        assert saved[0].keys() == saved[1].keys()
        assert largest_difference(*saved) < tolerance, case
        checkpoints = [load_file(r / "checkpoints" / "step-4" / "trainable.safetensors")
                       for r in (one, two)]
        assert largest_difference(*checkpoints) < tolerance, case
        assert (two / "checkpoints" / "step-4" / "deepspeed").is_dir()  # the engine's state
        if case == "lora":  # early_stopping's best (step 2), saved and restored on each process
            best = [load_file(r / "best" / "trainable.safetensors") for r in (one, two)]
            assert largest_difference(*best) < tolerance
            assert largest_difference(best[1], checkpoints[1]) > 1e-3
            adapter = load_file(two / "adapter" / "adapter_model.safetensors")
            assert largest_difference(
                {k.replace(".default", ""): v for k, v in best[1].items()}, adapter) < 1e-6
        a, b = evals(one), evals(two)
        assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2, 4]
        for x, y in zip(a, b):
            assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=tolerance)
        assert a[0]["eval_loss"] - a[-1]["eval_loss"] > 0.01  # it learned something
    merged = []
    for name in ("one-lora", "two-lora"):
        artifacts.export(runs / name, tmp_path / f"{name}-merged", merge=True,
                         discovered=testing.with_plugins([SGD()]))
        merged.append(load_file(tmp_path / f"{name}-merged" / "model.safetensors"))
    assert largest_difference(*merged) < tolerance


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_stopped_by_sigterm_resumes_as_if_uninterrupted(  # noqa: F811
        recipes, tmp_path, stage, capsys):
    """LoRA with AdamW under ZeRO-2/3: a SIGTERM to torchrun leaves a checkpoint of the last
    step (the adapter whole, the engine's partitioned state in ``deepspeed/``); `plugtune
    resume` under the same launch ends where an uninterrupted run does (1e-6). The checkpoint
    does not resume without DeepSpeed: said in one line."""
    data = testing.write_jsonl(tmp_path / "sixteen.jsonl", uneven_records(16))
    paths = {name: recipes(name, ["lora"], 2, data={"train": str(data)}, max_steps=30,
                           batch_size=1, lr=1e-2, eval_every=None, save_every=None)
             for name in ("cut", "whole")}
    cut = tmp_path / "runs" / "cut"
    stopped = interrupted([*TORCHRUN, __file__, f"run={paths['cut']}"], zero(stage), cut)
    ckpt = cut / "checkpoints" / f"step-{stopped}"
    assert (ckpt / "deepspeed").is_dir()
    weights = load_file(ckpt / "trainable.safetensors")
    assert weights and all("lora_" in k for k in weights)
    single = tmp_path / "runs" / "single"
    subprocess.run(["cp", "-r", str(cut), str(single)], check=True)
    done = under_deepspeed(stage, f"run={paths['whole']}", f"resume={cut}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at step {stopped} of 30" in done.stdout
    expected, got = (load_file(tmp_path / "runs" / n / "adapter" / "adapter_model.safetensors")
                     for n in ("whole", "cut"))
    assert largest_difference(expected, got) < 1e-6
    assert losses(cut)[stopped:] == pytest.approx(losses(tmp_path / "runs" / "whole")[stopped:],
                                                  rel=1e-6)
    capsys.readouterr()
    assert cli.main(["resume", str(single), "train.grad_accum=2"]) != 0
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("plugtune: ")]
    assert len(said) == 1 and "written under DeepSpeed: resume it under DeepSpeed" in said[0]


class Poison:
    """Makes every training loss of optimizer step 2 NaN."""

    def __init__(self):
        self.run = None

    @hookimpl
    def plugtune_train_start(self, run):
        self.run = run

    @hookimpl(wrapper=True)
    def plugtune_compute_loss(self, model):
        loss = yield
        if self.run is not None and model.training and self.run.step == 1:
            loss.sum = loss.sum * float("nan")
        return loss


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_skips_a_non_finite_step_and_shares_uneven_steps_as_one_process(
        recipes, tmp_path, stage):  # noqa: F811
    """7 records in micro-batches of 1, LoRA with SGD: two processes under ZeRO-2/3 share steps
    whose micro-batches do not divide among them (the last: one micro-batch, the other process
    computes a filler) and skip step 2, whose loss is NaN, as one process does: the same
    losses, the same skipped step, the same adapter (1e-5)."""
    data = testing.write_jsonl(tmp_path / "seven.jsonl", uneven_records(7))
    paths = [recipes(name, ["lora"], n, data={"train": str(data)}, max_steps=None, epochs=1,
                     batch_size=1, eval_every=None, save_every=None)
             for name, n in (("one", 1), ("two", 2))]
    testing.run(paths[0], extra_plugins=[SGD(), Poison()])
    done = under_deepspeed(stage, f"poison={paths[1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [[r for r in map(json.loads, (tmp_path / "runs" / n / "metrics.jsonl")
                               .read_text().splitlines()) if "step" in r and "eval_loss" not in r]
               for n in ("one", "two")]
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == [1, 2, 3, 4]
    assert [r.get("skipped") for r in records[1]] == [None, True, None, None]
    assert [r.get("skipped") for r in records[0]] == [None, True, None, None]
    one, two = ([r["loss"] for r in rs] for rs in records)
    assert one[1] is None and two[1] is None  # not finite: logged as null
    assert two[::2] + two[3:] == pytest.approx(one[::2] + one[3:], rel=1e-5)
    saved = [load_file(tmp_path / "runs" / n / "adapter" / "adapter_model.safetensors")
             for n in ("one", "two")]
    assert largest_difference(*saved) < 1e-5


class Uncounted:
    """A stranger's task that replaces causal_lm's loss and states no count up front."""
    PLUGTUNE_REPLACES = {"causal_lm": "plugtune_compute_loss"}

    @hookimpl
    def plugtune_compute_loss(self, model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return cross_entropy(logits, batch["labels"], shift=True)


@needs_deepspeed
def test_a_task_without_an_upfront_count_is_refused_in_one_line(make_recipe):
    recipe = make_recipe(train={"max_steps": 1})
    done = under_deepspeed(2, f"uncounted={recipe}")
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.startswith("plugtune: ")]
    assert lines and all("plugin Uncounted cannot run under DeepSpeed" in x
                         and "plugtune_count_targets" in x for x in lines), done.stderr[-2000:]
    assert "parameters:" not in done.stdout  # refused before the model loaded


@needs_deepspeed
@pytest.mark.parametrize("config,says", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
     "the DeepSpeed config names optimizer: remove it"),
    ({"gradient_clipping": 0.5},
     "the DeepSpeed config's gradient_clipping (0.5) differs from the recipe's "
     "train.max_grad_norm")])
def test_a_deepspeed_config_the_recipe_contradicts_is_refused_in_one_line(make_recipe, tmp_path,
                                                                          config, says):
    """A config file (``accelerate launch --deepspeed_config_file``) naming its own optimizer,
    or clipping otherwise than the recipe: one line, before training."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                                "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", **config}))
    recipe = make_recipe(train={"max_steps": 1, "max_grad_norm": 1.0})
    env = {k: v for k, v in zero(2).items() if k != "ACCELERATE_DEEPSPEED_ZERO_STAGE"}
    done = subprocess.run([*TORCHRUN, __file__, f"run={recipe}"], capture_output=True,
                          env={**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)},
                          text=True, timeout=300)
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.startswith("plugtune: ")]
    assert lines and all(says in x for x in lines), done.stderr[-2000:]


@needs_deepspeed
@pytest.mark.skipif(ON_GPUS, reason="on GPUs accelerate counts the processes")
def test_deepspeed_on_cpu_processes_without_the_switch_is_refused_in_one_line(make_recipe):
    """What accelerate 1.15 does with DeepSpeed on CPU processes (it counts one process of
    two), said in one line before the model loads."""
    recipe = make_recipe(train={"max_steps": 1})
    done = subprocess.run([*TORCHRUN, "-m", "plugtune.cli", "run", str(recipe)], env=zero(2),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.startswith("plugtune: ")]
    assert lines and all("accelerate counts 1" in x and "run DeepSpeed on GPUs" in x
                         for x in lines), done.stderr[-2000:]
    assert "parameters:" not in done.stdout


# ---------------------------------------------------------------------------------------------
# Every built-in task states its count before the forward (no DeepSpeed needed)


class CountCheck:
    """Watches every loss and compares its count with the task's up-front count."""

    def __init__(self):
        self.pm, self.seen = None, []

    @hookimpl
    def plugtune_train_start(self, run):
        self.pm = run.pm

    @hookimpl(wrapper=True)
    def plugtune_compute_loss(self, batch, recipe):
        loss = yield
        if self.pm is not None and loss is not None:
            stated = self.pm.hook.plugtune_count_targets(batch=batch, recipe=recipe)
            self.seen.append((float(torch.as_tensor(stated)), float(torch.as_tensor(loss.count))))
        return loss


TASKS = {
    "causal_lm": lambda mk, tmp, model: mk(train={"batch_size": 3}),
    "causal_lm packed": lambda mk, tmp, model: mk(train={"packing": True, "batch_size": 3}),
    "causal_lm prompt_tuning": lambda mk, tmp, model: mk(plugins=["causal_lm", "prompt_tuning"]),
    "dpo": lambda mk, tmp, model: mk(plugins=["dpo", "lora"], data={"train": str(
        testing.write_jsonl(tmp / "pairs.jsonl", pairs())), "validation": None}),
    "orpo": lambda mk, tmp, model: mk(plugins=["orpo", "lora"], data={"train": str(
        testing.write_jsonl(tmp / "pairs.jsonl", pairs())), "validation": None}),
    "kto": lambda mk, tmp, model: recipe_maker(tmp, model, "kto", kto_records(), 1e-2,
                                               ("lora",))(),
    "reward_model": lambda mk, tmp, model: recipe_maker(tmp, model, "reward_model",
                                                        pair_records(), 1e-3, ("full",))(),
    "sequence_classification weighted": lambda mk, tmp, model: head_recipe(
        tmp, model, "sequence_classification", toy_texts(),
        sequence_classification={"class_weights": "balanced"}),
    "token_classification": lambda mk, tmp, model: head_recipe(
        tmp, model, "token_classification", toy_tags()),
    "question_answering": lambda mk, tmp, model: qa_recipe(tmp, model),
}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_states_its_count_before_the_forward(task, make_recipe, tmp_path,
                                                        tiny_llama):
    """``plugtune_count_targets`` on a batch equals the count of the task's loss on it, for
    every batch of two training steps (micro-batches of uneven sizes and targets)."""
    check = CountCheck()
    path = TASKS[task](make_recipe, tmp_path, tiny_llama)
    testing.run(path, extra_plugins=[check], overrides=["train.max_steps=2",
                                                        "train.eval_every=null"])
    assert check.seen
    assert all(stated == count for stated, count in check.seen), check.seen
    assert any(count > 1 for _, count in check.seen)


def count_processes_from_torch_distributed():
    """Have accelerate read the process count from torch.distributed where DeepSpeed started
    it on CPU processes (accelerate counts one process there, DeepSpeed two)."""
    from accelerate import state

    init = state.PartialState.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if (self.distributed_type == "DEEPSPEED" and self.backend is None
                and torch.distributed.is_initialized()):
            self.backend = torch.distributed.get_backend()
            self.num_processes = torch.distributed.get_world_size()
            self.process_index = torch.distributed.get_rank()
            self.local_process_index = int(os.environ["LOCAL_RANK"])

    state.PartialState.__init__ = counting_init


if __name__ == "__main__":  # under torchrun, from under_deepspeed
    if not ON_GPUS and os.environ.get("PLUGTUNE_NO_SWITCH") != "1":
        count_processes_from_torch_distributed()
    for task in sys.argv[1:]:
        what, path = task.split("=", 1)
        if what == "sgd":
            testing.run(path, extra_plugins=[SGD()])
        elif what == "poison":
            testing.run(path, extra_plugins=[SGD(), Poison()])
        elif what == "uncounted":
            try:
                testing.run(path, extra_plugins=[Uncounted()])
            except Exception as exc:
                sys.exit(f"plugtune: {exc}")
        elif cli.main([what, path]) != 0:
            sys.exit(f"plugtune {what} {path} failed")
    import torch.distributed as dist

    if dist.is_initialized():  # leave the group before the interpreter ends: gloo's threads
        dist.destroy_process_group()  # otherwise may abort the exit ("terminate called ...")
