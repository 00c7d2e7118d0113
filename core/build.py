"""The model a run trains, built through hooks: loaded with every plugin's loading arguments,
prepared (k-bit preparation, heads, gradient checkpointing), wrapped (adapters), with the
parameters that train chosen. ``plugtune eval`` and ``export`` build a run's base the same way."""
from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import PluginError, PlugtuneError
from .recipe import float16_training_problem
from .state import first


def model_kwargs(h: Any, recipe: Any, tokenizer: Any = None) -> dict[str, Any]:
    """Every plugin's ``from_pretrained`` arguments, merged; a key given twice is an error.
    ``model.attn_implementation`` is the core's."""
    chosen = recipe.model.attn_implementation
    kwargs: dict[str, Any] = {} if chosen is None else {"attn_implementation": chosen}
    for part in h.plugtune_model_kwargs(recipe=recipe, tokenizer=tokenizer):
        clash = set(kwargs) & set(part or {})
        if clash:
            raise PluginError(f"two plugins set the model loading argument(s) {sorted(clash)}")
        kwargs.update(part or {})
    return kwargs


def load_base(h: Any, recipe: Any, tokenizer: Any = None) -> Any:
    """Load the model with every plugin's loading arguments and prepare it (k-bit preparation,
    heads, gradient checkpointing): the model as it is before adapters wrap it."""
    model = first(h.plugtune_load_model, "load the model", recipe=recipe,
                  model_kwargs=model_kwargs(h, recipe, tokenizer),
                  model_class=h.plugtune_model_class(recipe=recipe))
    return prepare(h, recipe, model)


def prepare(h: Any, recipe: Any, model: Any) -> Any:
    """The phases that change a loaded base in place: k-bit preparation, then heads and
    gradient checkpointing. (The planner runs them on a meta-device model.)"""
    h.plugtune_prepare_base(model=model, recipe=recipe)
    h.plugtune_prepare_model(model=model, recipe=recipe)
    return model


def adapt(h: Any, recipe: Any, model: Any) -> Any:
    """Wrap the prepared base (adapters) and choose the parameters that train."""
    model = h.plugtune_wrap_model(model=model, recipe=recipe) or model
    h.plugtune_select_trainable(model=model, recipe=recipe)
    return model


def setup_model(h: Any, recipe: Any, echo: Callable[[str], object] = print,
                tokenizer: Any = None) -> Any:
    """The model a run trains: :func:`load_base`, then :func:`adapt`; refuses one with nothing
    to train or with float16 trainable parameters."""
    model = adapt(h, recipe, load_base(h, recipe, tokenizer))
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise PluginError("no parameter is trainable after plugtune_select_trainable; check "
                          "the settings of the recipe's plugins that choose what trains")
    if any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise PlugtuneError(float16_training_problem("some trainable parameters are float16"))
    echo(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (a packed quantized tensor counts the weights it
    stands for: its ``quant_state.shape``, as bitsandbytes' 4-bit weights carry)."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad),
            sum(_numel(p) for p in params))


def _numel(p: torch.Tensor) -> int:
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return shape.numel() if isinstance(shape, torch.Size) else p.numel()
