"""A progress bar over optimizer steps (loss, lr, tokens/s, achieved TFLOP/s or MFU, and
tqdm's ETA), and eval lines."""
from tqdm.auto import tqdm

from plugtune import hookimpl


class Progress:
    """Progress bar with loss, lr, tokens/s and ETA; prints each evaluation."""

    PLUGTUNE_DEFAULT = True

    def __init__(self):
        self.bar = None

    @hookimpl
    def plugtune_train_start(self, run):
        self.bar = tqdm(total=run.total_steps, desc="train", unit="step",
                        disable=not run.is_main, dynamic_ncols=True)

    @hookimpl
    def plugtune_step_end(self, metrics):
        loss = metrics["loss"]
        self.bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}",
                             lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}", **hardware(metrics),
                             refresh=False)
        self.bar.update(1)

    @hookimpl
    def plugtune_log(self, run, record):
        split = "eval" if "eval_loss" in record else "test" if "test_loss" in record else None
        if split and self.bar is not None and run.is_main:
            text = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in record.items())
            self.bar.write(f"{split}: {text}")

    @hookimpl
    def plugtune_teardown(self):
        if self.bar is not None:
            self.bar.close()


def hardware(metrics):
    """The bar's hardware figures: achieved model TFLOP/s, and MFU where the peak is known."""
    out = {}
    if metrics.get("tflops") is not None:
        out["tflop_s"] = f"{metrics['tflops']:.3g}"
    if metrics.get("mfu") is not None:
        out["mfu"] = f"{100 * metrics['mfu']:.1f}%"
    return out
