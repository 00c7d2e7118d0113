"""The default optimizer and schedule: torch AdamW (no weight decay on biases and norms, as in
nanoGPT) with linear warm-up, then a constant, linear or cosine learning rate. bfloat16 weights
are stepped with Kahan summation (``adamw.kahan_summation``, see
``plugtune.plugins.optimizer_family``)."""
import math

import torch

from plugtune import Optimizer, Section, hookimpl
from plugtune.plugins import optimizer_family as family
from plugtune.plugins.optimizer_family import param_groups

PLUGTUNE_DEFAULT = True
PLUGTUNE_ROLES = {"optimizer", "scheduler"}  # yields each to a plugin a recipe names


class AdamWSection(Section):
    kahan_summation: family.Setting = family.setting_field()


@hookimpl
def plugtune_recipe_sections(register):
    register("adamw", AdamWSection)


@hookimpl(trylast=True)
def plugtune_build_optimizer(params, recipe):
    return family.build(lambda groups: torch.optim.AdamW(groups, lr=recipe.train.lr),
                        param_groups(params, recipe.train.weight_decay),
                        recipe["adamw"].kahan_summation)


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
def plugtune_estimate_memory(plan, recipe):
    """Two moment estimates per trainable parameter in its dtype (8 bytes per float32 weight);
    with Kahan summation a bfloat16 weight's are float32, beside its 2-byte compensation
    buffer. The step's temporaries: torch's foreach implementation (CUDA) makes one copy of
    the second moments; the per-tensor loop (CPU, and Kahan's steps one tensor at a time) two
    of the largest tensor. Only when no other optimizer plugin reported its own."""
    if plan.optimizer is not None:
        return
    trainable = plan.trainable()
    kahan = family.wanted(recipe["adamw"].kahan_summation, trainable)
    sizes = [p.numel * (4 if kahan and p.dtype == family.COMPENSATED else p.dtype.itemsize)
             for p in trainable]
    one_at_a_time = plan.device != "cuda" or kahan
    step = 2 * max(sizes, default=0) if one_at_a_time else sum(sizes)
    name = "AdamW (torch): 2 states in the parameter dtype"
    if kahan:
        name = "AdamW (torch) with Kahan summation: 2 float32 states + a bf16 buffer"
        family.plan_buffers(plan, trainable)
    plan.optimizer = Optimizer(name, 2 * sum(sizes), step)
