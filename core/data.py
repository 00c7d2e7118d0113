"""The data types that pass between the data phase's hooks, and the batching every task
shares: padding rows of token ids, and a held-out split in evaluation batches."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


@dataclass
class Record:
    """One record of a data file (or a row of a table), with where it came from for error
    messages: ``file:line``, or ``file:row N``."""

    data: dict
    file: str
    line: int

    row: bool = False  #: ``line`` is a table's row number (Parquet, Arrow, datasets), not a line

    @property
    def where(self) -> str:
        return f"{self.file}:row {self.line}" if self.row else f"{self.file}:{self.line}"


@dataclass
class Splits:
    train: list
    validation: list
    test: list | None = None  #: ``data.test``'s records, evaluated once at the end
    #: ``{name: sha256}`` of what was read that is not a local path (a hub dataset's cached
    #: files), for the run's manifest; local files and directories are hashed by the core
    sources: dict | None = None


@dataclass
class Tokenized:
    """Model inputs for one split.

    ``examples`` are dicts of token lists (and anything else a task's evaluation needs);
    ``collate`` turns a list of examples into a batch of tensors; ``truncated`` counts the
    records cut at ``train.max_length``.
    """

    examples: list
    collate: Callable
    truncated: int = 0
    records: list = field(default_factory=list)

    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """``rows`` of token ids (or labels, or mask bits) as one tensor, each row filled with
    ``value`` up to the longest: on the right, or on the left (``left``, for generation)."""
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r))
                         for r in rows])


def eval_batch_size(recipe: Any) -> int:
    """The micro-batch size of evaluation and of generation for metrics:
    ``train.eval_batch_size``, else ``train.batch_size``."""
    return int(recipe.train.eval_batch_size or recipe.train.batch_size)


def eval_batches(run: Any, split: str = "validation"
                 ) -> Iterator[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """``(examples, batch on the run's device)`` of this process's share of a held-out split,
    :func:`eval_batch_size` examples at a time (every process gets its share of the batches
    through ``run.share``; gather what they find with ``run.gather``)."""
    data, size = run.data[split], eval_batch_size(run.recipe)
    for i in run.share(range(0, len(data.examples), size)):
        chunk = data.examples[i:i + size]
        yield chunk, {k: v.to(run.accelerator.device) for k, v in data.collate(chunk).items()}
