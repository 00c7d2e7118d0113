"""The plan of a recipe before plugins adjust it: its model built on the meta device from the
config alone, the run's own model phases run on it, and its parameters as :class:`Param` entries."""
from typing import TYPE_CHECKING, Any

import pluggy
import torch

from ..attention import planned
from ..errors import PluginError
from ..models import transformer_blocks
from .api import Param, Plan, causal_batch

if TYPE_CHECKING:
    from ..recipe import Recipe


def meta_model(h: pluggy.HookRelay, recipe: "Recipe") -> Any:
    """The recipe's model on the meta device, as the loader would load it (class, dtype,
    config-level loading arguments such as a head's ``num_labels``)."""
    from transformers import AutoModelForCausalLM

    from ..loop import model_kwargs

    config = h.plugtune_model_config(recipe=recipe)
    if config is None:
        raise PluginError("no active plugin implements plugtune_model_config (read the model's "
                          "config without loading it), so the planner cannot see the model")
    for key, value in model_kwargs(h, recipe).items():
        if hasattr(config, key) and not key.startswith("quantization"):
            setattr(config, key, value)
    model_class = h.plugtune_model_class(recipe=recipe) or AutoModelForCausalLM
    with torch.device("meta"):
        model = model_class.from_config(config, dtype=getattr(torch, recipe.model.dtype),
                                        trust_remote_code=recipe.model.trust_remote_code,
                                        attn_implementation=planned(
                                            recipe.model.attn_implementation))
    model.tie_weights()
    return model


def build(recipe: "Recipe", pm: pluggy.PluginManager, device: str = "cuda") -> Plan:
    """The plan of ``recipe`` before plugins adjust it: the meta model through the model phases
    and its parameters."""
    from ..loop import adapt, prepare

    h = pm.hook
    model = meta_model(h, recipe)
    loaded = {id(p): n for n, p in model.named_parameters()}
    architecture = type(model).__name__
    keep = _not_quantized_by_default(model)
    owners: dict[int, tuple[str, str]] = {}
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), (module_name, type(module).__name__))
    blocks = {id(p): i for i, block in enumerate(transformer_blocks(model))
              for p in block.parameters()}
    with torch.device("meta"):
        model = adapt(h, recipe, prepare(h, recipe, model))
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), (module_name, type(module).__name__))
    blocks.update({id(p): i for i, block in enumerate(transformer_blocks(model))
                   for p in block.parameters() if id(p) not in blocks})
    checkpointed = {i for i, block in enumerate(transformer_blocks(model))
                    if getattr(block, "gradient_checkpointing", False) is True}
    params = []
    for name, p in model.named_parameters():
        module_name, module = owners[id(p)]
        base = id(p) in loaded
        params.append(Param(loaded[id(p)] if base else name, tuple(p.shape), p.dtype,
                            p.requires_grad, blocks.get(id(p)), module,
                            loaded[id(p)].rpartition(".")[0] if base else module_name, not base,
                            tensor=p))
    t = recipe.train
    return Plan(recipe, model, params, device, t.batch_size, t.max_length, t.grad_accum,
                t.mixed_precision, checkpointed=checkpointed, make_batch=causal_batch,
                keep_unquantized=keep, architecture=architecture)


def _not_quantized_by_default(model: torch.nn.Module) -> list[str]:
    """The modules transformers' quantizers leave in full precision unless told otherwise (the
    output layer, tied weights)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # pragma: no cover - older transformers
        return ["lm_head"]
    return list(get_keys_to_not_convert(model))
