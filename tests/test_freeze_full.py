"""``freeze`` leaves every frozen tensor bit-identical and changes every other one; ``full``
changes all; the printed trainable count matches. Checked on the saved model's safetensors
against the initial weights, on a tiny Llama and a tiny GPT-2 (tied embeddings)."""
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plugtune import testing
from plugtune.errors import RecipeError


def weights(directory):
    return load_file(Path(directory) / "model.safetensors")


def train(request, make_recipe, arch, plugins, **sections):
    """Two steps on ``tiny_<arch>``; return ``(initial, final weights, printed lines)``."""
    model = request.getfixturevalue(f"tiny_{arch}")
    recipe = make_recipe(model=str(model), plugins=["causal_lm", *plugins],
                         train={"max_steps": 2}, causal_lm={"exact_match": False}, **sections)
    lines = []
    summary, _ = testing.run(recipe, echo=lines.append)
    return weights(model), weights(summary["artifact"]), lines


def check(initial, final, lines, frozen):
    """Every tensor ``frozen(name)`` is bit-identical, every other one changed, and the
    printed trainable count is the size of the changed ones."""
    assert set(initial) == set(final)
    kept = sorted(n for n in initial if torch.equal(initial[n], final[n]))
    assert kept == sorted(n for n in initial if frozen(n))
    trainable = sum(t.numel() for n, t in initial.items() if not frozen(n))
    total = sum(t.numel() for t in initial.values())
    line = next(line for line in lines if line.startswith("parameters:"))
    assert line.startswith(f"parameters: {trainable:,} trainable of {total:,} ")


FREEZE = {
    "llama last block": ("llama", {"last_n_blocks": 1},
                         lambda n: not n.startswith("model.layers.1.")),
    "gpt2 last block": ("gpt2", {"last_n_blocks": 1},
                        lambda n: not n.startswith("transformer.h.1.")),
    "llama patterns": ("llama", {"patterns": ["mlp", r"self_attn\.q_proj"]},
                       lambda n: "mlp" in n or "q_proj" in n),
    "gpt2 tied embeddings": ("gpt2", {"embeddings": True},
                             lambda n: n == "transformer.wte.weight"),
    "llama embeddings": ("llama", {"embeddings": True},
                         lambda n: n == "model.embed_tokens.weight"),  # lm_head is not tied
    "llama only norms": ("llama", {"last_n_blocks": 0, "embeddings": True,
                                   "unfreeze": ["norm"]},
                         lambda n: "norm" not in n),
    "gpt2 unfreeze in a frozen block": ("gpt2", {"patterns": [r"^transformer\.h\.0\."],
                                                 "unfreeze": [r"h\.0\.ln_1"]},
                                        lambda n: re.match(r"transformer\.h\.0\.(?!ln_1)", n)),
}


@pytest.mark.parametrize("case", FREEZE)
def test_freeze_keeps_frozen_tensors_bit_identical(case, request, make_recipe):
    arch, section, frozen = FREEZE[case]
    check(*train(request, make_recipe, arch, ["freeze"], freeze=section), frozen)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_changes_every_tensor(arch, request, make_recipe):
    initial, final, lines = train(request, make_recipe, arch, ["full"])
    check(initial, final, lines, frozen=lambda n: False)
    assert next(line for line in lines if line.startswith("parameters:")).endswith("(100.00%)")


@pytest.mark.parametrize("section, expected", [
    ({}, "freeze: says nothing to freeze"),
    ({"patterns": ["mlp("]}, "freeze.patterns: 'mlp(' is not a regular expression"),
    ({"last_n_blocks": -1}, "freeze.last_n_blocks: Input should be greater than or equal to 0"),
], ids=["nothing", "bad regex", "negative"])
def test_freeze_settings_are_validated(section, expected, make_recipe):
    with pytest.raises(RecipeError) as info:
        testing.load_recipe(make_recipe(plugins=["causal_lm", "freeze"], freeze=section))
    assert expected in str(info.value)
