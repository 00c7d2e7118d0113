"""AdamW with 8-bit optimizer state (bitsandbytes AdamW8bit, or PagedAdamW8bit).

The two moment estimates are stored block-wise quantized in 8 bits: 2 bytes per trainable
parameter instead of 8, which is what makes full fine-tuning of a ~1.5B model fit a 24 GB card.

``paged: true`` uses PagedAdamW8bit, whose state lives in CUDA unified memory and is paged to
CPU RAM when the GPU runs out (memory spikes from long sequences then slow down instead of
crashing). On a CPU there is nothing to page to: both variants run, and behave the same.
Tensors with fewer than ``min_8bit_size`` elements (norms, biases) keep 32-bit state.
Weight decay, learning rate and schedule come from ``train:`` as for the default ``adamw``.
"""
import math

from pydantic import Field

from plugtune import Optimizer, Section, hookimpl
from plugtune.plugins import optimizer_family as family
from plugtune.plugins.optimizer_family import param_groups

PLUGTUNE_ROLES = {"optimizer"}


class AdamW8bitSection(Section):
    paged: bool = Field(False, description="PagedAdamW8bit: page state to CPU RAM under GPU "
                        "memory pressure (CUDA only; no effect on a CPU)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's beta1, beta2")
    eps: float = Field(1e-8, gt=0)
    min_8bit_size: int = Field(4096, gt=0, description="smaller tensors keep 32-bit state")
    kahan_summation: family.Setting = family.setting_field()


@hookimpl
def plugtune_recipe_sections(register):
    register("adamw_8bit", AdamW8bitSection)


@hookimpl
def plugtune_build_optimizer(params, recipe):
    import bitsandbytes as bnb

    s = recipe["adamw_8bit"]
    optimizer = bnb.optim.PagedAdamW8bit if s.paged else bnb.optim.AdamW8bit
    return family.build(lambda groups: optimizer(groups, lr=recipe.train.lr, betas=s.betas,
                                                 eps=s.eps, min_8bit_size=s.min_8bit_size),
                        param_groups(params, recipe.train.weight_decay), s.kahan_summation)


def state_bytes(numel, min_8bit_size):
    """bitsandbytes' 2-state 8-bit optimizer: two uint8 states and a float32 absmax per block of
    256 values; tensors smaller than ``min_8bit_size`` keep two float32 states."""
    if numel < min_8bit_size:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / 256)


@hookimpl
def plugtune_estimate_memory(plan, recipe):
    s = recipe["adamw_8bit"]
    trainable = plan.trainable()
    state = sum(state_bytes(p.numel, s.min_8bit_size) for p in trainable)
    name = f"{'PagedAdamW8bit' if s.paged else 'AdamW8bit'} (bitsandbytes): 2 B/param + block scales"
    step = 0
    if family.wanted(s.kahan_summation, trainable):
        family.plan_buffers(plan, trainable)
        step = 2 * 4 * max((p.numel for p in trainable), default=0)
    plan.optimizer = Optimizer(name, state, step, paged=s.paged and plan.device == "cuda")
