"""The default optimizer and schedule: torch AdamW (no weight decay on biases and norms, as in
nanoGPT) with linear warm-up, then a constant, linear or cosine learning rate."""
import torch

from plugtune import hookimpl

PLUGTUNE_DEFAULT = True
PLUGTUNE_ROLES = {"optimizer", "scheduler"}  # yields each to a plugin a recipe names

import math


def param_groups(params, weight_decay):
    """Matrices decay; vectors (biases, norm scales) do not."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


@hookimpl(trylast=True)
def plugtune_build_optimizer(params, recipe):
    return torch.optim.AdamW(param_groups(params, recipe.train.weight_decay), lr=recipe.train.lr)


def multiplier(schedule, warmup, total):
    """The learning-rate factor of optimizer step ``i`` (0-based), for ``LambdaLR``.

    Written here, not taken from transformers' ``get_scheduler``: its warm-up runs the first
    step at a learning rate of 0 (a step wasted, and with ``warmup_steps >= max_steps`` a run
    that changes nothing). Here step ``i < warmup`` runs at ``(i + 1) / warmup`` of the rate, so
    step ``warmup`` is the first at the full rate; then constant, linear or cosine decay over
    the remaining steps, the last one still above 0."""
    def factor(i):
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return factor


@hookimpl(trylast=True)
def plugtune_build_scheduler(optimizer, recipe, total_steps):
    t = recipe.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, multiplier(t.schedule, t.warmup_steps, total_steps))


@hookimpl(trylast=True)
def plugtune_estimate_memory(plan):
    """Two moment estimates per trainable parameter in its dtype (8 bytes per float32 weight).
    The step's temporaries: torch's foreach implementation (CUDA) makes one copy of the second
    moments; the per-tensor loop (CPU) two of the largest tensor. Only when no other optimizer
    plugin reported its own."""
    from plugtune.plan import Optimizer

    if plan.optimizer is not None:
        return
    sizes = [p.numel * p.dtype.itemsize for p in plan.trainable()]
    step = sum(sizes) if plan.device == "cuda" else 2 * max(sizes, default=0)
    plan.optimizer = Optimizer("AdamW (torch): 2 states in the parameter dtype",
                               2 * sum(sizes), step)
