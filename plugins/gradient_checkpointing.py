"""Gradient checkpointing: recompute activations in backward to save memory.

Only each block's input is kept during the forward pass; the rest is recomputed during backward,
trading about a third more compute for much less activation memory.

Enabled in ``plugtune_prepare_model``, on the base model before any adapter wraps it, so it
works with full fine-tuning, freeze, LoRA and quantized bases alike. The default non-reentrant
checkpointing passes gradients to trainable weights even when the block's inputs do not require
grad (a frozen embedding); with ``use_reentrant: true`` the plugin also makes the embedding
outputs require grad, the fix for the known trap where adapters behind a frozen, checkpointed
block get no gradient.
"""
from pydantic import Field

from plugtune import Section, hookimpl
from plugtune.errors import PluginError


class GradientCheckpointingSection(Section):
    use_reentrant: bool = Field(False, description="torch's older reentrant checkpointing")
    every_n_layers: int = Field(1, gt=0, description="checkpoint every N-th block only (more "
                                "memory, less recompute); needs transformers with "
                                "activation_checkpointing_enable")
    offload: bool = Field(False, description="keep the saved block inputs in pinned host "
                          "memory instead of on the GPU (slower; long sequences)")


@hookimpl
def plugtune_recipe_sections(register):
    register("gradient_checkpointing", GradientCheckpointingSection)


@hookimpl
def plugtune_prepare_model(model, recipe):
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PluginError(f"gradient_checkpointing: {type(model).__name__} does not support "
                          "gradient checkpointing; remove gradient_checkpointing from plugins:")
    s = recipe["gradient_checkpointing"]
    kwargs = {"use_reentrant": s.use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                              every_n_layers=s.every_n_layers, offload=s.offload)
    elif s.every_n_layers != 1 or s.offload:
        raise PluginError("gradient_checkpointing.every_n_layers/offload: this transformers "
                          "version cannot; upgrade transformers or remove them")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if s.use_reentrant:
        model.enable_input_require_grads()


@hookimpl
def plugtune_estimate_memory(plan, recipe):
    """Which blocks recompute is read off the model (prepare_model marked them); with
    ``offload`` their kept inputs live in pinned host memory, not on the GPU."""
    if recipe["gradient_checkpointing"].offload:
        plan.offloaded = True
        plan.notes.append("gradient_checkpointing.offload: block inputs are kept in pinned host "
                          "RAM, not counted on the GPU")


@hookimpl
def plugtune_fit_variants():
    """``plan --fit``: recompute activations in backward, tried on top of every method."""
    from plugtune import Variant

    return [Variant("gradient checkpointing", Variant.SAVER, ["gradient_checkpointing"],
                    saver=True)]
