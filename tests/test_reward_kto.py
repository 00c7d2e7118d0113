"""Preference objectives that are not DPO: the reward model (a one-output head trained on
pairs) and KTO (unpaired desirable/undesirable completions), on tiny models built here: their
losses equal the formulas on hand-made batches, a step is the same however the batch is split,
bad records are refused at validate with file:line, evaluation does not move with its batch
size, and a reward model exports as a one-label classifier giving the same rewards."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from plugtune import cli, hookimpl, testing
from plugtune.plugins import reward_model

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]


def pair_records():
    """Pairs of very different lengths: the right answer (the word upper-cased, several times
    in some records) against a wrong word."""
    records = []
    for i, w in enumerate(WORDS * 2):
        n = 1 + (i * 5) % 7
        wrong = WORDS[(i + 3) % 8]
        records.append({"prompt": f"Echo: {w}" + " " + " ".join([w] * (i % 3)),
                        "chosen": " ".join([w.upper()] * n), "rejected": wrong.upper(),
                        **({"margin": 0.5 * (i % 3)} if i % 2 else {})})
    return records


class SGD:
    """Plain SGD: the update is the gradient itself."""

    @hookimpl
    def plugtune_build_optimizer(self, params, recipe):
        return torch.optim.SGD(params, lr=recipe.train.lr)


@pytest.fixture
def reward_recipe(tmp_path, tiny_llama):
    data = testing.write_jsonl(tmp_path / "pairs.jsonl", pair_records())

    def make(name="reward", plugins=("full",), records=None, **sections):
        path = data if records is None else testing.write_jsonl(tmp_path / f"{name}.jsonl",
                                                                records)
        recipe = {"description": "tiny reward model", "model": str(tiny_llama),
                  "plugins": ["reward_model", *plugins],
                  "data": {"train": str(path), "validation": str(data)},
                  "train": {"max_steps": 4, "lr": 3e-3, "batch_size": 4, "seed": 0},
                  "output": {"dir": str(tmp_path / "runs"), "name": name}}
        for key, value in sections.items():
            recipe[key] = ({**recipe[key], **value} if isinstance(recipe.get(key), dict)
                           else value)
        return testing.write_recipe(tmp_path / f"{name}.yaml", **recipe)
    return make


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------ reward model


def test_reward_pair_loss_is_the_formula():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    margin = torch.tensor([0.0, 0.5, 1.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    plain = [-math.log(sig(1.0)), -math.log(sig(-2.0)), -math.log(sig(0.0))]
    torch.testing.assert_close(reward_model.pair_losses(chosen, rejected),
                               torch.tensor(plain))
    with_margin = [-math.log(sig(1.0)), -math.log(sig(-2.5)), -math.log(sig(-1.0))]
    torch.testing.assert_close(reward_model.pair_losses(chosen, rejected, margin),
                               torch.tensor(with_margin))
    centred = [w + 0.1 * s ** 2 for w, s in zip(with_margin, [3.0, 0.0, 1.0])]
    torch.testing.assert_close(reward_model.pair_losses(chosen, rejected, margin, 0.1),
                               torch.tensor(centred))


def test_reward_loss_is_a_sum_over_pairs_like_trls_mean(tiny_llama, reward_recipe):
    """compute_loss on a hand-made batch: the sum of the pair losses and the number of pairs;
    sum / count is TRL RewardTrainer's batch loss (mean of -logsigmoid, plus the coefficient
    times the mean squared sum)."""
    recipe, pm = testing.load_recipe(
        reward_recipe(reward_model={"center_rewards_coefficient": 0.01}))
    logits = torch.tensor([[1.5], [0.2], [-0.3], [0.4], [0.1], [0.9]])  # 3 chosen, 3 rejected
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    batch = {"input_ids": torch.zeros(6, 3, dtype=torch.long),
             "attention_mask": torch.ones(6, 3), "margin": torch.tensor([0.0, 1.0, 0.0])}
    loss = reward_model.plugtune_compute_loss(model, batch, recipe)
    assert loss.count == 3
    rc, rr = logits[:3, 0], logits[3:, 0]
    trl = (-torch.nn.functional.logsigmoid(rc - rr - batch["margin"]).mean()
           + 0.01 * torch.mean((rc + rr) ** 2))
    torch.testing.assert_close(loss.sum / loss.count, trl)


def test_reward_step_is_the_same_however_the_batch_is_split(reward_recipe):
    """8 pairs of uneven lengths in one SGD step, as 8x1, 2x4 and 1x8: the same weights."""
    runs = {}
    for batch, accum in ((8, 1), (2, 4), (1, 8)):
        name = f"split-{batch}x{accum}"
        recipe = reward_recipe(name, train={"max_steps": 1, "lr": 0.5, "batch_size": batch,
                                            "grad_accum": accum, "max_grad_norm": None,
                                            "eval_every": None},
                               reward_model={"center_rewards_coefficient": 0.1})
        summary, _ = testing.run(recipe, extra_plugins=[SGD()])
        runs[name] = load_file(Path(summary["artifact"]) / "model.safetensors")
    for name in ("split-2x4", "split-1x8"):
        assert max_difference(runs["split-8x1"], runs[name]) <= 1e-5


def test_reward_model_learns_and_reports_pairwise_accuracy(reward_recipe):
    summary, run = testing.run(reward_recipe(train={"max_steps": 12, "lr": 1e-2}))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.9
    assert after["margin"] > before["margin"]
    logged = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "lr" in r]
    assert steps and all(0 <= r["accuracy"] <= 1 and "margin" in r for r in steps)


def test_reward_model_trains_on_conversations(reward_recipe, tmp_path):
    """Message-list prompts rendered with the chat template: the pair shares the prompt's
    tokens, and the model learns."""
    records = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": r["rejected"]} for r in pair_records()]
    summary, run = testing.run(reward_recipe("chat", records=records, data={
        "validation": str(tmp_path / "chat.jsonl")}, train={"max_steps": 12, "lr": 1e-2}))
    example = run.data["train"].examples[0]
    assert run.tokenizer.decode(example["prompt_ids"]).startswith("<|im_start|>user")
    assert summary["eval_after"]["accuracy"] > summary["eval_before"]["accuracy"]


def test_reward_eval_does_not_depend_on_its_batch_size(reward_recipe):
    results = []
    for size in (1, 3, 16):
        summary, _ = testing.run(reward_recipe(f"eval-{size}", train={
            "max_steps": 2, "eval_every": 100, "eval_batch_size": size}))
        results.append(summary["eval_after"])
    for other in results[1:]:
        for key in ("eval_loss", "accuracy", "margin", "rewards/chosen"):
            assert other[key] == pytest.approx(results[0][key], abs=1e-5)


@pytest.mark.parametrize("plugins", [("full",), ("lora",)])
def test_reward_model_exports_as_a_one_label_classifier(reward_recipe, tmp_path, capsys,
                                                        plugins):
    from transformers import AutoModelForSequenceClassification

    name = "export-" + plugins[0]
    summary, run = testing.run(reward_recipe(name, plugins=plugins))
    out = tmp_path / f"{name}-out"
    assert cli.main(["export", str(run.dir), str(out), "--merge"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.id2label == {0: "reward"}
    batch = run.data["validation"].collate(run.data["validation"].examples[:4])
    with torch.no_grad():
        exported = model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        trained = torch.cat(reward_model.rewards(run.model.eval(), batch))
    torch.testing.assert_close(exported, trained, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert cli.main(["eval", str(run.dir)]) == 0
    evaluated = json.loads((run.dir / "eval-validation.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(summary["eval_after"]["accuracy"])
    assert evaluated["margin"] == pytest.approx(summary["eval_after"]["margin"], abs=1e-5)


def test_freeze_trains_the_reward_head(reward_recipe):
    weights = testing.WeightSnapshot()
    _, run = testing.run(reward_recipe("freeze", plugins=("freeze",),
                                       freeze={"last_n_blocks": 0}),
                         extra_plugins=[weights])
    changed = weights.changed(run.model)
    assert changed and all(k.startswith("score") for k in changed)


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "Echo: a", "chosen": "A"}, "no 'rejected'"),
    ({"prompt": "Echo: a", "rejected": "B"}, "no 'chosen'"),
    ({"prompt": "Echo: a", "chosen": "A", "rejected": "A"}, "the same"),
    ({"prompt": "Echo: a", "chosen": "A", "rejected": "B", "margin": "big"}, "margin"),
])
def test_bad_pairs_are_refused_at_validate_with_file_and_line(reward_recipe, capsys, record,
                                                              expected):
    records = pair_records()[:3] + [record] + pair_records()[:2]
    recipe = reward_recipe("bad", records=records)
    assert cli.main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "bad.jsonl:4" in line]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def test_shipped_preference_data_is_what_its_script_generates(tmp_path):
    from importlib.resources import files

    from plugtune.recipes.data import make_preference_data

    make_preference_data.main(["--out-dir", str(tmp_path)])
    shipped = files("plugtune.recipes.data")
    for name in ("preference", "preference_text", "kto"):
        for split in ("train", "eval"):
            made = (tmp_path / f"{name}_{split}.jsonl").read_text()
            assert made == (shipped / f"{name}_{split}.jsonl").read_text()
    pairs = [json.loads(line) for line in made.splitlines()]
    assert len(pairs) == 120 and sum(r["label"] for r in pairs) == 60
