"""Peak memory of fine-tuning SmolLM2-135M-Instruct four ways: full, lora, int8+lora, nf4+lora,
and LoRA again with the loss unchunked (``causal_lm.loss_chunk_tokens=null``: the float32
logits of the whole micro-batch held at once), beside the planner's figure for each.

Each configuration is its shipped recipe (recipes/smollm2-*.yaml) run by plugtune's own loop
for the same steps, batch size and sequence length, in a process of its own, so that each peak
is that configuration's alone. The table gives the bytes of the model's weights and buffers
(``get_memory_footprint``: what quantization shrinks), each process's peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: loading included), its peak while training
only (Linux: the high-water mark ``VmHWM`` reset through ``/proc/self/clear_refs`` once the
model is loaded), and both as a ratio to full fine-tuning. On a CUDA machine it also gives
``torch.cuda.max_memory_allocated``.

    python benchmarks/memory.py                  # 3 steps of 4 x 128 tokens each
    python benchmarks/memory.py --steps 5 --batch-size 8 --max-length 256
    python benchmarks/memory.py --configs lora "lora, loss unchunked" --batch-size 8 --max-length 512
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"full": "smollm2-full", "lora": "smollm2-lora", "int8+lora": "smollm2-int8-lora",
           "nf4+lora": "smollm2-nf4-lora", "lora, loss unchunked": "smollm2-lora"}
EXTRA = {"lora, loss unchunked": ["causal_lm.loss_chunk_tokens=null"]}
DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_high_water_mark():
    """Restart the kernel's peak-RSS count from the current RSS (Linux >= 4.0); False where
    that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def high_water_mark_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def child(args):
    """Run one configuration and print its measurements as one JSON line."""
    import bitsandbytes  # noqa: F401  (the fixed cost of every configuration)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from plugtune import loop, plan, recipe as recipes

    baseline = peak_mb()
    overrides = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                 f"train.eval_batch_size={args.batch_size}", "train.grad_accum=1",
                 f"train.max_length={args.max_length}", "train.eval_every=null",
                 "causal_lm.exact_match=false", "output.save_model=false",
                 f"output.dir={args.workdir}", f"data.train={args.workdir}/train.jsonl",
                 f"data.validation={args.workdir}/validation.jsonl", *args.extra]
    recipe, pm = recipes.load_recipe(args.child, overrides)
    planned = plan.estimate(recipe, pm, "cpu").total() / 2**20
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    reset = reset_high_water_mark()
    start = time.perf_counter()
    summary = loop.train(run, echo=lambda *a: None)
    result = {"peak_mb": peak_mb(), "baseline_mb": baseline,
              "weights_mb": run.model.get_memory_footprint() / 2**20,
              "training_peak_mb": high_water_mark_mb() if reset else None,
              "trainable": summary["trainable"], "seconds": time.perf_counter() - start,
              "planned_mb": planned}
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def write_data(workdir, args):
    """The first records of the quickstart data: as many as the steps use, and one batch for
    evaluation (before and after training)."""
    for name, out, n in (("quickstart_train.jsonl", "train.jsonl", args.steps * args.batch_size),
                         ("quickstart_eval.jsonl", "validation.jsonl", args.batch_size)):
        lines = (DATA / name).read_text().splitlines(keepends=True)[:n]
        (Path(workdir) / out).write_text("".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--extra", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from plugtune.plugins import hf
    from plugtune.recipe import load_recipe

    # Convert the GGUF once, here, so that no configuration's peak includes the conversion.
    hf.local_model_dir(load_recipe(CONFIGS["full"])[0].model.name)
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        write_data(workdir, args)
        for name in args.configs:
            cmd = [sys.executable, __file__, "--child", CONFIGS[name], "--workdir", workdir,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--extra", *EXTRA.get(name, [])]
            print(f"running {name} ({CONFIGS[name]}) ...", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(table(rows, args))


def table(rows, args):
    full = rows.get("full", {})
    columns = [("model weights", "weights_mb"), ("peak RSS", "peak_mb"),
               ("peak RSS while training", "training_peak_mb"), ("planned peak", "planned_mb"),
               ("CUDA peak allocated", "cuda_peak_mb")]
    columns = [(title, key) for title, key in columns
               if all(r.get(key) is not None for r in rows.values())]
    lines = [f"SmolLM2-135M-Instruct, {args.steps} steps of {args.batch_size} x "
             f"{args.max_length} tokens, one process per configuration", "",
             "| configuration | trainable params | "
             + " | ".join(f"{title} | vs full" for title, _ in columns) + " |",
             "|---|---:|" + "---:|---:|" * len(columns)]
    for name, r in rows.items():
        cells = [name, f"{r['trainable']:,}"]
        for _, key in columns:
            cells += [f"{r[key]:,.0f} MB", ratio(r[key], full.get(key))]
        lines.append("| " + " | ".join(cells) + " |")
    baseline = max(r["baseline_mb"] for r in rows.values())
    lines += ["", f"(each process holds about {baseline:,.0f} MB after importing torch, "
              "transformers, peft and bitsandbytes, before any model is loaded)"]
    return "\n".join(lines)


def ratio(value, reference):
    return f"{value / reference:.2f}" if reference else "-"


if __name__ == "__main__":
    main()
