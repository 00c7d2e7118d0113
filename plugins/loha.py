"""LoHa adapters (peft, from LyCORIS): the weight update is the Hadamard product of two low-rank
products, so a small rank reaches a higher effective rank than LoRA's.

Saves a PEFT adapter (``adapter/``); ``plugtune export --merge`` folds it into the base.
Composes with ``int8`` and ``gradient_checkpointing``; refuses ``nf4`` (peft's LoHa builds
its update in the shape of the weight, which a 4-bit base packs into another shape) and
conflicts with ``full``, ``freeze`` and the other adapter methods (docs/combinations.md).
"""
from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}


class LohaSection(adapters.LycorisSection):
    pass


plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model, plugtune_fit_variants = (
    adapters.method("loha", LohaSection, "LoHaConfig", adapters.lycoris_options, no_4bit=True))
