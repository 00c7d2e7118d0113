"""Plot train and eval loss against step into ``loss.png`` at the end of a run."""
import io

from plugtune import hookimpl
from plugtune.rundir import atomic_write


class Plot:
    """loss.png: train and eval loss against step."""

    PLUGTUNE_DEFAULT = True

    def __init__(self):
        self.train, self.eval = [], []

    @hookimpl
    def plugtune_log(self, record):
        if "loss" in record:
            self.train.append((record["step"], record["loss"]))
        if "eval_loss" in record:
            self.eval.append((record["step"], record["eval_loss"]))

    @hookimpl
    def plugtune_train_end(self, run):
        if run.dir is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        for points, label, style in ((self.train, "train loss", "-"),
                                     (self.eval, "eval loss", "o-")):
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set(xlabel="step", ylabel="loss", title=run.dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write(run.dir / "loss.png", buf.getvalue())
