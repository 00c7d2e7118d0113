"""Data sources read a record at a time, for ``data.streaming: true`` (the ``data`` plugin's,
and any data reader's): JSONL, CSV and text files a line at a time, Parquet a batch of rows at a
time, ``save_to_disk`` directories from their memory-mapped tables, and hub datasets through
``datasets``' streaming mode, so that training data larger than memory is never held whole.
The records and their ``file:line`` are those the whole-file readers give. JSON (one list) and
Arrow IPC files are read whole, so they are refused with a hint. :func:`stream_source` is what
:func:`plugtune.data.read_splits` takes as ``stream``."""
from __future__ import annotations

import codecs
import csv
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from plugtune.data import STREAM_CHECKED, Record
from plugtune.errors import DataError, first_line

#: The records of each streamed source that ``validate`` reads (the run reads the rest).
CHECKED = STREAM_CHECKED


def json_problem(exc: json.JSONDecodeError, line: str) -> str:
    """What the parser says of ``line``, at its column, and whether the line looks cut."""
    where = f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
    if exc.msg.startswith("Unterminated string"):
        return f"{where}; the line ends inside it: is it cut short?"
    if exc.pos >= len(line):
        return f"{where}, where the line ends: is it cut short?"
    return where


def pick_split(splits: Any, split: str, name: object) -> Any:
    """``splits[split]`` of a DatasetDict, or a DataError naming the splits it has."""
    if split not in splits:
        raise DataError(f"{name}: no split {split!r}; it has {', '.join(splits)} (choose one "
                        f"with {{dataset: ..., split: NAME}})")
    return splits[split]


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(number, line)`` of a text file read a line at a time, each line decoded on its own
    (so that a byte that is not UTF-8 is named by its line and column, as the whole-file
    reader names it); ``\r\n`` read as ``\n``."""
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                                    f"at column {exc.start + 1}); save the file as UTF-8 (e.g. "
                                    "iconv -f latin1 -t utf-8)") from exc
                yield n, line.replace("\r\n", "\n")
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from exc


def stream_jsonl(path: str) -> Iterator[Record]:
    for n, line in text_lines(path):
        if not line.strip():
            continue
        text = line.rstrip("\n")
        try:
            yield Record(json.loads(text), str(path), n)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({json_problem(exc, text)}); each "
                            "line of a .jsonl file must be one JSON object") from exc


def stream_text(path: str) -> Iterator[Record]:
    for n, line in text_lines(path):
        if line.strip():
            yield Record({"text": line.rstrip("\n")}, str(path), n)


def stream_csv(path: str) -> Iterator[Record]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if None in row or None in row.values():
                    names = list(reader.fieldnames or [])
                    raise DataError(f"{path}:{reader.line_num}: expected {len(names)} columns "
                                    f"({', '.join(names)}) as in the header")
                yield Record(dict(row), str(path), reader.line_num)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc


def stream_parquet(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield Record(row, str(path), n, row=True)
    except DataError:
        raise
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc, 200)})") from exc


STREAMERS: dict[str, Callable[[str], Iterator[Record]]] = {
    ".jsonl": stream_jsonl, ".txt": stream_text, ".csv": stream_csv, ".parquet": stream_parquet}


def stream_table(table: Iterable[dict[str, Any]], name: str) -> Iterator[Record]:
    """The rows of a ``datasets`` Dataset (memory-mapped) or IterableDataset, one at a time."""
    for n, row in enumerate(table, 1):
        yield Record(row, name, n, row=True)


def stream_source(source: Any, key: str) -> Iterator[Record]:
    """The records of one ``data.KEY`` entry (a path, or a ``{dataset: ...}`` mapping), read as
    they are needed."""
    import datasets

    if not isinstance(source, str) and not Path(source.dataset).is_absolute():  # a hub id
        label = f"{source.dataset}:{source.split or key}"
        try:
            table = datasets.load_dataset(source.dataset, source.config, split=source.split or
                                          key, revision=source.revision, streaming=True)
        except Exception as exc:  # offline, not found, gated, bad split
            raise DataError(f"dataset {label}: cannot stream it ({first_line(exc, 200)}); "
                            "streaming reads a hub dataset from the hub (offline, "
                            "data.streaming: false reads it from the datasets cache)") from exc
        records: Iterator[Record] = stream_table(table, label)
    elif isinstance(source, str) and not Path(source).is_dir():
        streamer = STREAMERS.get(Path(source).suffix.lower())
        if streamer is None:
            raise DataError(f"{source}: data.streaming reads {', '.join(STREAMERS)} files and "
                            "datasets; a .json or .arrow file is read whole (convert it to "
                            "JSONL or Parquet), or set data.streaming: false")
        records = streamer(source)
    else:
        path, split = (source, None) if isinstance(source, str) else (source.dataset,
                                                                      source.split)
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            table = pick_split(table, split or key, path)
        records = stream_table(table, str(path))
    for r in records:
        if not isinstance(r.data, dict):
            raise DataError(f"{r.where}: a record must be a JSON object, got {r.data!r:.60}")
        yield r


def problems(recipe: Any) -> list[str]:
    """What ``data.streaming`` needs of the recipe, and the first records of each streamed
    source read (a bad record further on stops the run, naming its file:line)."""
    d, t = recipe.data, recipe.train
    found: list[str] = []
    if not t.max_steps:
        found.append("data.streaming: needs train.max_steps (a stream's length is not known "
                     "before it is read)")
    if not d.validation:
        found.append("data.streaming: needs data.validation (no records are held out of a "
                     "stream)")
    if t.group_by_length:
        found.append("train.group_by_length: needs every example's length ahead, which a "
                     "stream does not give; drop it, or set data.streaming: false")
    return found


def first_records(source: Any, key: str) -> list[Record]:
    """The first records of a streamed source (what ``validate`` reads of it)."""
    return list(itertools.islice(stream_source(source, key), CHECKED))
