"""The same recipe under FSDP2 through accelerate, in two CPU processes (gloo): training,
evaluation over uneven shares, checkpoints, a SIGTERM and `plugtune resume`, and the final save
gather the sharded state; the saved model, adapter and merged export equal a single process's.

accelerate 1.15 starts FSDP only on GPUs (and other accelerators): on CPU processes it runs DDP
even with ``ACCELERATE_USE_FSDP=true`` (plugtune says so in one line: tested below). torch's
FSDP2 itself runs on CPU with gloo, so this file, run as a script under torchrun (see the end),
switches accelerate's engine choice from multi-CPU to FSDP before plugtune starts: everything
after that choice (accelerate's FSDP2 preparation, ``get_state_dict``, plugtune's code) is what
runs on GPUs. See docs/distributed.md."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from plugtune import artifacts, cli, testing

from test_distributed import ENV, TORCHRUN, interrupted, largest_difference
from test_long_runs import SGD, uneven_records

#: ``PLUGTUNE_FSDP_ON_GPUS=1`` (benchmarks/gpu_check_distributed.sh): the same tests on two CUDA
#: GPUs, where accelerate chooses FSDP itself (NCCL), nothing switched
ON_GPUS = os.environ.get("PLUGTUNE_FSDP_ON_GPUS") == "1"
FSDP = {**({k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"} if ON_GPUS else ENV),
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}


def under_fsdp(*tasks, env=FSDP):
    """``tasks`` one after another in one 2-process torchrun of this file under FSDP2:
    ``sgd=RECIPE`` trains with plain SGD, ``run=RECIPE``/``resume=RUN`` are the CLI's."""
    return subprocess.run([*TORCHRUN, __file__, *map(str, tasks)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def recipes(make_recipe, tmp_path):
    """``recipe(name, plugins, processes)``: the echo task, 4 optimizer steps of 8 sequences
    (batch 4 x 2 micro-batches on one process, x 1 on each of two); 5 held-out records in
    batches of 2, which two processes share unevenly (2 batches and 1)."""
    held_out = testing.write_jsonl(tmp_path / "held.jsonl", [
        {"messages": [{"role": "user", "content": f"Echo: {w}"},
                      {"role": "assistant", "content": w.upper()}]}
        for w in ("apple", "river", "stone", "cloud", "tiger")])

    def recipe(name, plugins, processes, data=None, **train):
        # no LoRA dropout: each process draws its own masks
        sections = {"lora": {"dropout": 0.0}} if "lora" in plugins else {}
        if "nf4" in plugins:  # 4-bit values packed in bfloat16, which FSDP can shard
            sections["nf4"] = {"quant_storage": "bfloat16"}
        if "early_stopping" in plugins:  # the best is the worse loss: step 2's, restored
            sections["early_stopping"] = {"metric": "eval_loss", "mode": "max", "patience": 5}
        return make_recipe(f"{name}.yaml", plugins=["causal_lm", *plugins], **sections,
                           data={"validation": str(held_out), **(data or {})},
                           train={"max_steps": 4, "batch_size": 4, "grad_accum": 2 // processes,
                                  "lr": 0.05, "eval_every": 2, "eval_batch_size": 2,
                                  "save_every": 2, **train},
                           output={"name": name})
    return recipe


def evals(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in r]


def test_fsdp_trains_saves_and_exports_what_one_process_does(recipes, tmp_path):
    """Full fine-tuning, LoRA (with early_stopping restoring an earlier best) and QLoRA (the
    4-bit base packed in bfloat16, sharded) with plain SGD (the update is the gradient): two
    FSDP2 processes save the model / adapter one process saves (max |dw| < 1e-5), evaluate the
    same losses and exact match over uneven shares, write whole (not sharded) checkpoints, and
    the merged export of the LoRA run equals one process's."""
    cases = {"full": ["full"], "lora": ["lora", "early_stopping"], "qlora": ["nf4", "lora"]}
    for case, plugins in cases.items():
        testing.run(recipes(f"one-{case}", plugins, 1), extra_plugins=[SGD()])
    done = under_fsdp(*(f"sgd={recipes(f'two-{case}', plugins, 2)}"
                        for case, plugins in cases.items()))
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "runs"
    for case, artifact, weights in (("full", "model", "model.safetensors"),
                                    ("lora", "adapter", "adapter_model.safetensors"),
                                    ("qlora", "adapter", "adapter_model.safetensors")):
        one, two = runs / f"one-{case}", runs / f"two-{case}"
        saved = [load_file(r / artifact / weights) for r in (one, two)]
        assert largest_difference(*saved) < 1e-5, case
        checkpoints = [load_file(r / "checkpoints" / "step-4" / "trainable.safetensors")
                       for r in (one, two)]
        assert largest_difference(*checkpoints) < 1e-5, case
        if case == "lora":  # early_stopping's best (step 2), saved and restored on each process
            best = [load_file(r / "best" / "trainable.safetensors") for r in (one, two)]
            assert largest_difference(*best) < 1e-5
            assert largest_difference(best[1], checkpoints[1]) > 1e-3
            adapter = load_file(two / "adapter" / "adapter_model.safetensors")
            assert largest_difference(
                {k.replace(".default", ""): v for k, v in best[1].items()}, adapter) < 1e-6
        a, b = evals(one), evals(two)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [r["step"] for r in a] == [0, 2, 4]  # 4: the final one (lora: of step 2's)
        for x, y in zip(a, b):
            assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=1e-5)
            assert y["exact_match"] == x["exact_match"]
        assert a[0]["eval_loss"] - a[-1]["eval_loss"] > 0.01  # it learned something
    merged = []
    for name in ("one-lora", "two-lora"):
        artifacts.export(runs / name, tmp_path / f"{name}-merged", merge=True,
                         discovered=testing.with_plugins([SGD()]))  # its recipe names SGD
        merged.append(load_file(tmp_path / f"{name}-merged" / "model.safetensors"))
    assert largest_difference(*merged) < 1e-5


def test_fsdp_run_stopped_by_sigterm_resumes_as_if_uninterrupted(recipes, tmp_path):
    """LoRA with AdamW under FSDP2: a SIGTERM to torchrun leaves a checkpoint of the last step
    (gathered from both processes' shards, the optimizer state keyed by name); `plugtune
    resume` under FSDP2 loads it back into the shards and ends where an uninterrupted run
    does; the same checkpoint also resumes in one process."""
    data = testing.write_jsonl(tmp_path / "sixteen.jsonl", uneven_records(16))

    paths = {name: recipes(name, ["lora"], 2, data={"train": str(data)}, max_steps=30,
                           batch_size=1, lr=1e-2, eval_every=None, save_every=None)
             for name in ("cut", "whole")}
    cut = tmp_path / "runs" / "cut"
    stopped = interrupted([*TORCHRUN, __file__, f"run={paths['cut']}"], FSDP, cut)
    ckpt = cut / "checkpoints" / f"step-{stopped}"
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert all(isinstance(k, str) for k in optimizer["state"]) and optimizer["state"]
    weights = load_file(ckpt / "trainable.safetensors")
    assert weights and all("lora_" in k for k in weights)
    single = tmp_path / "runs" / "single"
    subprocess.run(["cp", "-r", str(cut), str(single)], check=True)
    done = under_fsdp(f"run={paths['whole']}", f"resume={cut}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at step {stopped} of 30" in done.stdout
    expected, got = (load_file(tmp_path / "runs" / n / "adapter" / "adapter_model.safetensors")
                     for n in ("whole", "cut"))
    assert largest_difference(expected, got) < 1e-6
    # the FSDP checkpoint in one process (no FSDP, 2 micro-batches a step in place of 2
    # processes): the optimizer state loads by name
    assert cli.main(["resume", str(single), "train.grad_accum=2"]) == 0
    alone = load_file(single / "adapter" / "adapter_model.safetensors")
    assert largest_difference(expected, alone) < 1e-5


@pytest.mark.skipif(ON_GPUS, reason="on GPUs accelerate starts FSDP")
def test_fsdp_asked_on_cpu_processes_says_they_run_as_ddp(make_recipe):
    """What accelerate does with FSDP on CPU processes (DDP), said in one line."""
    recipe = make_recipe(train={"max_steps": 1, "eval_every": None})
    done = subprocess.run([*TORCHRUN, "-m", "plugtune.cli", "run", str(recipe)], env=FSDP,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("warning: FSDP was asked for, but accelerate starts it only on "
                             "GPUs") == 1
    assert "run as DDP" in done.stdout


def test_fsdp1_is_refused_in_one_line(make_recipe):
    recipe = make_recipe(train={"max_steps": 1})
    done = under_fsdp(f"run={recipe}", env={**FSDP, "FSDP_VERSION": "1"})
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.startswith("plugtune: ")]
    assert lines and all("FSDP1 is not supported: launch with FSDP2" in x for x in lines)
    assert "Traceback" not in done.stderr.split("torch/distributed/elastic")[0]  # torchrun's


def force_fsdp_on_cpu():
    """Make accelerate choose FSDP for CPU processes (it chooses DDP there): the plugin comes
    from the environment, as ``accelerate launch --use_fsdp`` sets it."""
    from accelerate import state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = state.AcceleratorState.__init__

    def fsdp_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = FullyShardedDataParallelPlugin()
            self.distributed_type = DistributedType.FSDP

    state.AcceleratorState.__init__ = fsdp_init


if __name__ == "__main__":  # under torchrun, from under_fsdp
    if not ON_GPUS:
        force_fsdp_on_cpu()
    for task in sys.argv[1:]:
        what, path = task.split("=", 1)
        if what == "sgd":
            testing.run(path, extra_plugins=[SGD()])
        elif cli.main([what, path]) != 0:
            sys.exit(f"plugtune {what} {path} failed")
