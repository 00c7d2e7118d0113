"""The check before ``plugtune run`` loads anything: the plan's peak, and a warning when it will
not fit the GPU this process sees. It never stops a run."""
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy
import torch

from .budget import size
from .moments import Estimate, estimate

if TYPE_CHECKING:
    from ..recipe import Recipe


def preflight(recipe: "Recipe", pm: pluggy.PluginManager,
              echo: Callable[[str], object] = print) -> Estimate | None:
    """Before ``plugtune run`` loads anything: print the plan's peak, and warn when it will not
    fit the GPU this process sees. Never stops a run: a planner failure is only reported."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # under `accelerate launch`/torchrun: one process's share (FSDP shards only on GPUs)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    zero = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # accelerate's default: 2
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and \
        zero in ("2", "3")
    shard = ("fsdp" if fsdp else f"zero{zero}" if deepspeed else None) \
        if world > 1 and device == "cuda" else None
    try:
        est = estimate(recipe, pm, device, world, shard)
    except Exception as exc:  # the planner must never stop a run
        echo(f"memory plan: unavailable ({type(exc).__name__}: {exc})")
        return None
    total = est.total()
    if device == "cpu":
        echo(f"memory plan: {size(total)} at peak ({est.peak().name}); no CUDA GPU here, so "
             "no fit check (`plugtune plan` shows the breakdown)")
        return est
    free, capacity = torch.cuda.mem_get_info()
    engine = {"fsdp": ", FSDP", "zero2": ", ZeRO-2", "zero3": ", ZeRO-3"}.get(shard or "", "")
    each = f" per process (one of {world}{engine})" if world > 1 else ""
    echo(f"memory plan: {size(total)} at peak{each}; the GPU has {size(free)} free of "
         f"{size(capacity)}")
    if total > free:
        echo(f"warning: this recipe will likely run out of GPU memory: it needs {size(total)} "
             f"and {size(free)} is free; `plugtune plan {recipe.path} --fit` finds plugins and "
             "settings that fit")
    return est
