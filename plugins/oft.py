"""OFT adapters (peft): rotate each adapted layer's weight by a learnt block-diagonal orthogonal
matrix, which keeps the angles between the pretrained neurons (less forgetting).

``oft.block_size`` sets the blocks (the layer's input size must be a multiple of it); the
rotation is a Cayley transform of a skew-symmetric matrix. Saves a PEFT adapter
(``adapter/``); ``plugtune export --merge`` folds it into the base. Composes with
``int8``/``nf4`` and ``gradient_checkpointing``; conflicts with ``full``, ``freeze`` and the
other adapter methods (docs/combinations.md).
"""
from pydantic import Field

from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}


class OftSection(adapters.AdapterSection):
    block_size: int = Field(32, gt=0, description="size of the orthogonal blocks; each "
                            "adapted layer's input size must be a multiple of it")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability of leaving a "
                                  "whole block's rotation out of a training step")
    coft: bool = Field(False, description="constrained OFT: keep the rotation within eps of "
                       "the identity")
    eps: float = Field(6e-5, gt=0, description="the constraint's radius with coft")
    block_share: bool = Field(False, description="one rotation block shared by the whole layer")


def options(s: OftSection) -> dict:
    return {**adapters.common(s), "r": 0, "oft_block_size": s.block_size,
            "module_dropout": s.module_dropout, "coft": s.coft, "eps": s.eps,
            "block_share": s.block_share}


plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model, plugtune_fit_variants = (
    adapters.method("oft", OftSection, "OFTConfig", options))
