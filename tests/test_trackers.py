"""Experiment trackers: a run's TensorBoard event files hold its loss curve and its recipe as
hyperparameters (read back with tensorboard's own reader); MLflow and W&B when installed; a
tracker that is not installed is named at validate time with the pip command."""
import importlib.util
import json

import pytest

from plugtune import cli, testing
from plugtune.plugins import trackers


def metrics(run):
    return [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_loss_curve_and_the_recipe(make_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, run = testing.run(make_recipe(plugins=["causal_lm", "full", "trackers"],
                                           train={"max_steps": 5, "eval_every": 2},
                                           causal_lm={"exact_match": False}))
    events = EventAccumulator(str(run.dir / "tensorboard"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    train = [r for r in metrics(run) if "loss" in r]
    assert loss == pytest.approx({r["step"]: r["loss"] for r in train})
    assert sorted(loss) == [1, 2, 3, 4, 5] and loss[5] < loss[1]
    assert {"train/lr", "train/tokens_per_s", "train/epoch"} <= set(events.Tags()["scalars"])
    evals = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert evals == pytest.approx({r["step"]: r["eval_loss"] for r in metrics(run)
                                   if "eval_loss" in r})
    assert sorted(evals) == [0, 2, 4, 5]
    hparams = next(run.dir.glob("tensorboard/*/hparams.yml")).read_text()
    assert "train.lr: 0.003" in hparams and "model.name:" in hparams


def test_flattened_recipe_and_record_names():
    assert trackers.flatten({"train": {"lr": 1e-3, "max_steps": None},
                             "plugins": ["causal_lm", "ia3"]}) == {
        "train.lr": 1e-3, "train.max_steps": "None", "plugins": "['causal_lm', 'ia3']"}
    assert trackers.scalars({"step": 3, "eval_loss": 1.5, "exact_match": 0.5, "note": "x"}) == {
        "eval/loss": 1.5, "eval/exact_match": 0.5}
    assert trackers.scalars({"step": 9, "test_loss": 1.2, "test_accuracy": 0.75}) == {
        "test/loss": 1.2, "test/accuracy": 0.75}


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_run_in_a_local_file_store(make_recipe):
    import mlflow

    _, run = testing.run(make_recipe(plugins=["causal_lm", "full", "trackers"],
                                     trackers={"report_to": ["mlflow"]},
                                     train={"max_steps": 3}, causal_lm={"exact_match": False}))
    client = mlflow.tracking.MlflowClient((run.dir / "mlruns").as_uri())
    (logged,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert logged.data.params["train.max_steps"] == "3"
    history = client.get_metric_history(logged.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert logged.info.status == "FINISHED"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_in_the_run_directory(make_recipe):
    _, run = testing.run(make_recipe(plugins=["causal_lm", "full", "trackers"],
                                     trackers={"report_to": ["wandb"]},
                                     train={"max_steps": 2}, causal_lm={"exact_match": False}))
    assert list((run.dir / "wandb").glob("offline-run-*/*.wandb"))


def test_a_tracker_that_is_not_installed_is_named_with_its_pip_command(make_recipe, capsys,
                                                                       monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    path = make_recipe(plugins=["causal_lm", "full", "trackers"],
                       trackers={"report_to": ["tensorboard", "mlflow"]})
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trackers.report_to: mlflow is not installed; pip install mlflow" in err
    assert "tensorboard is not installed" not in err


def test_an_unknown_tracker_is_rejected_with_the_choices(make_recipe, capsys):
    path = make_recipe(plugins=["causal_lm", "full", "trackers"],
                       trackers={"report_to": ["tensorbord"]})
    assert cli.main(["validate", str(path)]) == 2
    assert "trackers.report_to.0: Input should be 'tensorboard', 'mlflow' or 'wandb'" in \
        capsys.readouterr().err
