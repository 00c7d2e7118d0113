"""LoKr adapters (peft, from LyCORIS): the weight update is a Kronecker product of a small
matrix and a low-rank one — fewer trainable parameters than LoRA at the same rank.

Saves a PEFT adapter (``adapter/``); ``plugtune export --merge`` folds it into the base.
Composes with ``int8`` and ``gradient_checkpointing``; refuses ``nf4`` (peft's LoKr builds
its update in the shape of the weight, which a 4-bit base packs into another shape) and
conflicts with ``full``, ``freeze`` and the other adapter methods (docs/combinations.md).
"""
from pydantic import Field

from plugtune import hookimpl
from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}


class LokrSection(adapters.LycorisSection):
    decompose_both: bool = Field(False, description="also factor the small Kronecker matrix "
                                 "into a low-rank product")
    decompose_factor: int = Field(-1, description="factor the layer's sizes by this number "
                                  "for the Kronecker split; -1 picks the most square split")


@hookimpl
def plugtune_recipe_sections(register):
    register("lokr", LokrSection)


@hookimpl
def plugtune_check_recipe(recipe):
    problems = (adapters.check(recipe, "lokr", "LoKr adapters")
                + adapters.no_4bit_base(recipe, "lokr"))
    factor = recipe["lokr"].decompose_factor
    if factor == 0 or factor < -1:
        problems.append(f"lokr.decompose_factor: give a positive factor or -1, got {factor}")
    return problems


@hookimpl
def plugtune_wrap_model(model, recipe):
    from peft import LoKrConfig

    s = recipe["lokr"]
    return adapters.wrap(model, LoKrConfig, **adapters.lycoris_options(s),
                         decompose_both=s.decompose_both, decompose_factor=s.decompose_factor)


@hookimpl
def plugtune_fit_variants(recipe):
    """``plan --fit``: lokr on a 16/32-bit, an 8-bit and a 4-bit base, when the recipe uses it."""
    return adapters.fit_variants("lokr", recipe)
