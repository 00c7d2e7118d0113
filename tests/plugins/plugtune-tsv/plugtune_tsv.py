"""Read ``.tsv`` files of ``prompt<TAB>completion`` lines, written from docs/plugins.md ("The
data path") alone: the format is this plugin's; splitting, columns and record checks are not."""
from pathlib import Path

from plugtune import Record, hookimpl
from plugtune.data import read_splits

PLUGTUNE_API = ">=1.1,<2"
PLUGTUNE_ROLES = {"data"}


def read(source, key):
    records = []
    for n, line in enumerate(Path(source).read_text().splitlines(), 1):
        if line.strip():
            fields = line.split("\t")
            data = dict(zip(("prompt", "completion"), fields))  # a line without a tab: prompt
            records.append(Record(data, str(source), n))
    return records


@hookimpl
def plugtune_read_data(recipe):
    return read_splits(recipe, read)
