"""Runs under DeepSpeed ZeRO (stages 2 and 3) through accelerate: the engine's config filled from
the recipe, the step's backward passes and update handed to the engine, and the trained weights
gathered whole or set back through DeepSpeed's public ``deepspeed.utils.safe_*`` functions.

DeepSpeed's engine owns the gradients (ZeRO-2 reduce-scatters them into its partitions during
backward), so plugtune cannot scale them to the step's mean after the backward passes as it
does elsewhere (:mod:`plugtune.step`): under DeepSpeed the task states each micro-batch's target
count before the forward (``plugtune_count_targets``), the step's count is summed over the
processes first, and each micro-batch backpropagates its loss sum over that count (HF Trainer's
``num_items_in_batch``). Checkpoints keep plugtune's layout: the trainable weights whole
(``trainable.safetensors``) and the engine's own partitioned state (``deepspeed/``, written by
``engine.save_checkpoint`` on every process) inside the atomic, checksummed ``step-K``.
See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import PlugtuneError

#: The folder of a checkpoint that holds the engine's state, and the engine's tag for it.
FOLDER = "deepspeed"
DOCS = "docs/distributed.md"


def is_deepspeed(acc: Any) -> bool:
    """Whether accelerate started DeepSpeed (``accelerate launch --use_deepspeed``)."""
    return getattr(acc, "distributed_type", None) == "DEEPSPEED"


def stage(acc: Any) -> int:
    return int(acc.state.deepspeed_plugin.zero_stage)


@contextlib.contextmanager
def whole_at_load(acc: Any) -> Iterator[None]:
    """Under ZeRO-3, load the model whole in each process (the engine partitions it at
    ``prepare``, as under FSDP), not partitioned as transformers loads it while accelerate's
    DeepSpeed config is set (``deepspeed.zero.Init``): the model-phase hooks (adapters, heads,
    freezing) then see real shapes."""
    if not is_deepspeed(acc) or stage(acc) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        acc.state.deepspeed_plugin.set_deepspeed_weakref()


def _answering(hook: Any) -> list[str]:
    return [i.plugin_name for i in hook.get_hookimpls() if not (i.hookwrapper or i.wrapper)]


def task(pm: Any) -> str:
    """The plugin that answers ``plugtune_compute_loss`` (the last registered), or ``"?"``."""
    answering = _answering(pm.hook.plugtune_compute_loss)
    return answering[-1] if answering else "?"


def check_task(pm: Any) -> None:
    """Refuse, in one line, a task that cannot state its target count before the forward."""
    name = task(pm)
    if name != "?" and name not in _answering(pm.hook.plugtune_count_targets):
        raise refusal(name)


def refusal(plugin: str) -> PlugtuneError:
    return PlugtuneError(
        f"plugin {plugin} cannot run under DeepSpeed: it does not state a batch's target count "
        "before the forward (plugtune_count_targets), and DeepSpeed's engine needs the step's "
        f"count before its backward passes; run it under FSDP2 or DDP (see {DOCS})")


def configure(acc: Any, recipe: Any) -> None:
    """Fill the DeepSpeed config's ``auto`` values from the recipe before ``prepare``, as HF
    Trainer does: the micro-batch (``train.batch_size``), clipping (``train.max_grad_norm``;
    none: 0) and, under bf16, the engine's check for non-finite gradients (a step with one is
    skipped, as everywhere in plugtune). A clipping value the user's config sets that differs
    from the recipe's is refused in one line."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    t = recipe.train
    given = [key for key in ("optimizer", "scheduler") if key in config]
    if given:
        raise PlugtuneError(
            f"the DeepSpeed config names {' and '.join(given)}: remove it; the recipe's "
            "optimizer and scheduler plugins build them (train.lr, the optimizer's section; "
            f"see {DOCS})")
    clip = float(t.max_grad_norm or 0.0)
    given = config.get("gradient_clipping", "auto")
    if given != "auto" and not math.isclose(float(given), clip):
        raise PlugtuneError(
            f"the DeepSpeed config's gradient_clipping ({given}) differs from the recipe's "
            f"train.max_grad_norm ({t.max_grad_norm}): set gradient_clipping: auto (the recipe "
            "decides) or make them equal")
    config["gradient_clipping"] = clip
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = t.batch_size
    if config.get("gradient_accumulation_steps", "auto") == "auto":
        config["gradient_accumulation_steps"] = 1  # the loop accumulates (boundaries below)
    if config.get("bf16", {}).get("enabled") in (True, "auto"):
        config["bf16"].setdefault("check_grad_overflow", True)


def backward(engine: Any, loss: torch.Tensor, last: bool) -> None:
    """Backpropagate one micro-batch's share of the step's objective; the last one of a step
    is the engine's accumulation boundary (ZeRO reduces the gradients there). The engine's own
    division by its ``gradient_accumulation_steps`` is off: ``loss`` is already the share."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine: Any) -> tuple[float, bool]:
    """Clip and apply the accumulated gradients in the engine, then clear them: ``(grad_norm
    before clipping, applied)``. The engine skips a step whose gradient is not finite (its
    overflow check)."""
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else math.nan
    return norm, bool(engine.was_step_applied())


def _gathered(p: torch.nn.Parameter, zero3: bool) -> torch.Tensor:
    """The whole of ``p`` on every process: a trained one's float32 master weights (a
    collective), a frozen one gathered under ZeRO-3."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    if p.requires_grad:
        full = safe_get_full_fp32_param(p)
        if full is not None:
            return full.detach()
    with deepspeed.zero.GatheredParameters([p], enabled=zero3 and hasattr(p, "ds_id")):
        return p.detach().clone()


def trainable(acc: Any, model: Any) -> dict[str, torch.Tensor]:
    """The trained parameters, whole, by name, on the main process's CPU (a collective)."""
    zero3, main = stage(acc) == 3, acc.is_main_process
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = _gathered(p, zero3)
            if main:
                out[name] = full.to("cpu", copy=True).contiguous()
    return out


def full_state_dict(acc: Any, model: Any) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process's CPU (a collective), trained weights
    from the engine's float32 masters (what one process without DeepSpeed would save, also
    under bf16, where the engine's model holds bf16 copies)."""
    zero3, main = stage(acc) == 3, acc.is_main_process
    params = dict(model.named_parameters(remove_duplicate=False))
    done: dict[int, torch.Tensor] = {}
    out = {}
    for key, value in model.state_dict().items():
        p = params.get(key)
        if p is not None:
            if id(p) not in done:
                done[id(p)] = _gathered(p, zero3).to("cpu")
            value = done[id(p)]
        if main:
            out[key] = value.to("cpu", copy=True).contiguous()
    return out


def save_engine(acc: Any, engine: Any, path: str | Path) -> Path | None:
    """Every process writes its partitions of the engine's state (``engine.save_checkpoint``)
    into a staging folder beside the checkpoint ``path`` (the main process's, shared); the main
    process gets the folder back, to move into the checkpoint before its checksums."""
    from accelerate.utils import broadcast_object_list

    final = Path(broadcast_object_list([str(path) if acc.is_main_process else None])[0])
    staging = final.parent / f".{final.name}.{FOLDER}"
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    acc.wait_for_everyone()
    engine.save_checkpoint(str(staging), tag=FOLDER, save_latest=False,
                           exclude_frozen_parameters=True)
    acc.wait_for_everyone()
    return staging / FOLDER if acc.is_main_process else None


def load_engine(engine: Any, path: str | Path) -> None:
    """Load the engine's state from a checkpoint :func:`save_engine` wrote (every process)."""
    if not (Path(path) / FOLDER).is_dir():
        raise PlugtuneError(f"{path} was not written under DeepSpeed: resume it as it ran "
                            f"(FSDP, DDP or one process; see {DOCS})")
    engine.load_checkpoint(str(path), tag=FOLDER, load_module_strict=False,
                           load_optimizer_states=True, load_lr_scheduler_states=False)


def load_weights(acc: Any, model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Set the trained parameters to the main process's whole ``weights`` (a collective: the
    others pass ``{}``): the engine's float32 masters and the model's own copies."""
    import deepspeed
    from accelerate.utils import broadcast_object_list
    from deepspeed.utils import safe_set_full_fp32_param

    weights = broadcast_object_list([weights if acc.is_main_process else None])[0]
    zero3 = stage(acc) == 3
    for name, p in model.named_parameters():
        if name not in weights:
            continue
        value = weights[name]
        safe_set_full_fp32_param(p, value.to(p.device, torch.float32))
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0,
                                               enabled=zero3 and hasattr(p, "ds_id")):
            with torch.no_grad():
                p.data.copy_(value.to(p.device, p.dtype))
