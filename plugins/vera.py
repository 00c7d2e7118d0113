"""VeRA adapters (peft): one pair of frozen random low-rank matrices shared by every adapted
layer, and per layer only two small trainable scaling vectors.

The shared matrices are regenerated from ``vera.projection_prng_key`` and, by default, saved
with the adapter too (``vera.save_projection``), so ``peft.PeftModel.from_pretrained`` restores
them exactly. Saves a PEFT adapter (``adapter/``); ``plugtune export --merge`` folds it into the
base. Composes with ``int8``/``nf4`` and ``gradient_checkpointing``; conflicts with
``full``, ``freeze`` and the other adapter methods (docs/combinations.md).
"""
from pydantic import Field

from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}


class VeraSection(adapters.AdapterSection):
    r: int = Field(256, gt=0, description="rank of the shared random matrices (VeRA uses a "
                   "far higher rank than LoRA: only the scaling vectors train)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    d_initial: float = Field(0.1, gt=0, description="initial value of the scaling vector d")
    projection_prng_key: int = Field(0, description="seed of the shared random matrices")
    save_projection: bool = Field(True, description="save the shared matrices with the adapter "
                                  "(larger file; loads without regenerating them)")


def options(s: VeraSection) -> dict:
    return {**adapters.common(s), "r": s.r, "vera_dropout": s.dropout, "d_initial": s.d_initial,
            "projection_prng_key": s.projection_prng_key, "save_projection": s.save_projection}


plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model, plugtune_fit_variants = (
    adapters.method("vera", VeraSection, "VeraConfig", options))
