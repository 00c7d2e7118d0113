"""Streamed training data (``data.streaming: true``): records are read as training needs them,
through a seeded shuffle buffer, and tokenized a step at a time, so memory does not grow with
the data. A data reader returns a :class:`~plugtune.data.Stream` as its
:class:`~plugtune.data.Splits`'s ``train`` (:func:`plugtune.data.read_splits` does, given a
``stream``); the loop takes each step from a :class:`Feed`.

Step ``k`` trains on records ``k * S`` to ``(k + 1) * S`` of the stream (``S`` = batch size x
grad_accum x processes; micro-batch ``j`` of a step goes to process ``j % world``), so a
resumed run finds its place by step number: it reads the stream again up to that record
(reading, not tokenizing) and goes on with the very next one. When the data runs out, the next
pass starts, shuffled with the next seed; ``train.max_steps`` says when training ends. Under
``data.mix: interleave_under | interleave_over`` the sources are interleaved record by record
(:func:`interleaved`).
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from .data import Record, Stream
from .errors import DataError, InputError
from .order import StepPlan, epoch_seed
from .state import first

T = TypeVar("T")


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """``items`` in a shuffled order, holding ``size`` of them at a time: each new one takes
    the place of a random one of the buffer, which is given out (the buffer's rest, shuffled,
    at the end). Written here, not with ``datasets``' ``IterableDataset.shuffle`` (the same
    draw): that one loses its buffer when resumed from its ``state_dict``, so a resumed run
    would see other records; this one is replayed from the seed."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def passes(stream: Stream, seed: int, size: int, mix: str = "concat",
           weights: list[float] | None = None) -> Iterator[Record]:
    """The stream read again and again, pass ``p`` shuffled with ``(seed, p)``'s generator;
    under an interleaving ``mix``, its sources interleaved (:func:`interleaved`)."""
    if mix != "concat":
        for p in itertools.count():
            yield from interleaved(stream, f"{seed}:{p}", size, mix, weights)
    for p in itertools.count():
        empty = True
        for record in shuffled(stream, size, random.Random(epoch_seed(seed, p))):
            empty = False
            yield record
        if empty:
            raise DataError(f"{stream.name}: no records")


def interleaved(stream: Stream, seed: str, size: int, mix: str,
                weights: list[float] | None) -> Iterator[Record]:
    """One pass of a streamed mixture: each record's source drawn with probability its share
    of the ``weights``, each source through its own shuffle buffer (as
    ``datasets.interleave_datasets`` samples, here replayable from ``seed``). interleave_under
    ends the pass when the first source runs out; interleave_over reads a source that runs
    out again (shuffled anew) until every source has run out once."""
    sources = stream.sources or [stream.read]
    weights = weights or [1.0] * len(sources)
    live = [k for k, w in enumerate(weights) if w > 0]
    rng = random.Random(seed)
    reads = {k: 0 for k in live}

    def start(k: int) -> Iterator[Record]:
        reads[k] += 1
        return shuffled(sources[k](), size, random.Random(f"{seed}:{k}:{reads[k]}"))

    def first(k: int) -> Record:
        records[k] = start(k)
        record = next(records[k], None)
        if record is None:
            raise DataError(f"data.train[{k}]: no records")
        return record

    records: dict[int, Iterator[Record]] = {}
    heads = {k: first(k) for k in live}  # each source's first record, read ahead
    ran_out: set[int] = set()
    while True:
        k = rng.choices(live, [weights[j] for j in live])[0]
        record = heads.pop(k, None) or next(records[k], None)
        if record is None:
            ran_out.add(k)
            if mix == "interleave_under" or ran_out == set(live):
                return
            record = first(k)
        yield record


class Feed:
    """The steps of a streamed run from step ``start`` on: :meth:`step` gives this process's
    ``(plan, examples, collate)`` for ``train_step``, its records tokenized by the task's
    ``plugtune_tokenize``. ``truncated``: the records cut at ``train.max_length`` so far."""

    def __init__(self, run: Any, stream: Stream, start: int) -> None:
        t, acc = run.recipe.train, run.accelerator
        if not t.max_steps:
            raise InputError("data.streaming: needs train.max_steps (a stream's length is not "
                             "known before it is read)")
        self.run, self.rank, self.world = run, acc.process_index, acc.num_processes
        self.size, self.per_step = t.batch_size, t.batch_size * t.grad_accum * self.world
        d = run.recipe.data
        self.records = passes(stream, t.seed, d.buffer_size, d.mix, d.weights)
        self.truncated = 0
        skip = start * self.per_step  # the records of the steps already taken
        next(itertools.islice(self.records, skip, skip), None)

    def step(self) -> tuple[StepPlan, list[dict[str, Any]], Callable[..., Any]]:
        chunk = list(itertools.islice(self.records, self.per_step))
        micro = [chunk[i:i + self.size] for i in range(0, len(chunk), self.size)]
        mine = micro[self.rank::self.world]
        run = self.run
        data = first(run.pm.hook.plugtune_tokenize, "tokenize records",
                     records=[r for m in mine for r in m], tokenizer=run.tokenizer,
                     recipe=run.recipe, split="train")
        self.truncated += data.truncated
        plan, at = [], 0
        for m in mine:
            plan.append((list(range(at, at + len(m))), True))
            at += len(m)
        return plan, data.examples, data.collate
