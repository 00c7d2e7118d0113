"""Plot train and eval loss against step into ``loss.png`` at the end of a run, beside the
held-out scores the task reports (accuracy, F1, exact match, ...): the whole run's, read from
``metrics.jsonl`` (so a resumed run's plot starts at step 1), or what this process logged where
there is no ``metrics.jsonl``."""
import io
import json

from plugtune import atomic_write, hookimpl


NOT_SCORES = {"step", "eval_loss", "perplexity"}


class Plot:
    """loss.png: train and eval loss, and held-out scores, against step."""

    PLUGTUNE_DEFAULT = True

    def __init__(self):
        self.records = []

    @hookimpl
    def plugtune_log(self, record):
        self.records.append(record)

    @hookimpl
    def plugtune_train_end(self, run):
        if run.dir is None:
            return
        path = run.dir / "metrics.jsonl"
        self.train, self.eval, self.scores = curves(read(path) if path.is_file()
                                                    else self.records)
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12 if self.scores else 7, 4), dpi=100, layout="tight")
        ax = fig.add_subplot(1, 2 if self.scores else 1, 1)
        for points, label, style in ((self.train, "train loss", "-"),
                                     (self.eval, "eval loss", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set(xlabel="step", ylabel="loss", title=run.dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        if self.scores:
            sx = fig.add_subplot(1, 2, 2)
            for key, points in self.scores.items():
                sx.plot(*zip(*points), "o-", label=key)
            sx.set(xlabel="step", ylabel="score", title="held-out metrics")
            sx.grid(alpha=0.3)
            sx.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write(run.dir / "loss.png", buf.getvalue())


def read(path):
    """The records of ``metrics.jsonl`` (a line cut by a kill is left out)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves(records):
    """``(train, eval, scores)``: ``(step, value)`` points of the train loss, the eval loss and
    each held-out score."""
    train, evals, scores = [], [], {}
    for record in records:
        if record.get("loss") is not None:  # a skipped step's loss is not finite
            train.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            evals.append((record["step"], record["eval_loss"]))
            for key, value in record.items():  # per-class figures ("recall/NAME") left out
                if key not in NOT_SCORES and "/" not in key and isinstance(value, (int, float)):
                    scores.setdefault(key, []).append((record["step"], value))
    return train, evals, scores
