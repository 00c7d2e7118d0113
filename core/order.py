"""The data order: which examples each optimizer step of an epoch sees, on each process."""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

#: A step's micro-batches on one process: ``(example indices, counts)`` each.
StepPlan = list[tuple[list[int], bool]]


def epoch_plan(lengths: list[int], t: Any, epoch: int, rank: int,
               world: int) -> list[StepPlan]:
    """This process's micro-batches for each optimizer step of ``epoch``: a list of steps,
    each a list of ``(example indices, counts)``. ``lengths``: each example's tokens.

    The order is a permutation drawn from ``(train.seed, epoch)`` alone, not from the global
    random state (which model and adapter initialisation have drawn from), so every recipe
    with the same seed and data sees the same batches, and a resumed run finds its place by
    step number. Written here rather than with a DataLoader for that reason: a DataLoader
    draws its base seed from the global state at every epoch. The generator's seed is a hash
    of the pair, not ``seed + epoch`` (with which seed s's second epoch was seed s+1's first:
    a seed sweep was not independent). Under several processes micro-batch
    ``j`` of a step goes to process ``j % world``; a process left without one in an epoch's
    last step runs a zero-weight micro-batch (``counts`` False) so the gradient all-reduce
    still meets every process.
    """
    generator = torch.Generator().manual_seed(epoch_seed(t.seed, epoch))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if t.group_by_length:
        micro = grouped_by_length(order, lengths, t.batch_size, generator)
    else:
        micro = [order[i:i + t.batch_size] for i in range(0, len(order), t.batch_size)]
    per_step = t.grad_accum * world
    steps = []
    for s in range(0, len(micro), per_step):
        chunk = micro[s:s + per_step]
        mine = [(m, True) for m in chunk[rank::world]]
        steps.append(mine or [(chunk[0], False)])
    return steps


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit generator seed for ``(seed, epoch)``: distinct pairs, unrelated seeds."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def grouped_by_length(order: list[int], lengths: list[int], batch_size: int,
                      generator: torch.Generator, group: int = 50) -> list[list[int]]:
    """Micro-batches of examples of similar length, so padding is small: ``order`` is cut into
    groups of ``group`` micro-batches, each sorted by length and cut into micro-batches; then
    the micro-batches are shuffled, and the one holding the longest example goes first (an
    out-of-memory shows at step 1, not hours in). HF Trainer's ``group_by_length`` idea."""
    size = group * batch_size
    micro: list[list[int]] = []
    for g in range(0, len(order), size):
        ranked = sorted(order[g:g + size], key=lambda i: -lengths[i])
        micro += [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]
    micro = [micro[i] for i in torch.randperm(len(micro), generator=generator).tolist()]
    longest = max(range(len(micro)), key=lambda b: max(lengths[i] for i in micro[b]))
    micro.insert(0, micro.pop(longest))
    return micro


def steps_per_epoch(n: int, t: Any, world: int) -> int:
    """Optimizer steps in an epoch of ``n`` examples on ``world`` processes."""
    return math.ceil(math.ceil(n / t.batch_size) / (t.grad_accum * world))
