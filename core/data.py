"""The data types that pass between the data phase's hooks, the one check of records (the data
plugin reads them, the task plugins check them: ``plugtune_check_records``), and the batching
every task shares: padding rows of token ids, and a held-out split in evaluation batches."""
from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .errors import DataError

if TYPE_CHECKING:
    import torch

    from .recipe import Recipe

#: The batch entry (a 0-dim tensor) by which a collator tells the loop how many of a batch's
#: tokens are real, where padding or filler is not marked by an ``attention_mask`` (packed
#: rows): ``tokens_per_s`` counts it. The loop does not pass it to the model. (``_tokens``, its
#: name before plugin API 1.1, is still read.)
REAL_TOKENS = "num_real_tokens"


@dataclass
class Record:
    """One record of a data file (or a row of a table), with where it came from for error
    messages: ``file:line``, or ``file:row N``."""

    data: dict[str, Any]
    file: str
    line: int

    row: bool = False  #: ``line`` is a table's row number (Parquet, Arrow, datasets), not a line
    source: int = 0  #: the index of the ``data.train`` entry it came from (for a mixture)

    @property
    def where(self) -> str:
        return f"{self.file}:row {self.line}" if self.row else f"{self.file}:{self.line}"


class Stream:
    """The training records of ``data.streaming``: ``read()`` yields them from the first on
    each call (one pass over the sources), never holding them all. ``name``: what is read,
    for messages."""

    def __init__(self, read: Callable[[], Iterator[Record]], name: str,
                 sources: list[Callable[[], Iterator[Record]]] | None = None) -> None:
        self.read, self.name = read, name
        #: each ``data.train`` entry's own ``read`` (what a mixture interleaves); None: unknown
        self.sources = sources

    def __iter__(self) -> Iterator[Record]:
        return self.read()


@dataclass
class Splits:
    train: list[Record] | Stream  #: a :class:`Stream` under ``data.streaming``
    validation: list[Record]
    test: list[Record] | None = None  #: ``data.test``'s records, evaluated once at the end
    #: ``{name: sha256}`` of what was read that is not a local path (a hub dataset's cached
    #: files), for the run's manifest; local files and directories are hashed by the core
    sources: dict[str, str] | None = None


@dataclass
class Tokenized:
    """Model inputs for one split.

    ``examples`` are dicts of token lists (and anything else a task's evaluation needs);
    ``collate`` turns a list of examples into a batch of tensors; ``truncated`` counts the
    records cut at ``train.max_length``.
    """

    examples: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    truncated: int = 0
    records: list[Record] = field(default_factory=list)

    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def read_splits(recipe: "Recipe", read: Callable[[Any, str], list["Record"]],
                sources: dict[str, str] | None = None,
                stream: Callable[[Any, str], Iterable[Record]] | None = None) -> "Splits":
    """The :class:`Splits` of the recipe's ``data.train``, ``data.validation`` and
    ``data.test``, each source (a path, or a ``{dataset: ...}`` entry) read by ``read(source,
    key)`` into :class:`Record` objects, ``data.columns`` mapped; without ``data.validation``
    a seeded ``data.val_fraction`` of the training records is held out. What a data reader's
    ``plugtune_read_data`` returns, so that it reads its format and nothing else. Under
    ``data.streaming``, ``train`` is a :class:`Stream` of what ``stream(source, "train")``
    yields, source after source (a reader without ``stream`` reads it whole)."""
    def records(key: str) -> list[Record]:
        out = []
        for i, s in enumerate(getattr(recipe.data, key) or []):
            for r in map_columns(read(s, key), recipe.data.columns):
                r.source = i
                out.append(r)
        return out

    test = records("test") if recipe.data.test else None
    if recipe.data.streaming and stream is not None:
        if not recipe.data.validation:
            raise DataError("data.validation: a streamed data.train holds out no validation "
                            "records; give data.validation")
        parts: list[Callable[[], Iterator[Record]]] = [
            functools.partial(_streamed, recipe, stream, i, s)
            for i, s in enumerate(recipe.data.train)]
        return Splits(Stream(lambda: itertools.chain.from_iterable(r() for r in parts),
                             ", ".join(str(getattr(s, "dataset", s)) for s in recipe.data.train),
                             parts), records("validation"), test, sources)
    train = records("train")
    if recipe.data.validation:
        return Splits(train, records("validation"), test, sources)
    shuffled = train[:]
    random.Random(recipe.train.seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * recipe.data.val_fraction))
    if n_val >= len(shuffled):
        raise DataError(f"data.train: {len(train)} record(s) cannot be split for validation; "
                        "add records or give data.validation")
    return Splits(shuffled[n_val:], shuffled[:n_val], test, sources)


def _streamed(recipe: "Recipe", stream: Callable[[Any, str], Iterable[Record]], i: int,
              source: Any) -> Iterator[Record]:
    for r in stream(source, "train"):
        r.source = i
        yield from map_columns([r], recipe.data.columns)


def map_columns(records: list[Record], columns: dict[str, str] | None) -> list[Record]:
    """Rename each record's columns to the fields the task reads (``{field: column}``, the
    recipe's ``data.columns``)."""
    if not columns:
        return records
    for r in records:
        for target, column in columns.items():
            if column not in r.data:
                raise DataError(f"{r.where}: no {column!r} column (data.columns reads "
                                f"{target!r} from it); this record has {sorted(r.data)}")
        mapped = {target: r.data[column] for target, column in columns.items()}
        r.data = {**{k: v for k, v in r.data.items() if k not in columns.values()}, **mapped}
    return records


def check_each(records: Iterable[Record], check: Callable[[Record], object]) -> list[str]:
    """``record.where: problem`` of the first bad record of each file: ``check(record)`` raises
    :class:`~plugtune.errors.DataError` (naming ``record.where``) for a bad record. What a
    ``plugtune_check_records`` implementation returns: one line per file, not one per line of a
    file that is wrong throughout."""
    problems: list[str] = []
    bad: set[str] = set()
    for record in records:
        if record.file in bad:
            continue
        try:
            check(record)
        except DataError as exc:
            bad.add(record.file)
            problems.append(str(exc))
    return problems


def key_of(recipe: "Recipe", split: str) -> str:
    """The recipe key ``split``'s records came from: held-out validation records come from
    ``data.train`` unless ``data.validation`` is given."""
    return "train" if split == "validation" and not recipe.data.validation else split


#: The records of a streamed split that ``validate`` checks.
STREAM_CHECKED = 1000


def check_records(hook: Any, recipe: "Recipe", splits: Splits) -> list[str]:
    """Every task plugin's problems with the records of ``splits`` (a :class:`Splits`), each
    prefixed with the recipe key the records came from."""
    problems: list[str] = []
    for split in ("train", "validation", "test"):
        records = getattr(splits, split, None)
        if isinstance(records, Stream):  # its first records: a stream may not end soon
            records = list(itertools.islice(records, STREAM_CHECKED))
        if not records:
            continue
        for result in hook.plugtune_check_records(recipe=recipe, split=split, records=records):
            problems += [f"data.{key_of(recipe, split)}: {p}" for p in result or []]
    return problems


def validate_records(pm: Any, recipe: "Recipe", problems: list[str]) -> list[str]:
    """What ``validate`` says of the records, once the data reads: the data plugin reads them
    (``plugtune_read_data``) and the task plugins check them. Not while a data problem is
    already reported (the data plugin's own check names a file it cannot read), nor while the
    hub is online and a split is a hub dataset (``plugtune run`` downloads it, and checks its
    records then as it tokenizes them)."""
    from .sources import hub_offline

    if any(p.startswith(("data", "plugins")) for p in problems) or (
            not hub_offline() and _hub_sources(recipe)):
        return []
    try:
        splits = pm.hook.plugtune_read_data(recipe=recipe)
    except DataError as exc:
        return [str(exc)]
    return check_records(pm.hook, recipe, splits) if splits is not None else []


def _hub_sources(recipe: "Recipe") -> list[Any]:
    from pathlib import Path

    return [s for key in ("train", "validation", "test") for s in getattr(recipe.data, key) or []
            if not isinstance(s, str) and not Path(s.dataset).is_absolute()]


def pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """``rows`` of token ids (or labels, or mask bits) as one tensor, each row filled with
    ``value`` up to the longest: on the right, or on the left (``left``, for generation)."""
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r))
                         for r in rows])


def span_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """The lengths of a batch's examples, row after row: each a run of ``position_ids``
    counting up by one (a packed row restarts them at every example; every row starts one)."""
    import torch

    pos = position_ids.reshape(-1, position_ids.shape[-1])
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return torch.bincount(starts.flatten().cumsum(0))[1:]


def eval_batch_size(recipe: Any) -> int:
    """The micro-batch size of evaluation and of generation for metrics:
    ``train.eval_batch_size``, else ``train.batch_size``."""
    return int(recipe.train.eval_batch_size or recipe.train.batch_size)


def eval_batches(run: Any, split: str = "validation"
                 ) -> Iterator[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """``(examples, batch on the run's device)`` of this process's share of a held-out split,
    :func:`eval_batch_size` examples at a time (every process gets its share of the batches
    through ``run.share``; gather what they find with ``run.gather``)."""
    import torch

    from . import sharding
    from .step import loss_of  # (step imports this module)

    data, size = run.data[split], eval_batch_size(run.recipe)
    mine = run.share(range(0, len(data.examples), size))
    # Under FSDP a forward gathers weights from every process: one with fewer batches makes
    # as many forwards (of its last batch, or of the split's first, answers unused) as the
    # busiest, one per batch it lacks (so a plugin makes one forward per batch it is given).
    missing = sharding.same_count(run.accelerator, len(mine))  # (asked before any forward)
    batch: dict[str, torch.Tensor] = {}
    for i in mine:
        chunk = data.examples[i:i + size]
        batch = {k: v.to(run.accelerator.device) for k, v in data.collate(chunk).items()}
        yield chunk, batch
    for _ in range(missing):
        batch = batch or {k: v.to(run.accelerator.device)
                          for k, v in data.collate(data.examples[:size]).items()}
        with torch.no_grad(), run.accelerator.autocast():
            loss_of(run, run.model, batch)
