"""`data.test`: a test split evaluated once at the end, with the final model (with
early_stopping's restore_best, the best one), reported as `test_*` keys; `plugtune eval RUN
--split test`."""
import json

import pytest

from plugtune import cli, testing


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_test_split_is_evaluated_once_at_the_end(make_recipe, echo_data, capsys):
    # the test file is the validation file: the same figures under test_* names
    recipe = make_recipe(data={"test": str(echo_data[1])}, train={"max_steps": 6},
                         causal_lm={"max_new_tokens": 4})
    assert cli.main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    run_dir = recipe.parent / "runs" / "run"
    tests = [r for r in records(run_dir) if any(k.startswith("test_") for k in r)]
    assert len(tests) == 1 and tests[0]["step"] == 6
    final = [r for r in records(run_dir) if "eval_loss" in r][-1]
    assert tests[0]["test_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert tests[0]["test_perplexity"] == pytest.approx(final["perplexity"], rel=1e-6)
    assert tests[0]["test_exact_match"] == final["exact_match"]
    assert not any(k.startswith("eval_") for k in tests[0])
    assert f"test_loss: {tests[0]['test_loss']:.4f}" in out
    assert "data: test 8 records" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert str(echo_data[1]) in manifest["data"]


def test_summary_has_the_test_figures(make_recipe, echo_data):
    summary, run = testing.run(make_recipe(data={"test": str(echo_data[1])},
                                           train={"max_steps": 2},
                                           causal_lm={"exact_match": False}))
    assert summary["test"]["test_loss"] == pytest.approx(summary["eval_after"]["eval_loss"])
    assert set(summary["test"]) == {"step", "test_loss", "test_perplexity"}


def test_early_stopping_tests_the_best_model(make_recipe, echo_data):
    """With mode max a falling loss never improves: the best model is step 2's, and the test
    split (the validation file here) scores it, not the last weights."""
    recipe = make_recipe(plugins=["causal_lm", "full", "early_stopping"],
                         data={"test": str(echo_data[1])},
                         train={"max_steps": 30, "eval_every": 2},
                         causal_lm={"exact_match": False},
                         early_stopping={"metric": "eval_loss", "mode": "max", "patience": 2})
    summary, run = testing.run(recipe)
    evals = [r for r in records(run.dir) if "eval_loss" in r]
    assert summary["steps"] == 6
    assert summary["test"]["test_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-6)
    assert summary["test"]["test_loss"] > evals[-2]["eval_loss"]  # not the last weights'


def test_eval_split_test_repeats_the_test_figures(make_recipe, echo_data, capsys):
    summary, run = testing.run(make_recipe(data={"test": str(echo_data[1])},
                                           train={"max_steps": 2},
                                           causal_lm={"exact_match": False}))
    assert cli.main(["eval", str(run.dir), "--split", "test"]) == 0
    saved = json.loads((run.dir / "eval-test.json").read_text())
    assert saved["metrics"]["test_loss"] == pytest.approx(summary["test"]["test_loss"], rel=1e-4)
    assert "test_loss:" in capsys.readouterr().out


def test_eval_split_test_of_a_run_without_one(make_recipe, capsys):
    _, run = testing.run(make_recipe(train={"max_steps": 1}, causal_lm={"exact_match": False}))
    capsys.readouterr()
    assert cli.main(["eval", str(run.dir), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plugtune: error: --split test: the run has no data.test" in err


def test_missing_test_file_is_a_recipe_problem(make_recipe, tmp_path, capsys):
    recipe = make_recipe(data={"test": str(tmp_path / "nope.jsonl")})
    assert cli.main(["validate", str(recipe)]) == 2
    assert "data.test: file not found" in capsys.readouterr().err
