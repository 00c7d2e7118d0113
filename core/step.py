"""One optimizer step: every micro-batch forward and backward (the loop's own accumulation, so
that a step's objective is exact), then clip, check and apply.

What a step means: the mean loss over every target of the optimizer step, across its
micro-batches and processes (see ``plugtune.loss``), however the micro-batches divide among
the processes. Each micro-batch's summed loss is backpropagated divided by a reference count
that every process shares, and once the step's true count is known the gradients are scaled
by ``reference / count`` (torchtune's way: exact, one pass over the gradients, and no need to
know the count before the first forward). Under DeepSpeed, whose engine owns the gradients, the
step's count is known first instead (:func:`counted`) and is the reference (:mod:`plugtune.zero`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch

from . import zero
from .data import REAL_TOKENS
from .errors import PlugtuneError
from .flops import squared_spans
from .loss import Loss, Tally, as_loss
from .order import StepPlan
from .state import Run, first


def to_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without the collator's count of real tokens (``plugtune.data.REAL_TOKENS``;
    ``_``-keys before API 1.1): the loop's, not a model input."""
    return {k: v for k, v in batch.items() if k != REAL_TOKENS and not k.startswith("_")}


def loss_of(run: Run, model: Any, batch: dict[str, torch.Tensor]) -> Loss:
    """The task plugin's :class:`~plugtune.loss.Loss` of ``model`` on ``batch``."""
    return as_loss(first(run.pm.hook.plugtune_compute_loss, "compute the loss", model=model,
                         batch=inputs(batch), recipe=run.recipe))


def counted(run: Run, batches: list[tuple[dict[str, torch.Tensor], bool]]) -> torch.Tensor:
    """The targets of a step's micro-batches (``(batch, real)``), as the task states them
    before any forward (``plugtune_count_targets``), summed over the processes (at least 1)."""
    acc = run.accelerator
    total = torch.zeros((), device=acc.device)
    for batch, real in batches:
        n = run.pm.hook.plugtune_count_targets(batch=inputs(batch), recipe=run.recipe)
        if n is None:
            raise zero.refusal(zero.task(run.pm))
        total = total + torch.as_tensor(n, dtype=torch.float32, device=acc.device) * real
    return (acc.reduce(total, "sum") if acc.num_processes > 1 else total).clamp(min=1)


def spans(batch: dict[str, Any]) -> float | None:
    """Attention's squared spans of a packed batch (its ``position_ids`` restart per example),
    else None: each row one span."""
    pos = batch.get("position_ids")
    return squared_spans(pos) if isinstance(pos, torch.Tensor) and pos.dim() == 2 else None


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens of ``batch`` that are not padding: the collator's ``REAL_TOKENS`` count
    where it gives one (packed rows; ``_tokens`` before API 1.1), else the attention mask's
    sum, else every position."""
    count = batch.get(REAL_TOKENS, batch.get("_tokens"))
    if count is not None:
        return count.float()
    mask = batch.get("attention_mask")
    return (mask.sum() if mask is not None else
            torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)).float()


def train_step(run: Run, micro: StepPlan, examples: list[Any],
               collate: Callable[[list[Any]], dict[str, torch.Tensor]]
               ) -> tuple[float, float, float, bool, dict[str, float | None], dict[str, float]]:
    """Forward and backward every micro-batch of one optimizer step, then scale the gradients
    so they are those of the mean over the step's targets. Returns the step's loss sum, target
    count and real tokens, summed over processes, whether any process was signalled (one
    all-reduce; the one host sync of the step), the means of the task's
    :attr:`~plugtune.loss.Loss.metrics` over the step, and its work: ``{"positions": ...,
    "flops": ...}`` (positions the model computed, padding included, and their model FLOPs
    from ``run.flops``), summed over processes."""
    acc, model = run.accelerator, run.model
    world = acc.num_processes
    sums, counts, tokens, tally = [], [], [], Tally()
    positions = flops = 0.0
    reference: torch.Tensor | None = None
    engine = zero.is_deepspeed(acc)
    hosts = [collate([examples[j] for j in indices]) for indices, _ in micro] if engine else []
    batches = [(to_device(h, acc.device), real) for h, (_, real) in zip(hosts, micro)]
    if engine:  # the step's count before any backward: the engine's gradients are final
        reference = counted(run, batches)
    for i, (indices, real) in enumerate(micro):
        host = hosts[i] if engine else collate([examples[j] for j in indices])
        batch = batches[i][0] if engine else to_device(host, acc.device)
        last = i == len(micro) - 1
        with contextlib.nullcontext() if last or engine else acc.no_sync(model):
            loss = loss_of(run, model, batch)
            total, count = (loss.sum, loss.count) if real else (loss.sum * 0, 0)
            count = torch.as_tensor(count, device=acc.device, dtype=torch.float32)
            if reference is None:  # about the step's count, and the same on every process:
                # (not x len(micro), which differs where a step's micro-batches do not divide
                # among the processes, and would scale the all-reduced gradient differently)
                shared = acc.reduce(count, "sum") if world > 1 else count
                reference = shared.clamp(min=1) * run.recipe.train.grad_accum
            if engine:
                zero.backward(model, total * world / reference, last)
            else:
                acc.backward(total * world / reference)
        tally.add(loss, 1.0 if real else 0.0)
        sums.append(total.detach().float())
        counts.append(count)
        tokens.append(real_tokens(batch))
        ids = batch.get("input_ids")  # a task's batch may come without (its own inputs)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            positions += ids.numel()
            flops += 0.0 if run.flops is None else run.flops.micro_batch(*ids.shape, spans(host))
    assert reference is not None  # a step has a micro-batch
    signalled = torch.tensor(float(run.signum is not None), device=acc.device)
    step = torch.cat([torch.stack([torch.stack(sums).sum(), torch.stack(counts).sum(),
                                   torch.stack(tokens).sum(), signalled, reference]).double(),
                      torch.tensor([positions, flops], dtype=torch.float64, device=acc.device),
                      tally.flat(acc.device)])
    if world > 1:
        step = acc.reduce(step, "sum")
    loss_sum, count_, n_tokens, any_signal, _, n_positions, n_flops = step[:7].tolist()
    if engine and count_ != reference.item() and not (count_ == 0 and reference.item() == 1):
        raise PlugtuneError(
            f"plugin {zero.task(run.pm)}: its plugtune_count_targets counted {reference.item():g} "
            f"targets in this step, its plugtune_compute_loss {count_:g}; under DeepSpeed the "
            "gradients are scaled by the former: make the two agree (docs/hooks.md)")
    if count_ > 0 and not engine:
        factor = reference / count_  # this process's reference, not the all-reduced one
        for p in run.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
    return (loss_sum, count_, n_tokens, any_signal > 0, tally.means(step[7:]),
            {"positions": n_positions, "flops": n_flops})


def optimizer_step(run: Run, t: Any, loss: float) -> tuple[float, bool]:
    """Clip, check and apply the accumulated gradients, then clear them; ``(grad_norm,
    applied)``. A step whose loss or gradient norm is not finite is not applied (under fp16
    mixed precision the gradient scaler makes that call for the gradients, as it must, and the
    step counts as skipped)."""
    acc = run.accelerator
    norm, applied = math.nan, False
    if zero.is_deepspeed(acc):  # the engine clips, checks and applies (and clears)
        norm, applied = zero.step(run.model)
    elif math.isfinite(loss):
        clipped = acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm or math.inf)
        norm = float(clipped) if clipped is not None else math.nan
        if acc.scaler is not None or math.isfinite(norm):
            run.optimizer.step()
            applied = acc.scaler is None or not acc.optimizer_step_was_skipped
    if applied:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # under DeepSpeed: nothing (the engine did)
    return norm, applied


def base_group(optimizer: Any, lr: float) -> int:
    """The index of the parameter group whose rate ``train.lr`` names, the one that is logged:
    a group marked ``"plugtune_base": True`` by the optimizer plugin, else the first whose
    initial rate is ``lr`` (a layer-wise optimizer scales the others), else the first."""
    groups = optimizer.param_groups
    for i, g in enumerate(groups):
        if g.get("plugtune_base"):
            return i
    for i, g in enumerate(groups):
        if math.isclose(g.get("initial_lr", g["lr"]), lr, rel_tol=1e-9):
            return i
    return 0


def rates(scheduler: Any, base: int) -> tuple[float, list[float]]:
    """``(the base group's rate, every group's rate)`` for the next optimizer step."""
    lrs = [float(x) for x in scheduler.get_last_lr()]
    return lrs[base], lrs


def finite(x: float) -> float | None:
    """``x``, or None (JSON's null) where it is not finite."""
    return x if math.isfinite(x) else None
