"""`causal_lm.metrics`: exact match, BLEU, chrF and ROUGE of greedy answers against the held-out
references, in metrics.jsonl, the summary and `plugtune eval`; `causal_lm.exact_match: false`
still drops exact match."""
import json

import pytest

from plugtune import cli, testing
from plugtune.plugins._generation_metrics import chosen, score

ALL = ["exact_match", "bleu", "chrf", "rouge"]
REFS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]


def test_perfect_answers_score_the_maximum():
    assert score(ALL, REFS, REFS) == pytest.approx(
        {"exact_match": 1.0, "bleu": 100.0, "chrf": 100.0, "rouge1": 1.0, "rouge2": 1.0,
         "rougeL": 1.0})


def test_unrelated_answers_score_nothing():
    got = score(ALL, ["zebra umbrella", "violin"], REFS)
    assert got["exact_match"] == got["bleu"] == got["rouge1"] == got["rougeL"] == 0.0
    assert got["chrf"] < 10


def test_partial_answers_score_between():
    got = score(ALL, ["the cat sat on a mat", "a quick brown fox jumped over a dog"], REFS)
    assert got["exact_match"] == 0.0
    assert 0 < got["bleu"] < 100 and 0 < got["chrf"] < 100
    assert 0 < got["rouge2"] < got["rouge1"] < 1
    # rouge-score's F-measure: 5 of the 6 unigrams of the first pair match
    assert score(["rouge"], ["the cat sat on a mat"], REFS[:1])["rouge1"] == pytest.approx(5 / 6)


def test_exact_match_ignores_case_spacing_and_a_final_period():
    assert score(["exact_match"], ["  The cat  sat on the mat."], REFS[:1]) == {"exact_match": 1}


def test_chosen_metrics_keep_the_old_exact_match_switch():
    assert chosen(None) == ["exact_match"]
    assert chosen(None, exact_match=False) == []
    assert chosen(["exact_match", "rouge"], exact_match=False) == ["rouge"]
    assert chosen(["bleu"]) == ["bleu"]


def evals(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_loss" in r]


def test_a_run_reports_every_chosen_metric(make_recipe, capsys):
    recipe = make_recipe(train={"max_steps": 30}, causal_lm={"metrics": ALL})
    assert cli.main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    before, after = evals(recipe.parent / "runs" / "run")
    for key in ("exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert key in before and key in after
        assert f"held-out {key}: {before[key]:.4f} -> {after[key]:.4f}" in out
    # the echo task is being learnt: answers come closer to their references
    assert after["rougeL"] > before["rougeL"] and after["chrf"] > before["chrf"]
    assert cli.main(["eval", str(recipe.parent / "runs" / "run")]) == 0
    assert f"rougeL: {after['rougeL']:.4f}" in capsys.readouterr().out


def test_metrics_without_exact_match(make_recipe):
    summary, _ = testing.run(make_recipe(train={"max_steps": 1},
                                         causal_lm={"metrics": ["rouge"], "max_new_tokens": 3}))
    assert {"rouge1", "rouge2", "rougeL"} <= set(summary["eval_after"])
    assert "exact_match" not in summary["eval_after"] and "bleu" not in summary["eval_after"]


def test_exact_match_false_still_drops_it(make_recipe):
    summary, _ = testing.run(make_recipe(train={"max_steps": 1},
                                         causal_lm={"exact_match": False}))
    assert set(summary["eval_after"]) == {"step", "eval_loss", "perplexity"}


def test_an_unknown_metric_is_one_line(make_recipe, capsys):
    assert cli.main(["validate", str(make_recipe(causal_lm={"metrics": ["rogue"]}))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "causal_lm.metrics.0: Input should be 'exact_match', 'bleu', 'chrf' or 'rouge'" in err
