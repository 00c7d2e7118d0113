"""The ``lm_eval`` plugin: an lm-evaluation-harness task whose data is local (a tiny multiple
choice task shipped in tests/data/lm_eval_task) runs on the trained model in memory in the
final evaluation, and its figure lands in metrics.jsonl, the report and the trackers' names;
``plugtune eval RUN`` gives the same figure from the saved model; a missing lm-eval, an unknown
task and a wrong include_path are one line at validate."""
import json
import sys
from pathlib import Path

import pytest

from plugtune import cli

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "data" / "lm_eval_task"
KEY = "lm_eval/echo_choice/acc"


@pytest.fixture
def benchmarked(make_recipe):
    def make(adapter="full", **lm_eval):
        return make_recipe(plugins=["causal_lm", adapter, "lm_eval"],
                           lm_eval={"tasks": ["echo_choice"], "include_path": str(TASKS),
                                    "batch_size": 4, **lm_eval},
                           train={"max_steps": 4}, causal_lm={"exact_match": False})
    return make


def test_a_local_task_is_scored_at_the_end_and_by_plugtune_eval(benchmarked, tmp_path, capsys):
    assert cli.main(["run", str(benchmarked())]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "run"
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in x]
    assert [KEY in e for e in evals] == [False, True]  # the final evaluation only
    final = evals[-1][KEY]
    assert final in {k / 10 for k in range(11)}  # 10 documents
    assert f"held-out {KEY}: -> {final:.4f}" in out

    assert cli.main(["eval", str(run_dir)]) == 0
    record = json.loads((run_dir / "eval-validation.json").read_text())["metrics"]
    assert record[KEY] == final and not [k for k in record if "sample_len" in k]
    assert cli.main(["eval", str(run_dir), "--baseline"]) == 0  # the base model, scored too
    base = json.loads((run_dir / "eval-validation-baseline.json").read_text())["metrics"]
    assert base[KEY] in {k / 10 for k in range(11)}  # the saved model, reloaded: the same answers


def test_a_lora_model_with_a_limit_under_the_trackers_names(benchmarked, tmp_path):
    from plugtune import testing
    from plugtune.plugins.trackers import scalars

    summary, _ = testing.run(benchmarked("lora", limit=4))
    assert summary["eval_after"][KEY] in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 documents
    assert f"eval/{KEY}" in scalars(summary["eval_after"])


@pytest.mark.parametrize("lm_eval, said", [
    ({"tasks": ["echo_choise"]}, "lm_eval.tasks: 'echo_choise' is none of lm-eval's tasks nor "
                                 f"{TASKS}'s (did you mean 'echo_choice'?)"),
    ({"include_path": "/nonexistent/tasks"}, "lm_eval.include_path: /nonexistent/tasks is not "
                                             "a folder"),
])
def test_bad_lm_eval_keys_are_one_line_at_validate(benchmarked, capsys, lm_eval, said):
    assert cli.main(["validate", str(benchmarked(**lm_eval))]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err


def test_without_lm_eval_installed_validate_names_the_extra(benchmarked, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: find_spec is None
    assert cli.main(["validate", str(benchmarked())]) == 2
    err = capsys.readouterr().err
    assert "lm_eval: lm-evaluation-harness is not installed; pip install " \
           "'plugtune[lm_eval]'" in err and len(err.strip().splitlines()) == 1, err


def test_a_head_model_is_refused_before_the_first_step(tmp_path, tiny_llama, capsys):
    from test_heads import head_recipe, toy_texts

    recipe = head_recipe(tmp_path, tiny_llama, "sequence_classification", toy_texts(),
                         plugins=["sequence_classification", "full", "lm_eval"],
                         lm_eval={"tasks": ["echo_choice"], "include_path": str(TASKS)})
    assert cli.main(["run", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "lm_eval: lm-evaluation-harness scores causal language models (the causal_lm " \
           "task), and this run's model is a LlamaForSequenceClassification" in err
    steps = [x for x in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x] if (tmp_path / "runs" / "run" / "metrics.jsonl").exists() else []
    assert steps == []
