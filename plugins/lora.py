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

from plugtune import hookimpl
from plugtune.plugins import _peft
from plugtune.plugins._peft import plugtune_save_model  # noqa: F401  (shared hook)

INIT = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}


class LoraSection(_peft.AdapterSection):
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


@hookimpl
def plugtune_recipe_sections(register):
    register("lora", LoraSection)


@hookimpl
def plugtune_check_recipe(recipe):
    problems = []
    if "full" in recipe.plugins:
        problems.append("plugins: `lora` trains adapters on a frozen base and `full` trains "
                        "every weight: use one (drop full for LoRA, or drop lora for full "
                        "fine-tuning)")
    if "freeze" in recipe.plugins:
        problems.append("plugins: `lora` already freezes every base weight, so `freeze` has "
                        "nothing to add; drop freeze and choose where adapters go with "
                        "lora.target_modules (which layers) or lora.layers_to_transform (which "
                        "blocks), and lora.modules_to_save to train a whole module")
    s = recipe["lora"]
    if s.layers_to_transform is not None and isinstance(s.target_modules, str):
        problems.append("lora.layers_to_transform: peft needs lora.target_modules as a list of "
                        "module names with it (e.g. [q_proj, k_proj, v_proj, o_proj]), not "
                        f"{s.target_modules!r}; or select the blocks in a target_modules regex")
    if s.init == "orthogonal" and s.r % 2:
        problems.append(f"lora.init: orthogonal needs an even lora.r, got r={s.r}")
    return problems + _peft.other_adapters(recipe, "lora")


@hookimpl
def plugtune_wrap_model(model, recipe):
    from peft import LoraConfig

    s = recipe["lora"]
    return _peft.wrap(model, LoraConfig, **_peft.common(s), r=s.r, lora_alpha=s.alpha,
                      lora_dropout=s.dropout, layers_to_transform=s.layers_to_transform,
                      use_rslora=s.use_rslora, use_dora=s.use_dora,
                      init_lora_weights=INIT[s.init], bias=s.bias)


@hookimpl
def plugtune_fit_variants(recipe):
    """``plan --fit``: adapters on the 16/32-bit base (the recipe's own ``lora:`` kept)."""
    from plugtune.plan import Variant

    if _peft.adapter_for_fit(recipe) != "lora":  # the recipe's own method offers its own
        return []
    return [Variant("lora", 20, ["lora"], {"lora": {}})]
