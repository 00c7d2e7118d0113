"""The data types that pass between the data phase's hooks."""
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Record:
    """One record of a data file (or a row of a table), with where it came from for error
    messages: ``file:line``, or ``file:row N``."""

    data: dict[str, Any]
    file: str
    line: int

    row: bool = False  #: ``line`` is a table's row number (Parquet, Arrow, datasets), not a line

    @property
    def where(self) -> str:
        return f"{self.file}:row {self.line}" if self.row else f"{self.file}:{self.line}"


@dataclass
class Splits:
    train: list[Record]
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
