"""What the quantized-base plugins (``int8``, ``nf4``) share; not a plugin itself.

Both load the base through bitsandbytes and prepare it for k-bit training: every base weight
frozen, norms and biases cast to float32 for stable training, and the other non-quantized
weights (embeddings, the output layer) left in the model's dtype. peft's
``prepare_model_for_kbit_training`` casts those to float32 too: for Llama 3 8B that is 1.05B
frozen weights, 3.9 GiB in float32 beside 3.4 GiB of NF4, for no gain (they are never
updated, and the matrix products run in the compute dtype). torchtune and Unsloth keep them in
16 bits; so does this. The preparation runs once, in ``plugtune_prepare_base``, before gradient
checkpointing and before LoRA wraps the model (re-applying it to a PeftModel would freeze the
adapters too).
"""
import torch

from plugtune.plugins._peft import ADAPTERS


def check(recipe, name):
    """Combination problems of the quantizing plugin ``name``."""
    problems = []
    if "full" in recipe.plugins:
        problems.append(f"plugins: `{name}` loads the base quantized, and quantized weights "
                        "cannot be trained by `full`; use lora instead of full (QLoRA-style "
                        f"adapters on the frozen {name} base), or drop {name} to fine-tune "
                        "every weight in float precision")
    elif not any(a in recipe.plugins for a in ADAPTERS):
        problems.append(f"plugins: `{name}` freezes the quantized base, so nothing would train; "
                        "add lora (adapters on the frozen quantized base) or another adapter "
                        "method: " + ", ".join(a for a in ADAPTERS if a != "lora"))
    return problems


def prepare(model):
    """Prepare a k-bit base for training, exactly once."""
    if getattr(model, "_plugtune_kbit_prepared", False):
        return
    # Gradient checkpointing (and the input gradients it needs on a frozen base) is the
    # gradient_checkpointing plugin's, in the next phase.
    for param in model.parameters():
        param.requires_grad = False
        if param.dtype in (torch.float16, torch.bfloat16) and param.ndim < 2 and \
                type(param).__name__ not in ("Params4bit", "Int8Params"):
            param.data = param.data.to(torch.float32)
    model._plugtune_kbit_prepared = True
