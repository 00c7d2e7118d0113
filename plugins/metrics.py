"""Write every logged record as one JSON line to ``metrics.jsonl`` in the run directory."""
import json

from plugtune import hookimpl


class Metrics:
    """metrics.jsonl: one JSON object per logged step and per evaluation."""

    PLUGTUNE_DEFAULT = True

    def __init__(self):
        self.file = None

    @hookimpl
    def plugtune_train_start(self, run):
        if run.dir is not None:
            self.file = open(run.dir / "metrics.jsonl", "a", encoding="utf-8")

    @hookimpl
    def plugtune_log(self, record):
        if self.file is not None:
            # One write per record, flushed: a killed run leaves whole lines behind.
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    @hookimpl
    def plugtune_teardown(self):
        if self.file is not None:
            self.file.close()
