"""Experiment trackers: TensorBoard event files in the run directory, an MLflow run (a local
file store in the run directory by default) and Weights & Biases (offline by default), through
accelerate's tracker classes; the resolved recipe is logged as the run's hyperparameters.

Every logged record goes to each tracker at its step: a training step's ``loss``, ``lr``,
``tokens_per_s`` and ``epoch`` as ``train/loss``, ..., an evaluation's ``eval_loss``,
``exact_match``, ... as ``eval/loss``, ``eval/exact_match``, ... (the test split's
``test_loss``, ... as ``test/loss``, ...). Only the main process of a
distributed run writes. ``pip install tensorboard`` (the ``trackers`` extra), ``pip install
mlflow`` or ``pip install wandb`` for the one you choose.
"""
import importlib.util
import numbers
import os
from typing import Literal

from pydantic import Field

from plugtune import Section, hookimpl

#: tracker -> the package it needs
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class TrackersSection(Section):
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        ["tensorboard"], min_length=1, description="the trackers to log to")
    project: str = Field("plugtune", description="MLflow experiment / W&B project name")
    run_name: str | None = Field(None, description="the tracker's run name; default the run "
                                 "directory's name")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI; default a "
                                            "file store in the run directory (RUN/mlruns)")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline writes "
                                                     "RUN/wandb, to `wandb sync` later")


def flatten(tree, prefix=""):
    """``{"train.lr": 0.001, ...}``: hyperparameters as the trackers take them (numbers,
    strings and booleans; lists and nulls written as text)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def scalars(record):
    """A record's numbers under the trackers' names: ``train/loss``, ``eval/loss``, ...,
    ``test/loss`` (the test split's ``test_*`` keys)."""
    evaluation = "eval_loss" in record
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Number):
            continue
        if key.startswith("test_"):
            out["test/" + key.removeprefix("test_")] = value
        else:
            out["eval/" + key.removeprefix("eval_") if evaluation else "train/" + key] = value
    return out


@hookimpl
def plugtune_check_recipe(recipe):
    return [f"trackers.report_to: {name} is not installed; pip install {PACKAGES[name]} (or "
            f"drop {name} from trackers.report_to)"
            for name in recipe["trackers"].report_to
            if importlib.util.find_spec(PACKAGES[name]) is None]


class Trackers:
    """Experiment trackers (TensorBoard, MLflow, Weights & Biases) through accelerate: the
    recipe as hyperparameters, every logged loss, learning rate and evaluation."""

    def __init__(self):
        self.trackers = []

    plugtune_check_recipe = staticmethod(plugtune_check_recipe)

    @hookimpl
    def plugtune_recipe_sections(self, register):
        register("trackers", TrackersSection)

    @hookimpl
    def plugtune_train_start(self, run):
        if run.dir is None:  # not the main process
            return
        s = run.recipe["trackers"]
        name = s.run_name or run.dir.name
        for kind in s.report_to:
            tracker = start(kind, s, run.dir, name)
            tracker.store_init_configuration(flatten(run.recipe.resolved()))
            self.trackers.append(tracker)

    @hookimpl
    def plugtune_log(self, record):
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    @hookimpl
    def plugtune_teardown(self, error):
        for tracker in self.trackers:
            if error is not None and tracker.name == "mlflow":
                import mlflow

                mlflow.end_run(status="FAILED")
            else:
                tracker.finish()
        self.trackers = []


def start(kind, s, run_dir, name):
    """An accelerate tracker of ``kind``, started."""
    from accelerate import tracking

    if kind == "tensorboard":  # RUN/tensorboard/
        tracker = tracking.TensorBoardTracker("tensorboard", run_dir)
    elif kind == "mlflow":
        import mlflow

        if s.mlflow_tracking_uri is None:
            # MLflow 3 asks file-store users to opt in; a store inside the run directory needs
            # no server or database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(s.mlflow_tracking_uri or (run_dir / "mlruns").as_uri())
        tracker = tracking.MLflowTracker(s.project, run_name=name)
    else:
        tracker = tracking.WandBTracker(s.project, name=name, mode=s.wandb_mode,
                                        dir=str(run_dir))
    tracker.start()
    return tracker
