"""What the quantized-base plugins (``int8``, ``nf4``) share; not a plugin itself.

Both load the base through bitsandbytes and prepare it for k-bit training with peft: every base
weight frozen, norms and other small non-quantized weights cast to float32 for stable training.
That preparation runs once, in ``plugtune_prepare_base``, before gradient checkpointing and
before LoRA wraps the model (re-applying it to a PeftModel would freeze the adapters too).
"""
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
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing is the gradient_checkpointing plugin's, in the next phase.
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model._plugtune_kbit_prepared = True
