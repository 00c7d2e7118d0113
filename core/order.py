"""The data order: which examples each optimizer step of an epoch sees, on each process."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import DataError

#: A step's micro-batches on one process: ``(example indices, counts)`` each.
StepPlan = list[tuple[list[int], bool]]


def epoch_plan(lengths: list[int], t: Any, epoch: int, rank: int, world: int,
               draw: Callable[[torch.Generator], list[int]] | None = None) -> list[StepPlan]:
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
    still meets every process. ``draw``: the epoch's examples in order, drawn with the
    generator (a :class:`Mixture`'s ``draw``); default every example once.
    """
    generator = torch.Generator().manual_seed(epoch_seed(t.seed, epoch))
    order = draw(generator) if draw else torch.randperm(len(lengths), generator=generator).tolist()
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


@dataclass
class Mixture:
    """An epoch of several sources (``data.mix: interleave_under | interleave_over``), each
    source contributing ``counts[k]`` examples: its share of the weights times the epoch's
    size. interleave_under ends the epoch where the first source (for its weight) runs out,
    interleave_over where the last one does, the others repeated (each record ``count //
    len`` times, then a seeded draw for the rest). The counts are exact rather than sampled
    example by example (LLaMA-Factory's ``interleave_datasets``), so every epoch has the
    same size and a resumed run finds its place by step number; which records and in which
    order follow from ``(seed, epoch)``, the same on every process."""

    members: list[list[int]]  #: each source's example indices
    counts: list[int]  #: how many examples each source gives an epoch

    @property
    def size(self) -> int:
        return sum(self.counts)

    def draw(self, generator: torch.Generator) -> list[int]:
        drawn: list[int] = []
        for members, count in zip(self.members, self.counts):
            whole, rest = divmod(count, len(members)) if members else (0, 0)
            pick = torch.randperm(len(members), generator=generator)[:rest].tolist()
            drawn += members * whole + [members[i] for i in pick]
        return [drawn[i] for i in torch.randperm(len(drawn), generator=generator).tolist()]


def mixture(recipe: Any, data: Any) -> Mixture | None:
    """The :class:`Mixture` of the training examples ``data`` (a :class:`plugtune.data.
    Tokenized`, one example per record) under ``data.mix``; None for concat."""
    d = recipe.data
    if d.mix == "concat":
        return None
    if len(data.records) != len(data.examples):
        raise DataError(f"data.mix: {d.mix} needs one tokenized example per record (to know "
                        "each one's source), and the task plugin gave another number")
    weights = d.weights or [1.0] * len(d.train)
    members: list[list[int]] = [[] for _ in weights]
    for i, record in enumerate(data.records):
        members[record.source].append(i)
    shares = [w / sum(weights) for w in weights]
    for k, (m, share) in enumerate(zip(members, shares)):
        if share and not m:
            raise DataError(f"data.train[{k}]: no training records left (all were held out "
                            "for validation); give data.validation, or more records")
    spans = [len(m) / share for m, share in zip(members, shares) if share]
    n = min(spans) if d.mix == "interleave_under" else max(spans)
    return Mixture(members, [round(share * n) for share in shares])
