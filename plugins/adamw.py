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
