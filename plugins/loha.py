"""LoHa adapters (peft, from LyCORIS): the weight update is the Hadamard product of two low-rank
products, so a small rank reaches a higher effective rank than LoRA's.

Saves a PEFT adapter (``adapter/``); ``plugtune export --merge`` folds it into the base.
Composes with ``int8`` and ``gradient_checkpointing``; refuses ``nf4`` (peft's LoHa builds
its update in the shape of the weight, which a 4-bit base packs into another shape) and
conflicts with ``full``, ``freeze`` and the other adapter methods (docs/combinations.md).
"""
from plugtune import hookimpl
from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}


class LohaSection(adapters.LycorisSection):
    pass


@hookimpl
def plugtune_recipe_sections(register):
    register("loha", LohaSection)


@hookimpl
def plugtune_check_recipe(recipe):
    return (adapters.check(recipe, "loha", "LoHa adapters")
            + adapters.no_4bit_base(recipe, "loha"))


@hookimpl
def plugtune_wrap_model(model, recipe):
    from peft import LoHaConfig

    return adapters.wrap(model, LoHaConfig, **adapters.lycoris_options(recipe["loha"]))


@hookimpl
def plugtune_fit_variants(recipe):
    """``plan --fit``: loha on a 16/32-bit, an 8-bit and a 4-bit base, when the recipe uses it."""
    return adapters.fit_variants("loha", recipe)
