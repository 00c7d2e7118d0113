"""What plugtune's loop costs: training throughput of SmolLM2-135M-Instruct + LoRA run by
`plugtune run`'s loop, against a plain loop written by hand (transformers + peft + torch AdamW,
no accelerate, no hooks) on the very same batches, model and adapter settings.

Each side runs in a process of its own, one after the other, on the shipped `smollm2-lora`
recipe's data; the first steps are warm-up and are left out. The figures are tokens (not padding)
per second of optimizer steps and the achieved model TFLOP/s (`plugtune.flops`: the model's
FLOPs per position computed, padding included, over the step's time; both sides count them the
same way), medians over the measured steps, and the ratio plugtune / plain.

    python benchmarks/throughput.py                      # 3 warm-up + 8 measured steps of 4 x 128
    python benchmarks/throughput.py --recipe smollm2-full --steps 6
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def overrides(args, workdir):
    return [f"train.max_steps={args.warmup + args.steps}", f"train.batch_size={args.batch_size}",
            "train.grad_accum=1", f"train.max_length={args.max_length}", "train.log_every=1",
            "train.eval_every=null", "causal_lm.exact_match=false", "output.save_model=false",
            f"output.dir={workdir}", "train.warmup_steps=0", "train.schedule=constant"]


def plugtune_side(args, workdir):
    """Steps timed by plugtune's own loop (``tokens_per_s`` and ``tflops`` in metrics.jsonl)."""
    from plugtune import loop, recipe as recipes

    recipe, pm = recipes.load_recipe(args.recipe, overrides(args, workdir))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    # the evaluations before and after are not training: shrink them to one batch
    val = run.data["validation"]
    val.examples = val.examples[:args.batch_size]
    loop.train(run, echo=lambda *a: None)
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    return [{"tokens_per_s": r["tokens_per_s"], "tflops": r["tflops"]}
            for r in records if "loss" in r][args.warmup:]


def plain_side(args, workdir):
    """The same batches through a loop written by hand."""
    import torch

    from plugtune import flops, loop, recipe as recipes

    recipe, pm = recipes.load_recipe(args.recipe, overrides(args, workdir))
    h = pm.hook
    torch.manual_seed(recipe.train.seed)
    tokenizer = h.plugtune_load_tokenizer(recipe=recipe)
    splits = h.plugtune_read_data(recipe=recipe)
    data = h.plugtune_tokenize(recipe=recipe, records=splits.train, tokenizer=tokenizer,
                               split="train")
    # the model as plugtune builds it (loaded, LoRA-wrapped): what differs is only the loop
    model = loop.setup_model(h, recipe, echo=lambda *a: None, tokenizer=tokenizer)
    model.train()
    work = flops.flop_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(data.examples, batch_size=args.batch_size,
                                         shuffle=True, collate_fn=data.collate)
    rates = []
    batches = iter(loader)
    tick = time.perf_counter()
    for _ in range(args.warmup + args.steps):  # timed from step end to step end, as plugtune
        batch = next(batches)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad()
        now = time.perf_counter()
        rates.append({"tokens_per_s": int(batch["attention_mask"].sum()) / (now - tick),
                      "tflops": work.micro_batch(*batch["input_ids"].shape) / (now - tick) / 1e12})
        tick = now
    return rates[args.warmup:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-lora")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--side", choices=["plugtune", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        with tempfile.TemporaryDirectory() as workdir:
            side = plugtune_side if args.side == "plugtune" else plain_side
            print(json.dumps(side(args, workdir)))
        return 0
    rates = {}
    for side in ("plain", "plugtune"):
        out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--side", side],
                             capture_output=True, text=True, check=True).stdout
        rates[side] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.recipe}: {args.steps} steps of {args.batch_size} x {args.max_length} tokens "
          f"after {args.warmup} warm-up steps; median (min-max)")
    for side, records in rates.items():
        tok = [r["tokens_per_s"] for r in records]
        tfl = [r["tflops"] for r in records]
        print(f"  {side:<9} {statistics.median(tok):8.1f} tokens/s ({min(tok):.1f}-{max(tok):.1f})"
              f"  {statistics.median(tfl):.4f} model TFLOP/s ({min(tfl):.4f}-{max(tfl):.4f})")
    ratio = (statistics.median(r["tokens_per_s"] for r in rates["plugtune"])
             / statistics.median(r["tokens_per_s"] for r in rates["plain"]))
    print(f"  plugtune / plain: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
