"""Read the data where users keep it: local JSONL, JSON (a list of records), CSV (a header
row), plain text (one ``{"text": line}`` record per non-empty line), Parquet and Arrow files;
directories written by ``datasets``' ``save_to_disk``; and ``{dataset: NAME, config, split}``
splits of hub datasets through the ``datasets`` library. ``data.columns`` maps record fields to
the columns they are read from, and ``data.format`` (``plugtune.plugins.formats``) turns
community formats (ShareGPT, Alpaca) into the fields tasks read. A record names its file and
line (``file:12``), or its table and row (``file:row 12``), for error messages. Without
``data.validation`` a seeded ``data.val_fraction`` of the training records is held out."""
import csv
import io
import json
from pathlib import Path

from plugtune import active_roles, hookimpl, is_file
from plugtune.data import Record, map_columns, read_splits
from plugtune.errors import DataError, first_line
from plugtune.plugins import formats
from plugtune.plugins import data_stream
from plugtune.plugins.data_stream import json_problem, pick_split
from plugtune.sources import hub_offline

PLUGTUNE_DEFAULT = True
PLUGTUNE_ROLES = {"data"}  # yields it to a data reader a recipe names


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
        text = line.rstrip("\n")  # parsed with its newline, a cut line fails at "line 2 col 1"
        try:
            yield Record(json.loads(text), str(path), n)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({json_problem(exc, text)}); each "
                            "line of a .jsonl file must be one JSON object") from exc
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


def read_parquet(path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc, 200)})") from exc
    return rows(table.to_pylist(), str(path))


def read_arrow(path):
    """An Arrow IPC file: the stream format ``datasets`` writes, or the file (Feather 2)
    format ``pyarrow.feather`` writes."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
    except Exception as exc:
        raise DataError(f"{path}: not a readable Arrow IPC file ({first_line(exc, 200)})") from exc
    return rows(table.to_pylist(), str(path))


def rows(table_rows, name):
    return [Record(r, name, i, row=True) for i, r in enumerate(table_rows, 1)]


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".txt": read_text,
           ".parquet": read_parquet, ".arrow": read_arrow}


def read_saved(path, split, key):
    """The rows of a directory written by ``save_to_disk``: a Dataset, or a DatasetDict's
    ``split`` (default the recipe key's: train, validation or test)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: a directory, but not a dataset written by save_to_disk "
                        f"({first_line(exc, 200)}); give a data file or a saved dataset") from exc
    if isinstance(loaded, datasets.DatasetDict):
        loaded = pick_split(loaded, split or key, path)
    elif split is not None:
        raise DataError(f"{path}: split: this saved dataset has no splits (it is one Dataset); "
                        "drop split:")
    return rows(loaded.to_list(), str(path)), loaded


def read_hub(source, key):
    """A split of a hub dataset through ``datasets.load_dataset`` (its cache, or the hub)."""
    import datasets

    split = source.split or key
    name = source.dataset + (f"/{source.config}" if source.config else "")
    label = f"{name}:{split}"
    try:
        loaded = datasets.load_dataset(source.dataset, source.config, split=split,
                                       revision=source.revision)
    except Exception as exc:  # datasets raises many kinds: offline, not found, gated, bad split
        text = " ".join(first_line(exc, 200).split())
        if hub_offline() or "offline" in text.lower() or "connect" in text.lower():
            raise DataError(f"dataset {label}: cannot load it: the hub is offline or unreachable "
                            "(HF_HUB_OFFLINE) and it is not in the datasets cache; download it "
                            "online first, or save it locally (save_to_disk, Parquet)") from exc
        raise DataError(f"dataset {label}: cannot load it ({text}); check the id, config and "
                        "split (a gated dataset needs `hf auth login`)") from exc
    return rows(loaded.to_list(), label), loaded


def read_file(path):
    reader = READERS.get(Path(path).suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data file type; use one of {', '.join(READERS)}, or "
                        "a directory written by save_to_disk")
    records = list(reader(path))
    for r in records:
        if not isinstance(r.data, dict):
            raise DataError(f"{r.where}: a record must be a JSON object, got {r.data!r:.60}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def is_hub(source):
    return not isinstance(source, str) and not Path(source.dataset).is_absolute()


def read_source(source, key, columns=None, sources=None):
    """The records of one entry of ``data.KEY`` (a path, or a ``{dataset: ...}`` mapping), with
    ``columns`` mapped; ``sources`` collects the sha256 of a hub dataset's cached files."""
    if is_hub(source):
        records, loaded = read_hub(source, key)
        if sources is not None:
            sources[f"dataset:{records[0].file if records else source.dataset}"] = \
                _cache_digest(loaded)
    elif isinstance(source, str) and not Path(source).is_dir():
        records = read_file(source)
    else:
        path, split = (source, None) if isinstance(source, str) else (source.dataset,
                                                                      source.split)
        if not Path(path).is_dir():
            raise DataError(f"{path}: no such directory (a dataset: that is a path must be a "
                            "directory written by save_to_disk)")
        records, _ = read_saved(path, split, key)
    for r in records:
        if not isinstance(r.data, dict):
            raise DataError(f"{r.where}: a record must be a JSON object, got {r.data!r:.60}")
    if not records:
        raise DataError(f"{getattr(source, 'dataset', source)}: no records")
    return map_columns(records, columns or {})


def _cache_digest(dataset):
    import hashlib

    from plugtune import sha256

    lines = "".join(f"{Path(f['filename']).name} {sha256(f['filename'])}\n"
                    for f in dataset.cache_files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _skipped(source):
    """Not read by ``validate``: a path the core reports as missing, a file of a type no reader
    knows (reported apart), a hub dataset while the hub is online (read by ``plugtune run``)."""
    if not isinstance(source, str):
        return is_hub(source) and not hub_offline()
    if Path(source).is_dir():
        return False
    return not is_file(source) or Path(source).suffix.lower() not in READERS


@hookimpl
def plugtune_check_recipe(recipe):
    """Every data source is of a known type and reads: UTF-8, well-formed, records that are
    objects, the mapped columns present (a missing file is the core's to report; a hub
    dataset is checked only while the hub is offline, from the datasets cache). Nothing when
    this plugin yielded the ``data`` role to a reader the recipe names: the files are that
    reader's."""
    if "data" not in active_roles(recipe).get("data", ["data"]):
        return []
    problems, streamed = [], recipe.data.streaming
    if streamed:  # JSONL, CSV, text, Parquet, datasets read as training needs them
        problems += data_stream.problems(recipe)
    for key in ("train", "validation", "test"):
        for source in getattr(recipe.data, key) or []:
            if isinstance(source, str) and not Path(source).is_dir() and \
                    Path(source).suffix.lower() not in READERS:
                problems.append(f"data.{key}: {source}: unknown data file type; use one of "
                                f"{', '.join(READERS)}, or a directory written by save_to_disk")
                continue
            if _skipped(source):
                continue
            try:
                if streamed and key == "train":  # its first records
                    formats.convert(map_columns(data_stream.first_records(source, key),
                                                recipe.data.columns), recipe.data)
                else:
                    formats.convert(read_source(source, key, recipe.data.columns), recipe.data)
            except DataError as exc:
                problems.append(f"data.{key}: {exc}")
    return problems


@hookimpl(trylast=True)
def plugtune_read_data(recipe):
    sources = {}
    return formats.convert_splits(read_splits(
        recipe, lambda source, key: read_source(source, key, sources=sources), sources,
        data_stream.stream_source), recipe.data)
