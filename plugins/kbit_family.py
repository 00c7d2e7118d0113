"""What quantized-base plugins share (plugin API 1.1): the built-in ``int8`` and ``nf4`` use
it, and a stranger's quantizer can too. Not a plugin itself.

Both load the base through bitsandbytes and prepare it for k-bit training: every base weight
frozen, and every non-quantized weight (embeddings, norms, the output layer) left in the
model's dtype, as torchtune and Unsloth do. peft's ``prepare_model_for_kbit_training`` casts
them all to float32: for Llama 3 8B that is 1.05B frozen weights, 3.9 GiB in float32 beside
3.4 GiB of NF4, for nothing (they never change; norms already compute in float32 inside, and
the adapters are float32). It would also leave a 16-bit model's hidden states float32 after
each norm, which the 16-bit output layer then refuses without autocast. The preparation runs
once, in ``plugtune_prepare_base``, before gradient checkpointing and before LoRA wraps the
model (re-applying it to a PeftModel would freeze the adapters too).
"""
from typing import TYPE_CHECKING

from plugtune import active_roles

if TYPE_CHECKING:
    import torch

    from plugtune import Recipe


def check(recipe: "Recipe", name: str) -> list[str]:
    """Combination problems of the quantizing plugin ``name``: something must train, and
    only an adapter (a plugin filling the role ``adapter``, whoever wrote it) can train on a
    quantized base."""
    roles = active_roles(recipe)
    adapters = roles.get("adapter", [])
    trainers = [p for p in roles.get("trainable", []) if p not in adapters]
    if trainers:
        return [f"plugins: `{name}` loads the base quantized, and quantized weights cannot be "
                f"trained by `{trainers[0]}`; use lora instead of {trainers[0]} (QLoRA-style "
                f"adapters on the frozen {name} base), or drop {name} to fine-tune in float "
                "precision"]
    if adapters:
        return []
    return [f"plugins: `{name}` freezes the quantized base, so nothing would train; add lora "
            "(adapters on the frozen quantized base) or another adapter method (`plugtune "
            "plugins` lists those with the role adapter)"]


def prepare(model: "torch.nn.Module") -> None:
    """Prepare a k-bit base for training, exactly once."""
    if getattr(model, "_plugtune_kbit_prepared", False):
        return
    # Gradient checkpointing (and the input gradients it needs on a frozen base) is the
    # gradient_checkpointing plugin's, in the next phase.
    for param in model.parameters():
        param.requires_grad = False
    model._plugtune_kbit_prepared = True  # type: ignore[assignment]  # torch: tensors/modules
