"""LoHa adapters (peft, from LyCORIS): the weight update is the Hadamard product of two low-rank
products, so a small rank reaches a higher effective rank than LoRA's.

Saves a PEFT adapter (``adapter/``); ``plugtune export --merge`` folds it into the base.
Composes with ``gradient_checkpointing``; refuses ``int8``/``nf4`` (peft's LoHa adapts only
torch layers) and conflicts with ``full``, ``freeze`` and the other adapter methods
(docs/combinations.md).
"""
from plugtune import hookimpl
from plugtune.plugins import _peft
from plugtune.plugins._peft import plugtune_save_model  # noqa: F401  (shared hook)


class LohaSection(_peft.LycorisSection):
    pass


@hookimpl
def plugtune_recipe_sections(register):
    register("loha", LohaSection)


@hookimpl
def plugtune_check_recipe(recipe):
    return (_peft.check(recipe, "loha", "LoHa adapters")
            + _peft.no_quantized_base(recipe, "loha", "peft's LoHa adapts only torch "
                                      "Linear/Conv layers, not bitsandbytes ones"))


@hookimpl
def plugtune_wrap_model(model, recipe):
    from peft import LoHaConfig

    return _peft.wrap(model, LoHaConfig, **_peft.lycoris_options(recipe["loha"]))
