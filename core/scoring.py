"""Evaluations during training: a held-out split's loss and every plugin's metrics, when they
are due, and what identifies the weights an evaluation saw."""
from __future__ import annotations

from typing import Any

import torch

from .data import eval_batches
from .state import Run
from .loss import Tally
from .step import loss_of


def evaluate(run: Run, step: int, split: str = "validation") -> dict[str, Any]:
    """A held-out split's loss (its summed loss over its whole count, so it does not depend on
    the evaluation batch size) and every plugin's extra metrics. The keys of another split
    than ``"validation"`` carry its name: ``test_loss``, ``test_accuracy``, ... Under several
    processes each evaluates its share of the batches and the sums are added up (one
    all-reduce); plugins share their own work with :meth:`Run.share` and :meth:`Run.gather`."""
    model, acc = run.model, run.accelerator
    model.eval()
    sums, tally = torch.zeros(2, dtype=torch.float64, device=acc.device), Tally()
    with torch.no_grad():
        for _, batch in eval_batches(run, split):
            with acc.autocast():
                loss = loss_of(run, model, batch)
            sums += torch.stack([loss.sum.detach().double(),
                                 torch.as_tensor(loss.count, device=acc.device).double()])
            tally.add(loss)
        flat = torch.cat([sums, tally.flat(acc.device)])
        if acc.num_processes > 1:
            flat = acc.reduce(flat, "sum")
        total, count = flat[:2].tolist()
        result = {"step": step, "eval_loss": total / count if count else float("nan"),
                  **tally.means(flat[2:])}
        for extra in run.pm.hook.plugtune_evaluate(run=run, model=model, step=step,
                                                   eval_loss=result["eval_loss"], split=split):
            result.update(extra or {})
    model.train()
    if split != "validation":
        result = {k if k == "step" else f"{split}_{k.removeprefix('eval_')}": v
                  for k, v in result.items()}
    run.pm.hook.plugtune_log(run=run, record=result)
    if split == "validation":  # a test score is reported, never acted on
        run.pm.hook.plugtune_eval_end(run=run, step=step, metrics=result)
    return result


def evaluate_kept(run: Run, step: int) -> dict[str, Any]:
    """An evaluation during training, kept as the state's ``last_eval`` (a checkpoint written
    after it holds it: resume keeps its record and need not evaluate these weights again)."""
    run.state.last_eval = evaluate(run, step)
    return run.state.last_eval


def evaluating(t: Any) -> bool:
    """Whether the recipe evaluates at all (``train.eval_every: null`` switches it off)."""
    return t.eval_every is not None


def due(every: int | None, run: Run) -> bool:
    """Whether something done every ``every`` steps (0/None: never) is due at this step."""
    return bool(every) and run.step % every == 0  # type: ignore[operator]


def eval_due(t: Any, run: Run) -> bool:
    return isinstance(t.eval_every, int) and due(t.eval_every, run)


Weights = tuple[int, list[tuple[int, int]]]


def weights(run: Run) -> Weights:
    """What identifies the trainable weights as they are now: the model object and each
    trainable tensor's storage and in-place version counter (every in-place change, an
    optimizer step or a ``copy_`` of other weights, moves it), so no values are read."""
    return id(run.model), [(p.data_ptr(), p._version) for p in run.model.parameters()
                           if p.requires_grad]
