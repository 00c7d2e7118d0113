"""Benchmarks with EleutherAI's lm-evaluation-harness: its tasks run on the trained model in
memory (``HFLM(pretrained=<model>)`` + ``simple_evaluate``) in the final evaluation of a run,
and in ``plugtune eval RUN``. The figures join that evaluation's record as
``lm_eval/TASK/METRIC`` (``metrics.jsonl``, the report's held-out lines, the trackers'
``eval/lm_eval/...``). A task whose data is local (a task YAML with ``dataset_path: json`` and
``data_files``, in ``lm_eval.include_path``) runs offline. Needs ``pip install
'plugtune[lm_eval]'`` (lm-eval 0.4)."""
import importlib.util
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field

from plugtune import Section, hookimpl
from plugtune.errors import PlugtuneError, did_you_mean

INSTALL = ("lm_eval: lm-evaluation-harness is not installed; pip install 'plugtune[lm_eval]' "
           "(or pip install lm-eval), or drop lm_eval from plugins:")


class LmEvalSection(Section):
    tasks: list[str] = Field(min_length=1, description="lm-eval task (or group) names, "
                             "e.g. [hellaswag] or a task of include_path")
    include_path: str | None = Field(None, description="a folder of your own task YAMLs "
                                     "(relative to the recipe); their data_files are relative "
                                     "to it")
    limit: float | None = Field(None, gt=0, description="documents per task (a number), or "
                                "a fraction of them (below 1); default all")
    batch_size: int = Field(8, gt=0, description="lm-eval's batch size")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt; "
                                    "default the task's")


def include_path(recipe):
    """``lm_eval.include_path`` as an absolute folder (relative to the recipe's folder)."""
    path = recipe.setting("lm_eval", "include_path")
    return None if path is None else str((Path(recipe.path).parent / path).resolve())


def task_manager(recipe, tasks):
    """lm-eval's TaskManager for ``tasks``: the include_path's tasks alone where they are all
    there (indexing lm-eval's own ~15,000 task files takes many seconds), else with them."""
    from lm_eval.tasks import TaskManager

    path = include_path(recipe)
    if path is not None:
        own = TaskManager(include_path=path, include_defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return TaskManager(include_path=path)


@contextmanager
def quiet():
    """lm-eval's warnings about an in-memory model (which plugtune means) and ``datasets``'
    progress bars, silenced for the benchmark; its errors still show."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@contextmanager
def working_dir(path):
    """Run inside ``path`` (a task's relative ``data_files`` are read from there)."""
    # contextlib.chdir is Python 3.11's; plugtune supports 3.10
    before = os.getcwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def check_causal(model):
    """A PlugtuneError unless ``model`` is a causal language model (what lm-eval scores)."""
    if not (callable(getattr(model, "can_generate", None)) and model.can_generate()):
        raise PlugtuneError(f"lm_eval: lm-evaluation-harness scores causal language models "
                            f"(the causal_lm task), and this run's model is a "
                            f"{type(model).__name__}; drop lm_eval from plugins:")


def benchmark(recipe, model, tokenizer):
    """``{"lm_eval/TASK/METRIC": value}`` of the recipe's tasks on ``model`` as it is."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    s = recipe["lm_eval"]
    with quiet(), working_dir(include_path(recipe)):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=s.batch_size,
                  max_length=recipe.train.max_length)
        # the global random states are left alone (None): a benchmark must not change them
        out = simple_evaluate(model=lm, tasks=list(s.tasks), num_fewshot=s.num_fewshot,
                              limit=s.limit, task_manager=task_manager(recipe, s.tasks),
                              log_samples=False, random_seed=None, numpy_random_seed=None,
                              torch_random_seed=None, fewshot_random_seed=recipe.train.seed,
                              verbosity="ERROR")
    figures = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if "_stderr" in metric or metric == "sample_len" or isinstance(value, bool) or \
                    not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = metric if kind in ("", "none") else f"{metric}/{kind}"
            figures[f"lm_eval/{task}/{name}"] = float(value)
    return figures


class LmEval:
    """lm-evaluation-harness tasks on the trained model, in memory, in the final evaluation
    and in ``plugtune eval``."""

    def __init__(self):
        self.training = self.done = False

    @hookimpl
    def plugtune_recipe_sections(self, register):
        register("lm_eval", LmEvalSection)

    @hookimpl
    def plugtune_check_recipe(self, recipe):
        """lm-eval installed; the include_path a folder; every task known to lm-eval; an
        evaluation at the end (train.eval_every not null)."""
        if importlib.util.find_spec("lm_eval") is None:
            return [INSTALL]
        s = recipe["lm_eval"]
        if recipe.train.eval_every is None:
            return ["lm_eval: runs in the final evaluation, and train.eval_every: null "
                    "switches evaluation off; set train.eval_every (end evaluates once)"]
        path = include_path(recipe)
        if path is not None and not Path(path).is_dir():
            return [f"lm_eval.include_path: {path} is not a folder; give the folder that "
                    "holds your task YAML files"]
        if path is not None:
            recipe.decide("lm_eval", "include_path", path)  # recipe.yaml keeps it absolute
        known = task_manager(recipe, s.tasks).all_tasks
        where = f"lm-eval's tasks nor {path}'s" if path else "lm-eval's tasks"
        hint = "" if path else "; give lm_eval.include_path for your own task YAMLs"
        return [f"lm_eval.tasks: {t!r} is none of {where}{did_you_mean(t, known)}{hint}"
                for t in s.tasks if t not in known]

    @hookimpl
    def plugtune_train_start(self, run):
        """Refuse a model lm-eval cannot score before the first step, not after the last."""
        check_causal(run.accelerator.unwrap_model(run.model))
        self.training, self.done = True, False

    @hookimpl
    def plugtune_steps_done(self, run):
        self.done = True

    @hookimpl
    def plugtune_evaluate(self, run, model, split):
        """The benchmark in the final evaluation of the validation split (and in ``plugtune
        eval``, which is no training); on the main process (lm-eval's in-memory model runs
        on one device)."""
        if self.training and not (self.done and split == "validation"):
            return None
        if not run.is_main:
            return None
        model = run.accelerator.unwrap_model(model)
        check_causal(model)
        return benchmark(run.recipe, model, run.tokenizer)
