"""Preference training (``dpo``, ``orpo``, ``plugtune.plugins.preference_family``): each loss is
its paper's formula on a hand-made batch; records are checked at validate with file:line; the
objective is the mean over a step's pairs whatever the micro-batch split; the reference is the
base with the adapter disabled, the starting adapter frozen, a frozen copy, or log-probabilities
precomputed once and read back on resume; the rewards metrics reach the logs and ``plugtune
eval``; the trained adapter loads in plain peft."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import WORDS
from plugtune import loop, testing
from plugtune.data import Record
from plugtune.errors import RecipeError
from plugtune.plugins import preference_family as pref
from plugtune.plugins.dpo import dpo_losses
from plugtune.plugins.orpo import orpo_losses

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


def pairs():
    """Echo the upper-cased word (chosen) rather than the word as it is (rejected)."""
    return [{"prompt": f"Echo: {w}\n", "chosen": w.upper(), "rejected": w} for w in WORDS]


def chat_pairs():
    return [{"prompt": [{"role": "user", "content": f"Echo: {w}"}], "chosen": w.upper(),
             "rejected": [{"role": "assistant", "content": w}]} for w in WORDS]


@pytest.fixture
def pref_data(tmp_path):
    return (testing.write_jsonl(tmp_path / "pairs.jsonl", pairs()),
            testing.write_jsonl(tmp_path / "val.jsonl", chat_pairs()[:4]))


@pytest.fixture
def pref_recipe(make_recipe, pref_data):
    """``pref_recipe(plugins, **sections)``: DPO + LoRA on the tiny Llama by default."""
    def make(plugins=("dpo", "lora"), name="recipe.yaml", **sections):
        train = {"max_steps": 2, "lr": 1e-2, "batch_size": 4, "grad_accum": 1, "seed": 0,
                 **sections.pop("train", {})}
        return make_recipe(name=name, plugins=list(plugins), train=train,
                           data={"train": str(pref_data[0]), "validation": str(pref_data[1])},
                           **sections)
    return make


def records_of(run_dir, kind="train"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if ("loss" in r) == (kind == "train")]


# ---------------------------------------------------------------------------------------------
# The formulas, on a hand-made batch.
# ---------------------------------------------------------------------------------------------

C, R = torch.tensor([-3.0, -5.0, -2.5]), torch.tensor([-4.0, -4.5, -6.0])
RC, RR = torch.tensor([-3.5, -4.8, -3.0]), torch.tensor([-3.9, -4.9, -5.0])


def test_sigmoid_is_dpo_with_label_smoothing():
    beta, ls = 0.1, 0.2
    for i in range(3):
        h = (C[i] - R[i]) - (RC[i] - RR[i])
        expected = -(1 - ls) * math.log(1 / (1 + math.exp(-beta * h))) \
            - ls * math.log(1 / (1 + math.exp(beta * h)))
        got = dpo_losses("sigmoid", beta, C, R, RC, RR, label_smoothing=ls)[i]
        assert got.item() == pytest.approx(expected, rel=1e-6)
    plain = dpo_losses("sigmoid", beta, C, R, RC, RR)
    assert torch.allclose(plain, -F.logsigmoid(beta * ((C - R) - (RC - RR))))


def test_robust_hinge_ipo_simpo():
    beta, ls = 0.5, 0.1
    h = ((C - R) - (RC - RR)).tolist()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    robust = [((1 - ls) * -math.log(sig(beta * x)) + ls * math.log(sig(-beta * x))) / (1 - 2 * ls)
              for x in h]
    hinge = [max(0.0, 1 - beta * x) for x in h]
    ipo = [(x - 1 / (2 * beta)) ** 2 for x in h]
    simpo = [-math.log(sig(beta * (c - r) - 0.3)) for c, r in zip(C.tolist(), R.tolist())]
    for kind, want in (("robust", robust), ("hinge", hinge), ("ipo", ipo)):
        got = dpo_losses(kind, beta, C, R, RC, RR, label_smoothing=ls if kind == "robust" else 0)
        assert got.tolist() == pytest.approx(want, rel=1e-6), kind
    assert dpo_losses("simpo", beta, C, R, gamma=0.3).tolist() == pytest.approx(simpo, rel=1e-6)


def test_orpo_formula():
    c, r = torch.tensor([-0.3, -1.2]), torch.tensor([-0.9, -0.4])
    losses, nll, odds = orpo_losses(0.25, c, r)
    for i in range(2):
        lo = lambda x: x - math.log(1 - math.exp(x))  # noqa: E731
        ratio = lo(c[i].item()) - lo(r[i].item())
        assert odds[i].item() == pytest.approx(ratio, rel=1e-5)
        want = -c[i].item() - 0.25 * math.log(1 / (1 + math.exp(-ratio)))
        assert losses[i].item() == pytest.approx(want, rel=1e-5)
    assert nll.tolist() == pytest.approx([0.3, 1.2])


# ---------------------------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------------------------


def test_dpo_lora_trains_and_logs_rewards(pref_recipe):
    _, run = testing.run(pref_recipe(train={"max_steps": 4}))
    run_dir = run.dir
    train = records_of(run_dir)
    assert all(k in r for r in train for k in REWARDS)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert train[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    evals = records_of(run_dir, "eval")
    assert evals[-1]["rewards/margins"] > evals[0]["rewards/margins"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
