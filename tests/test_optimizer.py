"""The optimizer plugins (``adamw``, ``adamw_8bit``): vectors, whatever their stored shape, get
no weight decay; bfloat16 weights keep their small updates with Kahan summation (on by default
for them), and a run with it resumes bit-identical."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from plugtune import cli, loop, testing
from plugtune.plugins import optimizer_family

OPTIMIZERS = {"adamw": ["causal_lm", "full"], "adamw_8bit": ["causal_lm", "full", "adamw_8bit"]}


def decay_of(run):
    """``{parameter name: weight decay}`` as the built optimizer applies it."""
    loop.train(run, echo=lambda *a: None)  # builds the optimizer (one step)
    by_id = {id(p): g["weight_decay"] for g in run.optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in run.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ia3_scaling_vectors_get_no_weight_decay(make_recipe, optimizer):
    """IA3 stores its vectors as (out, 1) and (1, in) matrices: still vectors, not decayed;
    a full fine-tune's weight matrices are."""
    plugins = OPTIMIZERS[optimizer][:1] + ["ia3"] + OPTIMIZERS[optimizer][2:]
    recipe, pm = testing.load_recipe(make_recipe(plugins=plugins, train={
        "max_steps": 1, "weight_decay": 0.1, "eval_every": None}))
    decay = decay_of(loop.setup(recipe, pm, echo=lambda *a: None))
    vectors = {n for n in decay if ".ia3_l." in n}
    assert vectors and decay == {n: 0.0 for n in vectors}
    run = loop.setup(*testing.load_recipe(make_recipe(
        "full.yaml", plugins=OPTIMIZERS[optimizer], train={
            "max_steps": 1, "weight_decay": 0.1, "eval_every": None}, output={"name": "full"})),
        echo=lambda *a: None)
    shapes = dict((n, p.shape) for n, p in run.model.named_parameters())
    decay = decay_of(run)
    assert {n for n, d in decay.items() if d == 0.0} == {
        n for n in decay if sum(s > 1 for s in shapes[n]) < 2}
    assert any(d == 0.1 for d in decay.values())


def changed_in_one_step(make_recipe, model, optimizer, dtype, kahan):
    """The fraction of weights whose value (as the optimizer holds it) changes in one full
    fine-tuning step at lr 1e-5, from the same bf16 starting values."""
    recipe, pm = testing.load_recipe(make_recipe(
        f"{optimizer}{dtype}{kahan}.yaml", plugins=OPTIMIZERS[optimizer],
        model={"name": str(model), "dtype": dtype},
        **({} if kahan is None else {optimizer: {"kahan_summation": kahan}}),
        train={"max_steps": 1, "lr": 1e-5, "max_grad_norm": None, "eval_every": None},
        output={"name": f"{optimizer}{dtype}{kahan}"}))
    run = loop.setup(recipe, pm, echo=lambda *a: None)
    with torch.no_grad():
        for p in run.model.parameters():
            p.copy_(p.bfloat16())
    before = {n: p.detach().float().clone() for n, p in run.model.named_parameters()}
    loop.train(run, echo=lambda *a: None)
    changed = sum((optimizer_family.held(run.optimizer, p) != before[n]).sum().item()
                  for n, p in run.model.named_parameters())
    return changed / sum(p.numel() for p in run.model.parameters())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bf16_weights_keep_small_updates_with_kahan_summation(make_recipe, tiny_llama,
                                                               optimizer):
    """lr 1e-5: plainly stepped bf16 weights lose most updates to rounding; with Kahan
    summation (the default for bf16 weights) as many weights change as in float32."""
    float32, plain, default = (changed_in_one_step(make_recipe, tiny_llama, optimizer, *how)
                               for how in (("float32", None), ("bfloat16", False),
                                           ("bfloat16", None)))
    assert float32 > 0.7 and plain < float32 / 3
    assert default == pytest.approx(float32, abs=0.02)


def test_a_kahan_summation_run_resumes_bit_identical(make_recipe, tiny_llama, tmp_path):
    """bf16 weights, adamw with Kahan summation, 4 steps; resumed from step 2 it ends with the
    same weights, bit for bit (the float32 optimizer state and the buffers come back)."""
    recipe = make_recipe(model={"name": str(tiny_llama), "dtype": "bfloat16"},
                         train={"max_steps": 4, "save_every": 2, "lr": 1e-4,
                                "eval_every": None})
    _, run = testing.run(recipe)
    straight = load_file(run.dir / "model" / "model.safetensors")
    shutil.rmtree(run.dir / "checkpoints" / "step-4", ignore_errors=True)
    shutil.rmtree(run.dir / "model")
    manifest = json.loads((run.dir / "manifest.json").read_text())
    (run.dir / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    assert cli.main(["resume", str(run.dir)]) == 0
    resumed = load_file(run.dir / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert next(iter(straight.values())).dtype == torch.bfloat16
