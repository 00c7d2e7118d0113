"""The loop's guards: a run that diverges (non-finite losses or gradients, steps without a
target token, a gradient stuck at 0) stops in one clear line instead of saving a broken model."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from . import checkpoint, sharding
from .errors import PlugtuneError
from .state import Run


class Diverged(PlugtuneError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


def _last_checkpoint(run: Run) -> str:
    last = checkpoint.latest(run.dir) if run.dir is not None else None
    return str(last or "none (set train.save_every)")


def check_divergence(run: Run, t: Any, loss: float, norm: float, lr: float,
                     echo: Callable[[str], object]) -> None:
    """After a step not applied: say so, and stop after ``train.max_bad_steps`` in a row."""
    bad = run.state.bad_steps
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    if run.state.empty_steps:
        echo(f"step {run.step}: no target tokens (every label masked); step skipped "
             f"({bad} in a row)")
    else:
        echo(f"step {run.step}: non-finite {what} (loss {loss}, grad norm {norm}); "
             f"step skipped ({bad} in a row)")
    if bad < t.max_bad_steps:
        return
    last = _last_checkpoint(run)
    if run.state.empty_steps >= bad:  # the data's fault, not the learning rate's
        files = ", ".join(str(getattr(f, "dataset", f)) for f in run.recipe.data.train)
        raise Diverged(f"training stopped: {bad} optimizer steps in a row had no target token "
                       f"(step {run.step}): every label of their records is masked, so there "
                       f"is nothing to learn; no model is saved. Check the data ({files}): "
                       "empty \"text\" records, empty completions or assistant turns, or "
                       "prompts that fill train.max_length. Last good checkpoint: "
                       f"{last}")
    causes = [f"the learning rate is too high (train.lr={t.lr}, now {lr:.3g})"]
    if not t.max_grad_norm:
        causes.append("no gradient clipping (train.max_grad_norm is null; try 1.0)")
    if run.recipe.train.mixed_precision == "fp16" or run.recipe.model.dtype == "float16":
        causes.append("float16 overflow (try bf16)")
    raise Diverged(f"training diverged: {bad} optimizer steps in a row had a non-finite {what} "
                   f"(step {run.step}: loss {loss}, grad norm {norm}, lr {lr:.3g}); none of "
                   f"them was applied, and no model is saved. Likely cause: "
                   f"{'; or '.join(causes)}. Last good checkpoint: {last}")


def check_stalled(run: Run, t: Any, loss: float, lr: float) -> None:
    """Stop when the gradient has been exactly 0 for ``train.max_bad_steps`` steps in a row
    while the loss is not: no trained weight can change any more. A learning rate far too
    high (``lr=1e6``) does this, saturating the network (weights in the millions) rather than
    overflowing it, and the run would otherwise complete and save a dead model."""
    if run.state.dead_steps < t.max_bad_steps:
        return
    model = run.accelerator.unwrap_model(run.model)
    largest = max(float(sharding.local(p.detach()).abs().max()) for p in model.parameters()
                  if p.requires_grad and sharding.local(p).numel())  # under FSDP: this shard's
    raise Diverged(f"training diverged: the gradient was exactly 0 for {run.state.dead_steps} "
                   f"optimizer steps in a row at a loss of {loss:.4g} (step {run.step}, lr "
                   f"{lr:.3g}; the largest trained weight is {largest:.3g}): the network has "
                   "saturated and cannot learn any more; no model is saved. Likely cause: the "
                   f"learning rate is too high (train.lr={t.lr}). Last good checkpoint: "
                   f"{_last_checkpoint(run)}")


def check_finite(run: Run, after: dict[str, Any] | None) -> None:
    """Refuse to save a model whose weights or held-out loss are not finite."""
    model = run.accelerator.unwrap_model(run.model)
    bad = [n for n, p in model.named_parameters() if p.requires_grad and
           not torch.isfinite(sharding.local(p.detach())).all()]
    if sharding.is_sharded(run.accelerator):  # each process checked its shards
        bad = sorted(set(run.gather(bad)))
    if bad or (after is not None and not math.isfinite(after["eval_loss"])):
        what = f"{len(bad)} trained tensor(s) are not finite ({bad[0]}, ...)" if bad else \
            f"the held-out loss is {after['eval_loss']}"  # type: ignore[index]
        raise Diverged(f"training diverged: after step {run.step} {what}; no model is saved. "
                       f"Lower train.lr (now {run.recipe.train.lr}) or set "
                       "train.max_grad_norm")
