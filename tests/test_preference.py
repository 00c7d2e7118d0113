"""Preference training (``dpo``, ``orpo``, ``plugtune.plugins.preference_family``): each loss is
its paper's formula on a hand-made batch; records are checked at validate with file:line; the
objective is the mean over a step's pairs whatever the micro-batch split; the reference is the
base with the adapter disabled, the starting adapter frozen, a frozen copy, or log-probabilities
precomputed once and read back on resume; the rewards metrics reach the logs and ``plugtune
eval``; the trained adapter loads in plain peft."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import WORDS
from test_long_runs import NanAtStep
from plugtune import cli, evaluation, hookimpl, loop, testing
from plugtune.data import Record
from plugtune.errors import PlugtuneError, RecipeError
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


class SigtermAt:
    """As if SIGTERM came during step ``step``: the run stops after it with a checkpoint."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def plugtune_step_end(self, run, step):
        if step == self.step:
            run.signum = signal.SIGTERM


class SGD:
    """Plain SGD: the update is the gradient itself (AdamW's first step hides its scale)."""

    @hookimpl
    def plugtune_build_optimizer(self, params, recipe):
        return torch.optim.SGD(params, lr=recipe.train.lr)


def adapter_weights(run):
    return load_file(run.dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("plugin,section", [("dpo", {"loss_type": "sigmoid"}),
                                            ("dpo", {"loss_type": "ipo"}), ("orpo", {})])
def test_a_step_is_the_mean_over_its_pairs_however_split(pref_recipe, plugin, section):
    """8 pairs a step, two steps, as 8x1, 2x4 and 1x8 (batch_size x grad_accum): the same
    adapter weights to 1e-5."""
    runs = {}
    for batch, accum in ((8, 1), (2, 4), (1, 8)):
        name = f"{batch}x{accum}"
        recipe = pref_recipe((plugin, "lora"), f"{name}.yaml", output={"name": name},
                             train={"batch_size": batch, "grad_accum": accum, "lr": 0.5,
                                    "max_grad_norm": None, "eval_every": None},
                             **{plugin: section})
        _, run = testing.run(recipe, extra_plugins=[SGD()])
        runs[name] = adapter_weights(run)
    base = runs["8x1"]
    for name in ("2x4", "1x8"):
        assert max((base[k] - runs[name][k]).abs().max().item() for k in base) <= 1e-5
    assert max(v.abs().max().item() for k, v in base.items() if "lora_B" in k) > 1e-3


# ---------------------------------------------------------------------------------------------
# Log-probabilities and the reference.
# ---------------------------------------------------------------------------------------------


def a_batch(tokenizer):
    examples = [pref.example(*pref.encode_pair(p, tokenizer, "t:1")) for p in pairs()[:3]]
    return pref.collator(tokenizer.pad_token_id)(examples)


def naive_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(1), mask.sum(1)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_sequence_logps_equal_the_full_logits_in_chunks(arch, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = a_batch(AutoTokenizer.from_pretrained(path))
    want, n = naive_logps(model, batch)
    for chunk in (None, 3):
        for select in (True, False):  # a GPU runs every position, masked
            got, counts = pref.sequence_logps(model, batch, chunk_tokens=chunk, select=select)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert counts.tolist() == n.tolist()
    # the gradients too (each chunk recomputed in backward)
    got, _ = pref.sequence_logps(model, batch, chunk_tokens=3)
    got.sum().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    naive_logps(model, batch)[0].sum().backward()
    for a, p in zip(chunked, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_the_reference_of_an_adapter_is_the_base_with_the_adapter_disabled(pref_recipe,
                                                                            tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = a_batch(AutoTokenizer.from_pretrained(tiny_llama))
    with torch.no_grad():
        want = pref.sequence_logps(base, batch)[0]
    recipe, pm = testing.load_recipe(pref_recipe())
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    with torch.no_grad():  # an adapter that changes the model
        for n, p in run.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    got = pref.reference_logps(run.model, batch, recipe)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    policy = pref.sequence_logps(run.model, batch)[0]
    assert (policy - want).abs().max() > 1e-2


@pytest.fixture
def sft_run(make_recipe):
    """A finished SFT run with a LoRA adapter (causal_lm on the echo chats)."""
    _, run = testing.run(make_recipe("sft.yaml", plugins=["causal_lm", "lora"],
                                     train={"max_steps": 6, "lr": 1e-2, "eval_every": None},
                                     output={"name": "sft"}))
    return run.dir


def test_starting_from_an_adapter_makes_it_the_frozen_reference(pref_recipe, sft_run,
                                                                 tiny_llama):
    """SFT -> DPO: the run trains the SFT adapter further, against a frozen copy of it, so the
    first step's rewards are exactly 0 (with the base as the reference they are not); the
    frozen copy stays frozen and unchanged, and is not saved; the saved adapter loads in plain
    peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, pm = testing.load_recipe(pref_recipe(model={"name": str(tiny_llama),
                                                        "adapter": str(sft_run)},
                                                 train={"max_steps": 3}))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    batch = a_batch(run.tokenizer)
    with torch.no_grad():
        policy = pref.sequence_logps(run.model, batch)[0]
        with run.model.disable_adapter():
            base = pref.sequence_logps(run.model, batch)[0]
    assert (policy - base).abs().max() > 1e-2  # the SFT adapter was loaded, and matters
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    loop.train(run, echo=lambda *a: None)
    first = records_of(run.dir)[0]
    assert first["rewards/margins"] == 0 and first["rewards/chosen"] == 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    model = run.accelerator.unwrap_model(run.model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(".reference." not in n for n in trainable)
    sft = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    frozen = {n: p for n, p in model.named_parameters() if ".reference." in n}
    assert len(frozen) == len(sft) > 0
    for n, p in frozen.items():
        torch.testing.assert_close(p, sft[n.replace("base_model.model.", "base_model.model.", 1)
                                        .replace(".reference", "")], rtol=0, atol=0)
    assert not (run.dir / "adapter" / "reference").exists()
    # plugtune eval rebuilds the same reference (the starting adapter, read again)
    record, _ = evaluation.evaluate(run.dir)
    logged = records_of(run.dir, "eval")[-1]
    for key in REWARDS:
        assert record[key] == pytest.approx(logged[key], abs=1e-5), key
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                       run.dir / "adapter")
    with torch.no_grad():
        again = pref.sequence_logps(loaded, a_batch(AutoTokenizer.from_pretrained(tiny_llama)))[0]
        trained = pref.sequence_logps(model, batch)[0]
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-5)


def test_full_fine_tuning_copy_and_precompute_agree_and_precompute_resumes(pref_recipe,
                                                                            monkeypatch):
    """Full fine-tuning against a frozen copy, and against log-probabilities precomputed once:
    the same losses. The precomputed file is written before the first step and read back by
    a resumed run (never computed again: the model has trained), which ends bit-identical to
    a run that was never stopped."""
    from plugtune.resume import resume

    common = {"train": {"max_steps": 4, "save_every": 2, "lr": 1e-3}}
    _, copy = testing.run(pref_recipe(("dpo", "full"), "copy.yaml", output={"name": "copy"},
                                      **common))
    _, straight = testing.run(pref_recipe(("dpo", "full"), "pre.yaml", output={"name": "pre"},
                                          dpo={"reference": "precompute"}, **common))
    assert (straight.dir / pref.PRECOMPUTED).is_file()
    losses = [r["loss"] for r in records_of(copy.dir)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert [r["loss"] for r in records_of(straight.dir)] == pytest.approx(losses, abs=1e-6)

    recipe, pm = testing.load_recipe(pref_recipe(("dpo", "full"), "stopped.yaml",
                                                 output={"name": "stopped"},
                                                 dpo={"reference": "precompute"}, **common))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    pm.register(SigtermAt(2))
    with pytest.raises(PlugtuneError, match="checkpoint"):
        loop.train(run, echo=lambda *a: None)
    saved = (run.dir / pref.PRECOMPUTED).read_bytes()

    def never(*args, **kwargs):
        raise AssertionError("reference log-probabilities computed again on resume")

    monkeypatch.setattr(pref, "_current_or_reference", never)
    resume(run.dir, echo=lambda *a: None)
    assert (run.dir / pref.PRECOMPUTED).read_bytes() == saved
    a = load_file(run.dir / "model" / "model.safetensors")
    b = load_file(straight.dir / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records_of(run.dir)] == [r["loss"] for r in records_of(straight.dir)]


# ---------------------------------------------------------------------------------------------
# Validate: records and conflicts, one line each, before any model loads.
# ---------------------------------------------------------------------------------------------


def problems_of(path, overrides=()):
    with pytest.raises(RecipeError) as caught:
        testing.load_recipe(path, overrides)
    return caught.value.problems


@pytest.mark.parametrize("record,says", [
    ({"prompt": "Echo: a", "chosen": "A"}, "needs \"prompt\", \"chosen\" and \"rejected\"; this "
                                           "one has no 'rejected'"),
    ({"prompt": "Echo: a", "chosen": "A", "rejected": "A"}, "are the same"),
    ({"prompt": "Echo: a", "chosen": 3, "rejected": "a"},
     "\"chosen\" must be a string or a list of assistant messages, got a number"),
    ({"prompt": None, "chosen": "A", "rejected": "a"}, "\"prompt\" must be a string or a list "
                                                       "of messages, got null"),
    ({"prompt": "Echo: a", "chosen": [{"role": "assistant", "content": "A"}], "rejected": "a"},
     "give the prompt as messages too"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "A"}],
      "rejected": "a"}, "list of {\"role\": \"assistant\""),
])
def test_bad_records_are_named_with_file_and_line(pref_recipe, tmp_path, record, says):
    bad = testing.write_jsonl(tmp_path / "bad.jsonl", pairs()[:2] + [record])
    found = problems_of(pref_recipe(), [f"data.train={bad}"])
    assert len(found) == 1 and f"bad.jsonl:3: " in found[0] and says in found[0], found


@pytest.mark.parametrize("plugins,overrides,says", [
    (("dpo", "lora"), ["train.packing=true"], "train.packing: preference pairs"),
    (("dpo", "causal_lm", "lora"), [], "task"),
    (("dpo", "full"), ["dpo.reference=adapter"], "dpo.reference: adapter: the reference is the "
                                                 "model with its adapter disabled"),
    (("dpo", "lora"), ["dpo.loss_type=simpo", "dpo.reference=precompute"],
     "dpo.reference: precompute: this loss needs no reference model"),
    (("dpo", "lora"), ["dpo.reference=none"], "dpo.reference: none: this loss compares"),
    (("dpo", "lora"), ["dpo.reference=copy"], "dpo.reference: copy: with the adapter method"),
    (("dpo", "lora"), ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"],
     "dpo.label_smoothing: is for loss_type sigmoid or robust, not ipo"),
    (("dpo", "lora"), ["dpo.simpo_gamma=1"], "dpo.simpo_gamma: is for loss_type simpo"),
    (("dpo", "lora"), ["dpo.label_smoothing=0.5"], "dpo.label_smoothing"),
    (("dpo", "lora"), ["dpo.beta=0"], "dpo.beta"),
    (("dpo", "lora"), ["dpo.loss_type=kto"], "dpo.loss_type"),
    (("orpo", "lora"), ["train.packing=true"], "train.packing: preference pairs"),
    (("dpo", "lora"), ["model.adapter=nowhere"], "model.adapter: "),
    (("dpo", "full"), ["model.adapter=nowhere"], "model.adapter: starting from an adapter needs"),
])
def test_conflicts_are_refused_at_validate(pref_recipe, plugins, overrides, says):
    found = problems_of(pref_recipe(plugins), overrides)
    assert any(says in p for p in found), found
    assert all("\n" not in p for p in found)


def test_model_adapter_must_hold_an_adapter_of_the_method(pref_recipe, sft_run, tmp_path):
    (tmp_path / "empty").mkdir()
    found = problems_of(pref_recipe(), [f"model.adapter={tmp_path / 'empty'}"])
    assert found == [f"model.adapter: {tmp_path / 'empty'}: no adapter_config.json in it; give a "
                     "finished plugtune run directory of an adapter method or a "
                     "PEFT adapter directory"] or any("no adapter_config.json" in p for p in found)
    found = problems_of(pref_recipe(("dpo", "ia3")), [f"model.adapter={sft_run}"])
    assert any("holds a LORA adapter, not ia3" in p for p in found), found
    testing.load_recipe(pref_recipe(), [f"model.adapter={sft_run}"])  # a run directory: fine
    testing.load_recipe(pref_recipe(), [f"model.adapter={sft_run / 'adapter'}"])


# ---------------------------------------------------------------------------------------------
# The planner.
# ---------------------------------------------------------------------------------------------


def test_the_plan_counts_two_rows_a_pair_and_the_reference(pref_recipe, make_recipe, capsys):
    from plugtune import cli
    from plugtune.plan import estimate

    def planned(path, overrides=()):
        recipe, pm = testing.load_recipe(path, overrides)
        return estimate(recipe, pm, "cuda")

    sft = planned(make_recipe("sft.yaml", plugins=["causal_lm", "full"]))
    copy = planned(pref_recipe(("dpo", "full")))
    pre = planned(pref_recipe(("dpo", "full")), ["dpo.reference=precompute"])
    lora = planned(pref_recipe())
    weights = sum(p.bytes for p in copy.plan.params)
    extra = {m.name: m.bytes for m in copy.plan.extra}
    assert extra["reference model (frozen copy)"] == weights
    assert not any("reference" in m.name for m in pre.plan.extra + lora.plan.extra)
    assert sum(copy.acts.blocks) == pytest.approx(2 * sum(sft.acts.blocks), rel=0.01)
    assert copy.total() - pre.total() >= weights

    # --fit: where the frozen copy is what does not fit, the precomputed reference does
    path = pref_recipe(("dpo", "full", "gradient_checkpointing"), train={"batch_size": 1})
    out = path.with_name("fit.yaml")
    code = cli.main(["plan", str(path), "--gpu", f"{planned(path).total() - weights // 2:.0f}B",
                     "--fit", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "dpo: {'reference': 'precompute'}" in text
    assert testing.load_recipe(out)[0]["dpo"].reference == "precompute"


# ---------------------------------------------------------------------------------------------
# More objectives, evaluation, continuing SFT.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plugins,section", [(("orpo", "lora"), {}),
                                             (("dpo", "lora"), {"dpo": {"loss_type": "simpo"}}),
                                             (("dpo", "lora"), {"dpo": {"loss_type": "hinge"}})])
def test_other_objectives_raise_the_margin(pref_recipe, plugins, section):
    _, run = testing.run(pref_recipe(plugins, train={"max_steps": 4}, **section))
    evals = records_of(run.dir, "eval")
    assert evals[-1]["rewards/margins"] > evals[0]["rewards/margins"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    if plugins[0] == "orpo":
        assert "nll_loss" in evals[-1] and "log_odds_ratio" in evals[-1]


def test_plugtune_eval_reports_the_rewards_of_a_finished_run(pref_recipe, tmp_path):
    _, run = testing.run(pref_recipe(train={"max_steps": 2}))
    done = subprocess.run([sys.executable, "-m", "plugtune.cli", "eval", str(run.dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for key in REWARDS:
        assert key in done.stdout, done.stdout
    baseline = subprocess.run([sys.executable, "-m", "plugtune.cli", "eval", str(run.dir),
                               "--baseline"], capture_output=True, text=True, timeout=300)
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    base = json.loads((run.dir / "eval-validation-baseline.json").read_text())["metrics"]
    assert base["rewards/margins"] == 0 and base["eval_loss"] == pytest.approx(math.log(2))
    written = json.loads((run.dir / "eval-validation.json").read_text())["metrics"]
    logged = records_of(run.dir, "eval")[-1]
    for key in REWARDS:
        assert written[key] == pytest.approx(logged[key], abs=1e-5)


def test_sft_continues_from_an_adapter(make_recipe, sft_run, tiny_llama):
    """``model.adapter`` with causal_lm: the SFT adapter trains on, so the first loss is about
    where the SFT run ended, well below a fresh adapter's."""
    def first_loss(name, model):
        _, run = testing.run(make_recipe(f"{name}.yaml", plugins=["causal_lm", "lora"],
                                         model=model, output={"name": name},
                                         train={"max_steps": 1, "eval_every": None}))
        return records_of(run.dir)[0]["loss"]

    fresh = first_loss("fresh", str(tiny_llama))
    more = first_loss("more", {"name": str(tiny_llama), "adapter": str(sft_run)})
    sft = records_of(sft_run)
    assert more < fresh - 0.1
    assert more < sft[0]["loss"] - 0.1


# ---------------------------------------------------------------------------------------------
# Pairs: shared prompt tokens, EOS, truncation.
# ---------------------------------------------------------------------------------------------


def test_pairs_share_the_prompt_and_end_as_sft_does(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt, chosen, rejected = pref.encode_pair(pairs()[0], tok, "t:1")
    assert tok.decode(prompt + chosen) == "Echo: apple\nAPPLE" + tok.eos_token
    assert chosen[-1] == rejected[-1] == tok.eos_token_id
    p2, c2, r2 = pref.encode_pair(chat_pairs()[0], tok, "t:1")
    rendered = tok.apply_chat_template([{"role": "user", "content": "Echo: apple"},
                                        {"role": "assistant", "content": "APPLE"}], tokenize=False)
    assert tok.decode(p2 + c2) == rendered
    assert tok.decode(r2).startswith("apple")
    batch = pref.collator(tok.pad_token_id)([pref.example(prompt, chosen, rejected)])
    assert batch["input_ids"].shape[0] == 2
    for row, answer in zip(batch["labels"], (chosen, rejected)):
        assert [t for t in row.tolist() if t != -100] == answer


def test_truncation_cuts_the_prompt_first_and_counts_what_it_drops(pref_recipe):
    prompt, chosen, rejected = list(range(10)), [20, 21, 22, 23], [20, 21, 24]
    assert pref.truncate_pair(prompt, chosen, rejected, 14) == (prompt, chosen, rejected)
    assert pref.truncate_pair(prompt, chosen, rejected, 8) == (prompt[-4:], chosen, rejected)
    assert pref.truncate_pair(prompt, chosen, rejected, 7, 4) == (prompt[-4:], chosen[:3],
                                                                  rejected)
    assert pref.truncate_pair(prompt, chosen, rejected, 6, 4) is None  # answers now the same

    recipe, pm = testing.load_recipe(pref_recipe(train={"max_length": 12}))
    tokenizer = pm.hook.plugtune_load_tokenizer(recipe=recipe)
    long = " ".join(WORDS * 2)
    records = [Record({"prompt": long, "chosen": "APPLE", "rejected": "apple"}, "d.jsonl", 1),
               Record({"prompt": "Echo: a", "chosen": long + " x", "rejected": long + " y"},
                      "d.jsonl", 2),
               Record(pairs()[1], "d.jsonl", 3)]
    said = []
    data = pref.tokenize(records, tokenizer, recipe, "train", echo=said.append)
    assert len(data.examples) == 2 and data.truncated == 1
    assert said == ["data: train 1 pair(s) dropped: their answers are the same once cut at "
                    "train.max_length=12 (first: d.jsonl:2); raise train.max_length or shorten "
                    "the prompts"]
    assert all(len(e["prompt_ids"] + e["chosen_ids"]) <= 12 for e in data.examples)


def test_two_processes_take_the_same_step_as_one(pref_recipe, tmp_path):
    """DPO + LoRA, 8 pairs a step: 2 CPU processes x 1x4 (torchrun) == 1 process x 8x1, over
    two AdamW steps, and the same logged rewards."""
    train = {"max_steps": 2, "lr": 1e-3, "eval_every": None}
    _, one = testing.run(pref_recipe(name="one.yaml", output={"name": "one"},
                                     train={**train, "batch_size": 8}))
    recipe = pref_recipe(name="two.yaml", output={"name": "two"},
                         train={**train, "batch_size": 1, "grad_accum": 4})
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "plugtune.cli", "run", str(recipe)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two_dir = tmp_path / "runs" / "two"
    a = adapter_weights(one)
    b = load_file(two_dir / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    for x, y in zip(records_of(one.dir), records_of(two_dir)):
        for key in ("loss",) + REWARDS:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key


def test_the_plan_of_a_run_started_from_an_adapter(pref_recipe, sft_run, tiny_llama):
    from plugtune.plan import estimate

    recipe, pm = testing.load_recipe(pref_recipe(model={"name": str(tiny_llama),
                                                        "adapter": str(sft_run)}))
    plan = estimate(recipe, pm, "cuda").plan
    adapter = sum(p.bytes for p in plan.params if p.trainable)
    assert {m.name: m.bytes for m in plan.extra}["reference adapter (frozen)"] == adapter > 0


@pytest.mark.parametrize("plugins,reference", [(("dpo", "full"), "auto"),
                                               (("dpo", "lora"), "auto"),
                                               (("dpo", "full"), "precompute")])
def test_under_bf16_autocast_the_first_step_is_exactly_log_2(pref_recipe, plugins, reference):
    """The reference pass runs as the policy's does (a frozen copy's forward under the run's
    autocast, its output layer as the policy's), so before any step they agree exactly."""
    recipe = pref_recipe(plugins, train={"max_steps": 1, "mixed_precision": "bf16",
                                         "eval_every": None}, output={"name": "bf16"},
                         dpo={"reference": reference})
    # a process of its own: accelerate's precision is set once per process
    done = subprocess.run([sys.executable, "-m", "plugtune.cli", "run", str(recipe)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first = records_of(recipe.parent / "runs" / "bf16")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/margins"] == 0


@pytest.mark.parametrize("plugins", [("dpo", "lora"), ("orpo", "lora"), ("kto", "lora")])
def test_a_non_finite_preference_step_is_skipped_and_the_guard_stops_divergence(
        pref_recipe, make_recipe, tiny_llama, tmp_path, plugins):
    """The NaN guard holds for preference objectives as for SFT: a non-finite step is not
    applied (the adapter keeps its weights) and is logged as skipped; three in a row stop the
    run as diverged, with no model saved."""
    if plugins[0] == "kto":
        data = testing.write_jsonl(tmp_path / "kto.jsonl", [
            {"prompt": f"Echo: {w}\n", "completion": c, "label": good}
            for w in WORDS for c, good in ((w.upper(), True), (w, False))])
        recipe = make_recipe(name="kto.yaml", plugins=list(plugins),
                             data={"train": str(data), "validation": str(data)},
                             train={"max_steps": 3, "lr": 1e-2, "batch_size": 4, "seed": 0})
    else:
        recipe = pref_recipe(plugins, train={"max_steps": 3})
    guard = NanAtStep(2)
    summary, run = testing.run(recipe, extra_plugins=[guard])
    steps = [m for m in records_of(run.dir) if "lr" in m]
    assert [m["step"] for m in steps if m.get("skipped")] == [2]
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3
    assert all(math.isfinite(v) for m in steps if not m.get("skipped")
               for k, v in m.items() if k.startswith("rewards/") and v is not None)

    with pytest.raises(Exception, match="training diverged"):
        testing.run(recipe, ["output.name=diverged", "train.max_steps=6"],
                    extra_plugins=[NanAtStep(*range(1, 7))])
    assert not (run.dir.parent / "diverged" / "model").exists()


@pytest.mark.parametrize("plugins,section", [(("dpo", "lora"), {}),
                                             (("dpo", "full"), {"dpo": {"reference": "precompute"}})])
def test_plugtune_reproduce_repeats_a_preference_run(pref_recipe, capsys, plugins, section):
    summary, run = testing.run(pref_recipe(plugins, train={"max_steps": 3}, **section))
    assert cli.main(["reproduce", str(run.dir)]) == 0
    assert "identical: the loss of all 3 steps compared" in capsys.readouterr().out
