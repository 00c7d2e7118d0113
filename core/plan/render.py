"""The plan as a table: component by component, the peak and the verdict against a budget."""
from .budget import count, size
from .moments import MASTERS, OVERHEAD, Estimate


def describe(est: Estimate, budget: int | None = None, label: str | None = None) -> list[str]:
    """The plan as a table of components, the peak and the verdict (lines of text)."""
    plan, a = est.plan, est.acts
    peak = est.peak()
    n = plan.batch_size * plan.seq_len
    total_params = sum(p.numel for p in plan.params)
    trainable = sum(p.numel for p in plan.trainable())
    r = plan.recipe
    lines = [f"model: {r.model.name} ({plan.architecture}, {count(total_params)} "
             f"parameters, dtype {r.model.dtype})",
             f"plugins: {', '.join(r.plugins)}; micro-batch {plan.batch_size} x {plan.seq_len} "
             f"tokens, grad_accum {plan.grad_accum}, mixed_precision {plan.mixed_precision}; "
             f"attention {r.model.attn_implementation or 'sdpa (default)'}; device {plan.device}",
             *_processes(est), ""]
    rows: list[tuple[str, str, str]] = []

    def row(name: str, nbytes: float | None, detail: str = "") -> None:
        rows.append((name, "" if nbytes is None else size(nbytes), detail))

    row("weights", est.weights)
    kinds: dict[tuple[str, bool], tuple[int, int]] = {}
    for p in plan.params:
        key = (p.kind, p.added)
        c, b = kinds.get(key, (0, 0))
        kinds[key] = (c + p.numel, b + p.bytes)
    for (kind, added), (c, b) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        what = "added by plugins (adapters, heads)" if added else "of the model"
        row(f"  {kind}", b, f"{count(c)} params {what}, {b / c:.3g} B/param")
    row("trainable parameters", None, f"{count(trainable)} of {count(total_params)} "
        f"({100 * trainable / max(total_params, 1):.2f}%)")
    g_all = est.grads()[0]
    at = peak.parts["gradients"]
    row("gradients", at, f"of the trainable parameters{'' if at == g_all else f'; {size(g_all)} once all are made'}")
    opt = plan.optimizer
    if opt is not None:
        paged = " (paged: can spill to CPU RAM, not counted)" if opt.paged and plan.device == "cuda" else ""
        row("optimizer state", est.divided(opt.state), opt.name + paged)
    if MASTERS in peak.parts:
        row(MASTERS, peak.parts[MASTERS], "DeepSpeed's float32 copy of the trained parameters, "
            "this process's share")
    for m in plan.extra:
        row(m.name, m.bytes, m.detail)
    per_layer = sum(a.blocks) / max(len(a.blocks), 1)
    per_input = sum(a.inputs) / max(len(a.inputs), 1)
    row("activations", peak.parts["activations"], "kept for backward at the peak")
    row("  per block and token", None, f"{size(per_layer)} without gradient checkpointing, "
        f"{size(per_input)} with it; {len(a.blocks)} blocks x {n:,} tokens")
    ckpt = (f"gradient checkpointing on {len(plan.checkpointed)} of {len(a.blocks)} blocks"
            if plan.checkpointed else "no gradient checkpointing")
    kept = sum(i if k in plan.checkpointed else b for k, (i, b) in enumerate(zip(a.inputs, a.blocks)))
    row("  all blocks", n * kept, f"{ckpt}; outside the blocks {size((a.before + a.after) * n)}")
    chunk = plan.loss_chunk_tokens
    scored = (f"chunks of {chunk:,} tokens (the task's chunked loss)"
              if chunk and chunk < n else "the whole micro-batch")
    row("logits and loss buffers", peak.parts["logits and loss buffers"],
        f"logits {size(a.logits * min(n, chunk or n))} ({size(a.logits)} per token) for "
        f"{scored}, upcast and gradients")
    if peak.parts["optimizer step"]:
        row("optimizer step buffers", peak.parts["optimizer step"], "only during the step")
    tensors = peak.total
    overhead = est.overhead(tensors)
    fixed, share = OVERHEAD[plan.device]
    row("framework overhead", overhead, f"{size(fixed)} + {share:.0%} "
        + ("(CUDA context, allocator)" if plan.device == "cuda" else "(allocator, libraries)"))
    total = tensors + overhead
    width = max(len(x[0]) for x in rows) + 2
    lines += [f"{'component':<{width}}{'bytes':>11}  detail"]
    lines += [f"{name:<{width}}{value:>11}  {detail}".rstrip() for name, value, detail in rows]
    lines += ["-" * (width + 11), f"{'peak total':<{width}}{size(total):>11}  at the {peak.name}"]
    if budget is not None:
        head = budget - total
        verdict = (f"fits, headroom {size(head)}" if head >= 0
                   else f"does NOT fit: {size(-head)} over")
        lines.append(f"{'budget':<{width}}{size(budget):>11}  {label}: {verdict}")
    lines += [f"note: {note}" for note in plan.notes]
    return lines


def _processes(est: Estimate) -> list[str]:
    """What one of several processes holds (``plan --processes N --shard ...``)."""
    plan = est.plan
    if plan.processes == 1 and not plan.shard:
        return []
    what = {"fsdp": "FSDP full shard (ZeRO-3): weights, gradients and optimizer state",
            "zero3": "ZeRO-3: weights, gradients and optimizer state",
            "zero2": "ZeRO-2: gradients and optimizer state"}.get(plan.shard or "",
                                                                   "DDP: nothing")
    lines = [f"per process, one of {plan.processes}: {what} divided among them; activations "
             "as on one"]
    whole = [p for p in plan.params if not p.shardable]
    if plan.shard in ("fsdp", "zero3"):
        lines.append(f"  weights: this process's shard + {size(est.gathered())} gathered whole "
                     "while computing (final norm and output layer, two blocks)")
        if whole:
            lines.append(f"  {size(sum(p.bytes for p in whole))} of weights stay whole on "
                         "every process (4-bit weights packed in uint8: a 16-bit quant "
                         "storage type lets them shard)")
    return lines
