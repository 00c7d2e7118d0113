"""Does `train.compile: true` pay? The same recipe, batches and steps trained by plugtune's loop
with and without torch.compile of the model's forward, each run in a process of its own, the
two sides interleaved `--repeats` times (so a machine whose load changes treats them alike).

Per side: the first step (compilation included), and the steady steps after `--warmup` steps:
seconds per step, min and median over every repeat's steady steps.

    python benchmarks/compile.py --tiny                    # a 4-layer model of SmolLM2's width
    python benchmarks/compile.py --recipe smollm2-lora     # the real SmolLM2-135M (slow to compile)
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from plugtune import hookimpl  # noqa: E402


class Timer:
    """Times every optimizer step from the end of the one before (the first from train start:
    compilation happens in its forward pass)."""

    def __init__(self):
        self.ticks = []

    @hookimpl
    def plugtune_train_start(self, run):
        self.ticks.append(time.perf_counter())

    @hookimpl
    def plugtune_step_end(self, run, step, metrics):
        self.ticks.append(time.perf_counter())


def side(args, compiled, workdir):
    from plugtune import loop, testing

    timer = Timer()
    overrides = [f"train.compile={str(compiled).lower()}",
                 f"train.max_steps={1 + args.warmup + args.steps}", f"train.batch_size={args.batch_size}", f"train.max_length={args.max_length}",
                 "train.eval_every=null", "output.save_model=false", f"output.dir={workdir}",
                 "train.grad_accum=1"]
    overrides += args.set
    if args.tiny:  # a random model and random text its tokenizer knows
        rng = random.Random(0)
        words = "river stone cloud tiger piano lemon candle garden window silver".split()
        texts = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(64)]
        model = testing.tiny_model(Path(workdir) / "model", "llama", texts, layers=4, hidden=576)
        data = testing.write_jsonl(Path(workdir) / "text.jsonl", [{"text": t} for t in texts])
        overrides += [f"model.name={model}", f"data.train={data}", f"data.validation={data}"]
    recipe, pm = testing.load_recipe(args.recipe, overrides, extra_plugins=[timer])
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    loop.train(run, echo=lambda *a: None)
    steps = [b - a for a, b in zip(timer.ticks, timer.ticks[1:])]
    return {"first": steps[0], "steady": steps[1 + args.warmup:]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-lora")
    ap.add_argument("--tiny", action="store_true",
                    help="a random 4-layer llama of SmolLM2's width instead of the recipe's model")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="steps after the first left out")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for both sides (model.name=DIR, model.dtype=...)")
    ap.add_argument("--side", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(side(args, args.side == "compiled", workdir)))
        return 0
    results = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name in results:
            out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]),
                                  "--side", name], capture_output=True, text=True,
                                 check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'tiny 4-layer' if args.tiny else args.recipe}: {args.repeats} x (first step + "
          f"{args.warmup} warm-up + {args.steps} steps of {args.batch_size} x {args.max_length}); s/step")
    for name, runs in results.items():
        steady = [s for r in runs for s in r["steady"]]
        first = [r["first"] for r in runs]
        print(f"  {name:<9} first step {min(first):7.2f} s (min of {len(first)}); steady "
              f"min {min(steady):.3f}  median {statistics.median(steady):.3f}")
    ratio = (statistics.median(s for r in results["eager"] for s in r["steady"])
             / statistics.median(s for r in results["compiled"] for s in r["steady"]))
    print(f"  steady speed-up from compiling (median eager / median compiled): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
