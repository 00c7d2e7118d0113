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

from plugtune.plugins import peft_family as adapters
from plugtune.plugins.peft_family import (  # noqa: F401  (shared hooks)
    plugtune_load_artifact, plugtune_merge_artifact, plugtune_save_model)  # noqa: F401

PLUGTUNE_ROLES = {"adapter"}


class Ia3Section(adapters.AdapterSection):
    target_modules: list[str] | str | None = adapters.target_modules_field(None, "scaling vectors")
    feedforward_modules: list[str] | str | None = Field(
        None, description="which of target_modules are feed-forward layers (their input is "
        "scaled, not their output): names or a regex; null for peft's default for the "
        "architecture (with target_modules null)")


def options(s: Ia3Section) -> dict:
    return {**adapters.common(s), "feedforward_modules": s.feedforward_modules}


def check(recipe) -> list[str]:
    problems = []
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


plugtune_recipe_sections, plugtune_check_recipe, plugtune_wrap_model, plugtune_fit_variants = (
    adapters.method("ia3", Ia3Section, "IA3Config", options, check=check))
