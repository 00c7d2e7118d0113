"""LoKr adapters (peft, from LyCORIS): the weight update is a Kronecker product of a small
matrix and a low-rank one — fewer trainable parameters than LoRA at the same rank.

Saves a PEFT adapter (``adapter/``); ``plugtune export --merge`` folds it into the base.
Composes with ``int8`` and ``gradient_checkpointing``; refuses ``nf4`` (peft's LoKr builds
its update in the shape of the weight, which a 4-bit base packs into another shape) and
conflicts with ``full``, ``freeze`` and the other adapter methods (docs/combinations.md).
"""
from pydantic import Field

from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}


class LokrSection(adapters.LycorisSection):
    decompose_both: bool = Field(False, description="also factor the small Kronecker matrix "
                                 "into a low-rank product")
    decompose_factor: int = Field(-1, description="factor the layer's sizes by this number "
                                  "for the Kronecker split; -1 picks the most square split")


def options(s: LokrSection) -> dict:
    return {**adapters.lycoris_options(s), "decompose_both": s.decompose_both,
            "decompose_factor": s.decompose_factor}


def check(recipe) -> list[str]:
    factor = recipe["lokr"].decompose_factor
    if factor == 0 or factor < -1:
        return [f"lokr.decompose_factor: give a positive factor or -1, got {factor}"]
    return []


plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model, plugtune_fit_variants = (
    adapters.method("lokr", LokrSection, "LoKrConfig", options, no_4bit=True, check=check))
