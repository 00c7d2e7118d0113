"""LoRA adapters (peft): train small low-rank matrices beside the frozen base's linear layers.

The run saves a PEFT-format adapter (``adapter/``: ``adapter_config.json``,
``adapter_model.safetensors`` and the tokenizer) that ``peft.PeftModel.from_pretrained(base,
path)`` loads; ``plugtune export RUN_DIR OUT --merge`` merges it into the base.

Composes with ``int8``/``nf4`` (QLoRA: adapters on a quantized base) and
``gradient_checkpointing``. Conflicts with ``full`` (which trains every weight) and ``freeze``
(LoRA already freezes the base; restrict the adapters with ``lora.target_modules`` or
``lora.layers_to_transform`` instead). See docs/combinations.md.
"""
from typing import Literal

from pydantic import Field

from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}

INIT = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}


class LoraSection(adapters.AdapterSection):
    r: int = Field(8, gt=0, description="rank of the adapter matrices")
    alpha: float = Field(16, gt=0, description="scale: the update is multiplied by alpha / r "
                         "(alpha / sqrt(r) with use_rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    layers_to_transform: list[int] | None = Field(None, description="adapt only these blocks "
                                                  "(0-based indices); default all")
    use_rslora: bool = Field(False, description="rank-stabilized scaling alpha / sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    init: Literal["default", "gaussian", "orthogonal"] = Field(
        "default", description="A initialization; B starts at zero (orthogonal: both "
        "orthogonal, r must be even) so the adapter starts as a no-op")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases train: "
                                                      "none, all (the base's too), lora_only")


def options(s: LoraSection) -> dict:
    return {**adapters.common(s), "r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout,
            "layers_to_transform": s.layers_to_transform, "use_rslora": s.use_rslora,
            "use_dora": s.use_dora, "init_lora_weights": INIT[s.init], "bias": s.bias}


def check(recipe) -> list[str]:
    problems = []  # full, freeze and other adapter methods: the core refuses (roles)
    s = recipe["lora"]
    if s.layers_to_transform is not None and isinstance(s.target_modules, str):
        problems.append("lora.layers_to_transform: peft needs lora.target_modules as a list of "
                        "module names with it (e.g. [q_proj, k_proj, v_proj, o_proj]), not "
                        f"{s.target_modules!r}; or select the blocks in a target_modules regex")
    if s.init == "orthogonal" and s.r % 2:
        problems.append(f"lora.init: orthogonal needs an even lora.r, got r={s.r}")
    return problems


# plan --fit reaches for lora when the recipe has no adapter method (without_adapter)
plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model, plugtune_fit_variants = (
    adapters.method("lora", LoraSection, "LoraConfig", options, without_adapter=True,
                    check=check))
