"""What ``plugtune run`` and ``plugtune resume`` print when a run ends: where it is, its
throughput, and the held-out figures before -> after."""
from __future__ import annotations

import math
from typing import Any, Callable

from . import flops


def report(summary: dict[str, Any], run: Any, echo: Callable[..., object]) -> None:
    """The lines a finished run ends with: where it is, and held-out before -> after."""
    before, after = summary["eval_before"] or {}, summary["eval_after"] or {}
    stopped = f" (stopped early: {summary['stopped_early']})" if summary["stopped_early"] else ""
    echo(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s{stopped}; run directory "
         f"{run.dir}")
    work = throughput(run)
    if work:
        mfu = (f" = {100 * work['mean_mfu']:.1f}% MFU" if "mean_mfu" in work else
               " (MFU: no known peak for this device; set train.peak_tflops)")
        echo(f"  throughput: {work['mean_tokens_per_s']:.1f} real tokens/s, "
             f"{work['mean_tflops']:.4g} model TFLOP/s{mfu}; "
             f"{work['mean_positions_per_token']:.2f} positions computed per real token")
    if summary["skipped_steps"]:
        echo(f"  {summary['skipped_steps']} step(s) skipped for a non-finite loss or gradient")
    for key in after:
        if key != "step" and isinstance(after[key], (int, float)):
            was = before.get(key)  # a metric only the trained model has: `-> x`
            was = f"{was:.4f} " if isinstance(was, (int, float)) and math.isfinite(was) else ""
            echo(f"  held-out {key}: {was}-> {after[key]:.4f}")
    for key, value in (summary.get("test") or {}).items():
        if key != "step" and isinstance(value, (int, float)):
            echo(f"  {key}: {value:.4f}")


def throughput(run: Any) -> dict[str, float]:
    """The training steps this process ran (a resumed run: since resuming) as
    :func:`plugtune.flops.report` says of them (``mean_*``)."""
    acc = run.accelerator
    peak = flops.peak_tflops(acc.device, run.recipe.train.peak_tflops)
    return flops.report(run.work, peak and peak * acc.num_processes, "mean_")
