"""Preference objectives that are not DPO: the reward model (a one-output head trained on
pairs) and KTO (unpaired desirable/undesirable completions), on tiny models built here: their
losses equal the formulas on hand-made batches, a step is the same however the batch is split,
bad records are refused at validate with file:line, evaluation does not move with its batch
size, and a reward model exports as a one-label classifier giving the same rewards."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from plugtune import cli, hookimpl, loop, testing
from plugtune.data import Record
from plugtune.errors import DataError
from plugtune.plugins import kto, reward_model
from plugtune.plugins import preference_family as pref

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


def recipe_maker(tmp_path, model, task, records, lr, default_plugins):
    """``make(name, plugins, records, **sections) -> path``: a recipe training ``task`` on the
    tiny model, on ``records`` (held out: the same records; ``records=`` replaces the
    training file's)."""
    data = testing.write_jsonl(tmp_path / f"{task}.jsonl", records)

    def make(name=task, plugins=default_plugins, records=None, **sections):
        path = data if records is None else testing.write_jsonl(
            tmp_path / f"{name}-train.jsonl", records)
        recipe = {"description": f"tiny {task}", "model": str(model),
                  "plugins": [task, *plugins],
                  "data": {"train": str(path), "validation": str(data)},
                  "train": {"max_steps": 4, "lr": lr, "batch_size": 4, "seed": 0},
                  "output": {"dir": str(tmp_path / "runs"), "name": name}}
        for key, value in sections.items():
            recipe[key] = ({**recipe[key], **value} if isinstance(recipe.get(key), dict)
                           else value)
        return testing.write_recipe(tmp_path / f"{name}.yaml", **recipe)
    return make


@pytest.fixture
def reward_recipe(tmp_path, tiny_llama):
    return recipe_maker(tmp_path, tiny_llama, "reward_model", pair_records(), 3e-3, ("full",))


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
        "validation": str(tmp_path / "chat-train.jsonl")}, train={"max_steps": 12, "lr": 1e-2}))
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
    assert cli.main(["eval", str(run.dir), "--baseline"]) == 0
    baseline = json.loads((run.dir / "eval-validation-baseline.json").read_text())["metrics"]
    assert baseline["accuracy"] == pytest.approx(summary["eval_before"]["accuracy"])


def test_freeze_trains_the_reward_head(reward_recipe):
    weights = testing.WeightSnapshot()
    _, run = testing.run(reward_recipe("freeze", plugins=("freeze",),
                                       freeze={"last_n_blocks": 0}),
                         extra_plugins=[weights])
    changed = weights.changed(run.model)
    assert changed and all(k.startswith("score") for k in changed)


def test_shipped_kto_data_is_what_its_script_makes_of_the_pairs(tmp_path):
    from importlib.resources import files

    from plugtune.recipes.data import make_kto_data

    make_kto_data.main(["--out-dir", str(tmp_path)])
    shipped = files("plugtune.recipes.data")
    for split in ("train", "eval"):
        made = (tmp_path / f"kto_{split}.jsonl").read_text()
        assert made == (shipped / f"kto_{split}.jsonl").read_text()
        pairs = (shipped / f"preference_{split}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in made.splitlines()]
        assert len(records) == 2 * len(pairs) and sum(r["label"] for r in records) == len(pairs)


# ------------------------------------------------------------------------------------ KTO


def kto_records():
    """Unpaired answers to the echo prompts: the upper-cased word is desirable, another word
    is not; completions of different lengths."""
    records = []
    for i, w in enumerate(WORDS * 2):
        good = i % 3 != 2
        answer = " ".join([w.upper()] * (1 + i % 4)) if good else WORDS[(i + 3) % 8].upper()
        records.append({"prompt": f"Echo: {w}", "completion": answer, "label": good})
    return records


@pytest.fixture
def kto_recipe(tmp_path, tiny_llama):
    return recipe_maker(tmp_path, tiny_llama, "kto", kto_records(), 1e-2, ("lora",))


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kto_loss_is_the_papers_formula():
    r = torch.tensor([0.5, -1.0, 2.0, 0.0])
    desirable = torch.tensor([True, True, False, False])
    beta, z0, wd, wu = 0.5, 0.3, 1.5, 0.7
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [wd * (1 - sig(beta * (0.5 - z0))), wd * (1 - sig(beta * (-1.0 - z0))),
                wu * (1 - sig(beta * (z0 - 2.0))), wu * (1 - sig(beta * (z0 - 0.0)))]
    torch.testing.assert_close(kto.kto_losses(beta, r, desirable, z0, wd, wu),
                               torch.tensor(expected))


def test_kto_mismatched_completion_is_fixed_by_the_data():
    """Each example's KL completion is the next record's (wrapping) whose prompt and
    completion differ: decided by the split's order alone, never by the batching."""
    rows = [{"prompt": "a", "completion": "X", "label": True},
            {"prompt": "a", "completion": "Y", "label": False},  # same prompt: skipped
            {"prompt": "b", "completion": "X", "label": True},   # same completion: skipped
            {"prompt": "c", "completion": "Z", "label": False}]
    records = [Record(r, "f.jsonl", i + 1) for i, r in enumerate(rows)]
    assert kto.mismatched(records) == [3, 2, 3, 0]
    with pytest.raises(DataError, match="f.jsonl:1: no other record"):
        kto.mismatched([Record({"prompt": p, "completion": "X", "label": True}, "f.jsonl", i + 1)
                        for i, p in enumerate("ab")])


def test_kto_loss_on_a_batch_is_the_formula_with_the_previous_steps_kl(kto_recipe):
    """compute_loss on a real batch: the sum of the formula over the examples with the
    plugin's z0 (the previous step's estimate), their count, and the KL estimate of the
    mismatched rows as a metric; in evaluation z0 is 0."""
    recipe, pm = testing.load_recipe(kto_recipe(plugins=("full",)))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    plugin = next(p for p in pm.get_plugins() if isinstance(p, kto.KTO))
    model, data = run.model, run.data["train"]
    with torch.no_grad():  # perturb the policy away from its frozen copy
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = data.collate(data.examples[:6])
    plugin.z0 = 0.7
    with torch.no_grad():
        model.train()
        loss = plugin.plugtune_compute_loss(model, batch, recipe)
        logps = pref.sequence_logps(model, batch)[0]
        ref = pref.reference_logps(model, batch, recipe)
        model.eval()
        evaluated = plugin.plugtune_compute_loss(model, batch, recipe)
    n = 6
    r, kl = logps[:n] - ref[:n], logps[n:] - ref[n:]
    labels = batch[kto.LABEL]
    assert loss.count == n and labels.any() and not labels.all()
    torch.testing.assert_close(loss.sum, kto.kto_losses(0.1, r, labels, 0.7).sum())
    torch.testing.assert_close(evaluated.sum, kto.kto_losses(0.1, r, labels, 0.0).sum())
    torch.testing.assert_close(loss.metrics["kl"], kl.sum())
    total, count = loss.metrics["rewards/chosen"]
    assert count == labels.sum() and torch.allclose(total, (0.1 * r)[labels].sum())
    assert abs(loss.sum - evaluated.sum) > 1e-4


def test_kto_step_is_the_same_however_the_batch_is_split(kto_recipe):
    """8 examples a step, three SGD steps (the third uses the second's KL estimate, the first
    measured after an update), as 8x1, 2x4 and 1x8: the same weights."""
    runs = {}
    for batch, accum in ((8, 1), (2, 4), (1, 8)):
        name = f"kto-{batch}x{accum}"
        recipe = kto_recipe(name, plugins=("full",), train={
            "max_steps": 3, "lr": 0.5, "batch_size": batch, "grad_accum": accum,
            "max_grad_norm": None, "eval_every": None}, kto={"beta": 1.0})
        summary, _ = testing.run(recipe, extra_plugins=[SGD()])
        runs[name] = load_file(Path(summary["artifact"]) / "model.safetensors")
        kl = [r["kl"] for r in records_of(Path(summary["artifact"]).parent) if "lr" in r]
        assert kl[0] == 0 and kl[1] > 0, "the third step's reference point should not be 0"
    for name in ("kto-2x4", "kto-1x8"):
        assert max_difference(runs["kto-8x1"], runs[name]) <= 1e-5


def test_kto_two_processes_take_the_same_steps_as_one(kto_recipe, tmp_path):
    """2 CPU processes x 4 examples (torchrun) == 1 process x 8, over three AdamW steps: the
    KL estimate each step passes to the next is the whole step's, over both processes. (A
    small rate: AdamW's first steps move each weight by about lr times the sign of its
    gradient, so the float rounding of near-zero gradients shows at lr scale.)"""
    over = {"train": {"max_steps": 3, "lr": 1e-4, "batch_size": 8, "eval_every": None}}
    one, _ = testing.run(kto_recipe("one", plugins=("full",), **over))
    two = kto_recipe("two", plugins=("full",), train={"max_steps": 3, "lr": 1e-4,
                                                      "batch_size": 4, "eval_every": None})
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "plugtune.cli", "run", str(two)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(Path(one["artifact"]) / "model.safetensors")
    b = load_file(tmp_path / "runs" / "two" / "model" / "model.safetensors")
    assert max_difference(a, b) <= 1e-5
    kl = [[r["kl"] for r in records_of(d) if "lr" in r]
          for d in (Path(one["artifact"]).parent, tmp_path / "runs" / "two")]
    assert kl[1] == pytest.approx(kl[0], abs=1e-6) and kl[0][1] != 0


def test_kto_learns_and_logs_rewards_and_kl(kto_recipe):
    summary, run = testing.run(kto_recipe(train={"max_steps": 12}))
    steps = [r for r in records_of(run.dir) if "lr" in r]
    assert all({"rewards/chosen", "rewards/rejected", "kl"} <= set(r) for r in steps)
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["rewards/chosen"] == pytest.approx(0, abs=1e-6)  # LoRA starts as the base
    assert after["rewards/chosen"] > after["rewards/rejected"]
    assert after["eval_loss"] < before["eval_loss"]
    assert cli.main(["eval", str(run.dir)]) == 0  # z0 = 0 in evaluations: the same figures
    again = json.loads((run.dir / "eval-validation.json").read_text())["metrics"]
    for key in ("eval_loss", "rewards/chosen", "rewards/rejected", "kl"):
        assert again[key] == pytest.approx(after[key], abs=1e-5)


def test_kto_resumes_with_its_reference_point(kto_recipe):
    """Stopped after step 2 (its checkpoint keeps z0) and resumed: the same weights as a run
    never stopped; a resume that forgot z0 would take step 3 with z0 = 0."""
    from plugtune.resume import resume

    common = {"train": {"max_steps": 4, "save_every": 2, "eval_every": None}}
    _, straight = testing.run(kto_recipe("straight", plugins=("full",), **common))
    assert json.loads((straight.dir / "checkpoints" / "step-2" / kto.STATE).read_text())["z0"] > 0
    _, stopped = testing.run(kto_recipe("stopped", plugins=("full",), **common))
    shutil.rmtree(stopped.dir / "checkpoints" / "step-4")  # as if killed during step 3
    shutil.rmtree(stopped.dir / "model")
    manifest = json.loads((stopped.dir / "manifest.json").read_text())
    (stopped.dir / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    resume(stopped.dir, echo=lambda *a: None)
    a = load_file(stopped.dir / "model" / "model.safetensors")
    b = load_file(straight.dir / "model" / "model.safetensors")
    assert max_difference(a, b) == 0


@pytest.mark.parametrize("task, record, expected", [
    ("reward", {"prompt": "Echo: a", "chosen": "A"}, "no 'rejected'"),
    ("reward", {"prompt": "Echo: a", "rejected": "B"}, "no 'chosen'"),
    ("reward", {"prompt": "Echo: a", "chosen": "A", "rejected": "A"}, "the same"),
    ("reward", {"prompt": "Echo: a", "chosen": "A", "rejected": "B", "margin": "big"},
     "margin"),
    ("kto", {"prompt": "Echo: a", "completion": "A", "label": "yes"}, '"label" must be true'),
    ("kto", {"prompt": "Echo: a", "completion": "A", "label": 1}, '"label" must be true'),
    ("kto", {"prompt": "Echo: a", "label": True}, "no 'completion'"),
    ("kto", {"prompt": "Echo: a", "completion": 3, "label": True}, '"completion" must be'),
])
def test_bad_records_are_refused_at_validate_with_file_and_line(request, capsys, task, record,
                                                                expected):
    """One line naming the file and line of the bad record, before any model loads."""
    good = pair_records() if task == "reward" else kto_records()
    recipe = request.getfixturevalue(f"{task}_recipe")("bad",
                                                       records=good[:3] + [record] + good[:2])
    assert cli.main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "bad-train.jsonl:4" in line]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def test_kto_precomputed_reference_gives_the_adapter_references_losses(kto_recipe):
    """With LoRA the reference is the base (adapter disabled); precomputed once, it is the
    same log-probabilities: the same losses and KL estimates, and the file is in the run."""
    _, live = testing.run(kto_recipe("live"))
    _, once = testing.run(kto_recipe("once", kto={"reference": "precompute"}))
    assert (once.dir / pref.PRECOMPUTED).is_file()
    a = [r for r in records_of(live.dir) if "lr" in r]
    b = [r for r in records_of(once.dir) if "lr" in r]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-5)
    assert [r["kl"] for r in b] == pytest.approx([r["kl"] for r in a], abs=1e-5)
