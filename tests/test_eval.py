"""`plugtune eval RUN_DIR [--data FILE] [--baseline]`: a finished run's model, or the base model
it started from, evaluated with its task's metrics; the result printed and written."""
import json
import math

import pytest

from plugtune import cli, testing

from test_heads import head_recipe, toy_texts


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("eval")
    return testing.run(head_recipe(tmp, tiny_llama, "sequence_classification", toy_texts()))


def saved(path):
    return json.loads(path.read_text())["metrics"]


def test_eval_repeats_the_final_evaluation_of_the_run(classifier_run, capsys):
    summary, run = classifier_run
    assert cli.main(["eval", str(run.dir)]) == 0
    out = capsys.readouterr().out
    metrics = saved(run.dir / "eval-validation.json")
    assert metrics["accuracy"] == summary["eval_after"]["accuracy"] == 1.0
    assert metrics["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], rel=1e-4)
    assert "accuracy: 1.0000" in out and "eval-validation.json" in out


def test_baseline_is_the_run_before_training(classifier_run, tmp_path, capsys):
    summary, run = classifier_run
    data = testing.write_jsonl(tmp_path / "more.jsonl", toy_texts()[::3])
    assert cli.main(["eval", str(run.dir), "--data", str(data)]) == 0
    assert cli.main(["eval", str(run.dir), "--data", str(data), "--baseline"]) == 0
    tuned = saved(run.dir / "eval-more.json")
    base = saved(run.dir / "eval-more-baseline.json")
    assert tuned["accuracy"] == 1.0 > base["accuracy"]
    assert base["eval_loss"] > tuned["eval_loss"]
    # the new head starts from the run's seed, as it did in training
    assert cli.main(["eval", str(run.dir), "--baseline"]) == 0
    assert saved(run.dir / "eval-validation-baseline.json")["eval_loss"] == pytest.approx(
        summary["eval_before"]["eval_loss"], rel=1e-4)


def test_eval_of_a_causal_lm_run_reports_perplexity(make_recipe, capsys):
    _, run = testing.run(make_recipe(train={"max_steps": 3}, causal_lm={"exact_match": False}))
    assert cli.main(["eval", str(run.dir)]) == 0
    metrics = saved(run.dir / "eval-validation.json")
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_eval_data_with_an_unknown_label_names_the_line(classifier_run, tmp_path, capsys):
    _, run = classifier_run
    data = testing.write_jsonl(tmp_path / "bad.jsonl", [{"text": "apple", "label": "fruit"},
                                                        {"text": "tiger", "label": "robot"}])
    assert cli.main(["eval", str(run.dir), "--data", str(data)]) == 2
    assert f"{data}:2: label 'robot' is not one of the labels" in capsys.readouterr().err


def test_eval_needs_a_finished_run(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err
