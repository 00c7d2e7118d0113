"""Load the base model in 4-bit NF4 or FP4 (bitsandbytes) to train adapters on it: QLoRA.

Weights are optionally double-quantized; matrix products run in a chosen compute dtype.

The quantized base is frozen; train LoRA adapters on it (``plugins: [nf4, lora]``). Runs on a
CUDA GPU and, more slowly, on a CPU (bitsandbytes >= 0.45).
"""
import math
from typing import Literal

from pydantic import Field

from plugtune import Section, hookimpl
from plugtune.plugins import kbit_family as kbit

#: ``packed-weights``: a 4-bit weight is stored in another shape than the layer's (methods that
#: build their update in the weight's shape, LoHa and LoKr, ask for this role and refuse).
PLUGTUNE_ROLES = {"quantizer", "packed-weights"}


class NF4Section(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 "
                                               "(normal float, QLoRA's) or fp4")
    double_quant: bool = Field(True, description="also quantize the quantization constants "
                               "(saves about 0.4 bit per weight)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the matrix products; default model.dtype (use bfloat16 "
        "on a GPU that has it)")
    skip_modules: list[str] = Field([], description="module names left unquantized; the "
                                    "default skips the output layer")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="dtype the packed 4-bit values are stored in; a float dtype "
        "(bfloat16, as model.dtype) lets FSDP shard the 4-bit weights across GPUs (QLoRA + "
        "FSDP); with uint8 every process holds them all")


@hookimpl
def plugtune_recipe_sections(register):
    register("nf4", NF4Section)


@hookimpl
def plugtune_check_recipe(recipe):
    return kbit.check(recipe, "nf4")


@hookimpl
def plugtune_model_kwargs(recipe):
    import torch
    from transformers import BitsAndBytesConfig

    s = recipe["nf4"]
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=s.quant_type,
        bnb_4bit_use_double_quant=s.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, s.compute_dtype or recipe.model.dtype),
        llm_int8_skip_modules=s.skip_modules or None,
        bnb_4bit_quant_storage=getattr(torch, s.quant_storage))}


@hookimpl
def plugtune_prepare_base(model):
    kbit.prepare(model)
    # On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight in place at its
    # first no-grad forward (evaluation) and rounds its scales (absmax) to bfloat16, for good:
    # the frozen base would drift from the one the adapter is later loaded onto and merged
    # into. Keep the exact float32 path instead (a CPU-only cost; GPUs never repack).
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def weight_bytes(numel, double_quant, blocksize=64):
    """A 4-bit weight: half a byte per value, and a scale (absmax) per block of 64 values:
    float32, or with double quantization uint8 plus a float32 per 256 scales and a 256-entry
    code book."""
    blocks = math.ceil(numel / blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales + 4 * 16  # + the 16-value NF4/FP4 code


@hookimpl
def plugtune_estimate_memory(plan, recipe):
    s = recipe["nf4"]
    plan.quantize(plan.base_linear_weights(s.skip_modules or plan.keep_unquantized),
                  s.quant_type, lambda p: weight_bytes(p.numel, s.double_quant),
                  shardable=s.quant_storage != "uint8")

