"""The final phase, after the last step: ``plugtune_steps_done``, the final evaluation, the test
split's, and the save of the model through its hook."""
from __future__ import annotations

import shutil
from typing import Any

from . import checkpoint, sharding
from .guards import check_finite
from .scoring import Weights, evaluate, evaluating, weights
from .state import Run, first
from .stopping import agree


def finish(run: Run, seen: Weights, phase: dict[str, bool]
           ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """After the last step: ``plugtune_steps_done``, the final evaluation (not again where the
    last evaluation was of this step and these weights: an early stop after an evaluation),
    the test split's, and the save. ``(eval_after, test, artifact)``."""
    run.pm.hook.plugtune_steps_done(run=run)
    last, after = run.state.last_eval, None
    if evaluating(run.recipe.train):
        same = last is not None and last["step"] == run.step and weights(run) == seen
        # every process evaluates, or none (a plugin may change the weights on one only)
        after = evaluate(run, run.step) if agree(run.accelerator, not same) else last
    check_finite(run, after)
    test = evaluate(run, run.step, "test") if "test" in run.data else None
    artifact = None
    if run.recipe.output.save_model:
        state_dict = sharding.full_state_dict(run.accelerator, run.model)  # every process
        artifact = save(run, state_dict) if run.is_main else None
    phase["saved"] = True
    return after, test, artifact


def save(run: Run, state_dict: dict[str, Any] | None = None) -> str:
    """Save the final model through the save hook, into place by a rename. ``state_dict``:
    the whole model's, gathered from the processes' shards (FSDP), for the hook to save."""
    assert run.dir is not None  # the main process saves
    tmp = run.dir / ".artifact.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    name = first(run.pm.hook.plugtune_save_model, "save the model", run=run,
                 model=run.accelerator.unwrap_model(run.model), tokenizer=run.tokenizer, path=tmp,
                 state_dict=state_dict)
    final = run.dir / name
    if final.exists():  # a resumed run that had saved before it was stopped
        checkpoint.remove(final)
    tmp.replace(final)
    return str(final)
