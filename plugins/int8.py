"""Load the base model in 8-bit (bitsandbytes LLM.int8()) to train adapters on it.

Weights are stored as int8 (about a quarter of float32); matrix products run in int8 with
outlier features kept in 16-bit.

The quantized base is frozen; train LoRA adapters on it (``plugins: [int8, lora]``). Runs on a
CUDA GPU and, more slowly, on a CPU (bitsandbytes >= 0.45).
"""
import logging

from pydantic import Field

from plugtune import Section, hookimpl
from plugtune.plugins import kbit_family as kbit

PLUGTUNE_ROLES = {"quantizer"}


class Int8Section(Section):
    threshold: float = Field(6.0, gt=0, description="activation magnitude above which a feature "
                             "is an outlier computed in 16-bit (llm_int8_threshold)")
    skip_modules: list[str] = Field([], description="module names left unquantized (e.g. "
                                    "lm_head); the default skips the output layer")


@hookimpl
def plugtune_recipe_sections(register):
    register("int8", Int8Section)


@hookimpl
def plugtune_check_recipe(recipe):
    return kbit.check(recipe, "int8")  # a second quantizer is the core's (role quantizer)


@hookimpl
def plugtune_model_kwargs(recipe):
    from transformers import BitsAndBytesConfig

    s = recipe["int8"]
    return {"quantization_config": BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=s.threshold,
        llm_int8_skip_modules=s.skip_modules or None)}


def _not_cast_notice(record):
    """bitsandbytes logs this at every int8 product with float32 inputs; once is plenty."""
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


@hookimpl
def plugtune_prepare_base(model):
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_cast_notice)
    kbit.prepare(model)


@hookimpl
def plugtune_estimate_memory(plan, recipe):
    """LLM.int8 weights: one byte per weight and a float32 scale per output row. Its matrix
    product keeps the layer's input for backward even though the weight is frozen."""
    plan.quantize(plan.base_linear_weights(recipe["int8"].skip_modules or plan.keep_unquantized),
                  "int8", lambda p: p.numel + 4 * p.shape[0], keeps_input=True)

