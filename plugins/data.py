"""Read local data files: JSONL, JSON (a list of records), CSV (a header row) and plain text
(one ``{"text": line}`` record per non-empty line). Without ``data.validation`` a seeded
``data.val_fraction`` of the training records is held out."""
import csv
import io
import json
import random
from pathlib import Path

from plugtune import hookimpl
from plugtune.data import Record, Splits
from plugtune.errors import DataError
from plugtune.recipe import is_file

PLUGTUNE_DEFAULT = True


def decode(path):
    """The text of ``path``; a file that is not UTF-8 is a DataError naming the line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                        f"{column}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                        ) from exc


def lines(path):
    """``(number, line)`` of a text file, with universal newlines as ``open`` reads them."""
    return enumerate(io.StringIO(decode(path), newline=None), 1)


def read_jsonl(path):
    for n, line in lines(path):
        if not line.strip():
            continue
        try:
            yield Record(json.loads(line), str(path), n)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "each line of a .jsonl file must be one JSON object") from exc
        except RecursionError as exc:
            raise DataError(f"{path}:{n}: JSON nested too deeply to read") from exc


def read_json(path):
    try:
        data = json.loads(decode(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise DataError(f"{path}: JSON nested too deeply to read") from exc
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file holds a list of records")
    # JSON has no record lines; the record's index (1-based) stands in for the line.
    return [Record(r, str(path), i) for i, r in enumerate(data, 1)]


def read_csv(path):
    reader = csv.DictReader(io.StringIO(decode(path), newline=""))
    try:
        for row in reader:
            if None in row or None in row.values():
                raise DataError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} "
                                f"columns ({', '.join(reader.fieldnames)}) as in the header")
            yield Record(dict(row), str(path), reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc


def read_text(path):
    for n, line in lines(path):
        if line.strip():
            yield Record({"text": line.rstrip("\n")}, str(path), n)


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".txt": read_text}


def read_file(path):
    reader = READERS.get(Path(path).suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data file type; use one of {', '.join(READERS)}")
    records = list(reader(path))
    for r in records:
        if not isinstance(r.data, dict):
            raise DataError(f"{r.where}: a record must be a JSON object, got {r.data!r:.60}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


@hookimpl
def plugtune_check_recipe(recipe):
    """Every data file is of a known type and reads: UTF-8, well-formed, records that are
    objects (a missing file is the core's to report)."""
    problems = []
    for key in ("train", "validation", "test"):
        for f in getattr(recipe.data, key) or []:
            if Path(f).suffix.lower() not in READERS:
                problems.append(f"data.{key}: {f}: unknown data file type; use one of "
                                f"{', '.join(READERS)}")
                continue
            if not is_file(f):
                continue  # the core reports it, where the recipe's files are checked
            try:
                read_file(f)
            except DataError as exc:
                problems.append(f"data.{key}: {exc}")
    return problems


@hookimpl(trylast=True)
def plugtune_read_data(recipe):
    train = [r for f in recipe.data.train for r in read_file(f)]
    test = [r for f in recipe.data.test for r in read_file(f)] if recipe.data.test else None
    if recipe.data.validation:
        return Splits(train, [r for f in recipe.data.validation for r in read_file(f)], test)
    shuffled = train[:]
    random.Random(recipe.train.seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * recipe.data.val_fraction))
    if n_val >= len(shuffled):
        raise DataError(f"data.train: {len(train)} record(s) cannot be split for validation; "
                        "add records or give data.validation")
    return Splits(shuffled[n_val:], shuffled[:n_val], test)
