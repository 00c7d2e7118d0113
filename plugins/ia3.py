"""IA3 adapters (peft): learn one scaling vector per adapted layer, on a frozen base — the
fewest trainable parameters of the weight-adapting methods.

IA3 rescales the output of the attention layers it targets (peft's default for the
architecture: keys, values and the MLP's down projection) and the input of the feed-forward
ones (``ia3.feedforward_modules``). Saves a PEFT adapter (``adapter/``); ``plugtune export
--merge`` folds the vectors into the weights. Composes with ``int8``/``nf4`` and
``gradient_checkpointing``; conflicts with ``full``, ``freeze`` and the other adapter methods
(docs/combinations.md).
"""
from pydantic import Field

from plugtune import hookimpl
from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)

PLUGTUNE_ROLES = {"adapter"}


class Ia3Section(adapters.AdapterSection):
    target_modules: list[str] | str | None = adapters.target_modules_field(None, "scaling vectors")
    feedforward_modules: list[str] | str | None = Field(
        None, description="which of target_modules are feed-forward layers (their input is "
        "scaled, not their output): names or a regex; null for peft's default for the "
        "architecture (with target_modules null)")


@hookimpl
def plugtune_recipe_sections(register):
    register("ia3", Ia3Section)


@hookimpl
def plugtune_check_recipe(recipe):
    problems = adapters.check(recipe, "ia3", "IA3 scaling vectors")
    s = recipe["ia3"]
    if s.target_modules is not None and s.feedforward_modules is None:
        problems.append("ia3.feedforward_modules: give it with ia3.target_modules (the "
                        "feed-forward ones among them, e.g. [down_proj]; [] for none), or "
                        "leave both unset for peft's default for the architecture")
    if isinstance(s.target_modules, list) and isinstance(s.feedforward_modules, list):
        extra = sorted(set(s.feedforward_modules) - set(s.target_modules))
        if extra:
            problems.append(f"ia3.feedforward_modules: {extra} not in ia3.target_modules; "
                            "feed-forward modules must be among the targets")
    return problems


@hookimpl
def plugtune_wrap_model(model, recipe):
    from peft import IA3Config

    s = recipe["ia3"]
    return adapters.wrap(model, IA3Config, **adapters.common(s),
                        feedforward_modules=s.feedforward_modules)


@hookimpl
def plugtune_fit_variants(recipe):
    """``plan --fit``: ia3 on a 16/32-bit, an 8-bit and a 4-bit base, when the recipe uses it."""
    return adapters.fit_variants("ia3", recipe)
