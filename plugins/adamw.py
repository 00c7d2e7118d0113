"""The default optimizer and schedule: torch AdamW (no weight decay on biases and norms, as in
nanoGPT) with linear warm-up, then a constant, linear or cosine learning rate."""
import torch

from plugtune import hookimpl

PLUGTUNE_DEFAULT = True

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def param_groups(params, weight_decay):
    """Matrices decay; vectors (biases, norm scales) do not."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


@hookimpl(trylast=True)
def plugtune_build_optimizer(params, recipe):
    return torch.optim.AdamW(param_groups(params, recipe.train.weight_decay), lr=recipe.train.lr)


@hookimpl(trylast=True)
def plugtune_build_scheduler(optimizer, recipe, total_steps):
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[recipe.train.schedule], optimizer,
                         num_warmup_steps=recipe.train.warmup_steps,
                         num_training_steps=total_steps)


@hookimpl(trylast=True)
def plugtune_estimate_memory(plan):
    """Two moment estimates per trainable parameter in its dtype (8 bytes per float32 weight).
    The step's temporaries: torch's foreach implementation (CUDA) makes one copy of the second
    moments; the per-tensor loop (CPU) two of the largest tensor. Only when no other optimizer
    plugin reported its own."""
    from plugtune.plan import Optimizer

    if plan.optimizer is not None:
        return
    sizes = [p.numel * p.dtype.itemsize for p in plan.trainable()]
    step = sum(sizes) if plan.device == "cuda" else 2 * max(sizes, default=0)
    plan.optimizer = Optimizer("AdamW (torch): 2 states in the parameter dtype",
                               2 * sum(sizes), step)
