"""Early stopping: end training when a held-out metric stops improving, keep the best
checkpoint in ``RUN/best/`` and (by default) make the saved model the best one.

Evaluations happen every ``train.eval_every`` steps; after ``patience`` of them without an
improvement of more than ``min_delta`` the plugin calls ``run.stop(...)``: the step finishes,
the final evaluation runs once, and the manifest says ``stopped early: ...``. Built on the stop
control any plugin can use (docs/hooks.md).
"""
import json
from typing import Literal

from pydantic import Field

from plugtune import Section, hookimpl
from plugtune.errors import PlugtuneError

STATE = "early_stopping.json"


class EarlyStoppingSection(Section):
    metric: str = Field("eval_loss", description="a metric the evaluation reports: eval_loss, "
                        "perplexity, exact_match, accuracy, macro_f1, entity_f1, ...")
    mode: Literal["min", "max"] | None = Field(None, description="min or max is better; "
                                               "default min for losses and perplexity, else max")
    patience: int = Field(3, gt=0, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, allow_inf_nan=False,
                             description="an improvement must be larger than this")
    restore_best: bool = Field(True, description="evaluate and save the best weights at the end "
                               "(false: the last weights)")


def lower_is_better(section):
    if section.mode is not None:
        return section.mode == "min"
    return "loss" in section.metric or "perplexity" in section.metric


class EarlyStopping:
    """Stop when a held-out metric stops improving; keep the best checkpoint."""

    def __init__(self):
        self.best = self.best_step = None
        self.waited = 0
        self.done = False

    @hookimpl
    def plugtune_recipe_sections(self, register):
        register("early_stopping", EarlyStoppingSection)

    @hookimpl
    def plugtune_check_recipe(self, recipe):
        if not isinstance(recipe.train.eval_every, int):
            return ["early_stopping: needs evaluations during training; set train.eval_every "
                    f"to a number of steps (it is {recipe.train.eval_every!r})"]
        return []

    @hookimpl
    def plugtune_eval_end(self, run, step, metrics):
        s = run.recipe["early_stopping"]
        if step == 0 or self.done:  # the untrained model and the final evaluation: no candidates
            return
        if s.metric not in metrics:
            known = ", ".join(k for k, v in metrics.items()
                              if k != "step" and isinstance(v, (int, float)))
            raise PlugtuneError(f"early_stopping.metric: the evaluation reports no "
                                f"{s.metric!r}; it reports {known}")
        value = metrics[s.metric]
        better = (value < self.best - s.min_delta if lower_is_better(s)
                  else value > self.best + s.min_delta) if self.best is not None else True
        if better:
            self.best, self.best_step, self.waited = value, step, 0
            # every process calls it (under FSDP each gives its shards); the main one writes
            run.save_checkpoint(run.dir / "best" if run.dir is not None else "")
            return
        self.waited += 1
        if self.waited >= s.patience:
            run.stop(f"{s.metric} has not improved for {s.patience} evaluations (best "
                     f"{self.best:.4g} at step {self.best_step})")

    @hookimpl
    def plugtune_steps_done(self, run):
        self.done = True
        s = run.recipe["early_stopping"]
        if s.restore_best and self.best_step not in (None, run.step):  # on every process
            run.load_weights(run.dir / "best" if run.dir is not None else None)

    @hookimpl
    def plugtune_save_checkpoint(self, path):
        (path / STATE).write_text(json.dumps({"best": self.best, "best_step": self.best_step,
                                              "waited": self.waited}))

    @hookimpl
    def plugtune_load_checkpoint(self, path):
        if (path / STATE).is_file():
            state = json.loads((path / STATE).read_text())
            self.best, self.best_step, self.waited = (state["best"], state["best_step"],
                                                      state["waited"])
