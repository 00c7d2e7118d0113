"""Runs whose weights are sharded across processes: which engine accelerate chose (from the
user's ``accelerate launch`` flags or config, never from the recipe), and the model and optimizer
state gathered to the main process or loaded back, as ``torch.distributed.checkpoint.state_dict``
does it for FSDP2 (accelerate's own ``get_state_dict`` for the final model).

Under DDP or one process nothing changes: the main process reads its own full copy. Under FSDP2
each process holds a shard of every parameter (a ``DTensor``), so every step that reads or writes
whole weights (a checkpoint, the final save, a resume, early stopping's best weights) is a
collective: every process calls it, the main process writes. See docs/distributed.md.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from . import zero
from .errors import PlugtuneError

#: Where a user reads what runs on more than one process, and how.
DOCS = "docs/distributed.md"


def is_sharded(acc: Any) -> bool:
    """Whether accelerate shards the weights, or their gradients and optimizer state, across
    processes (FSDP; DeepSpeed ZeRO, :mod:`plugtune.zero`)."""
    return getattr(acc, "distributed_type", None) in ("FSDP", "DEEPSPEED")  # a str enum


def check_engine(acc: Any) -> str | None:
    """Refuse, in one line, an engine the loop cannot run; return a warning line where the
    user asked for one that accelerate did not start (FSDP/DeepSpeed on CPU processes)."""
    kind = acc.distributed_type  # a str enum: DistributedType.FSDP == "FSDP"
    if kind == "DEEPSPEED" and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() != acc.num_processes:
        raise PlugtuneError(
            f"DeepSpeed was started on {torch.distributed.get_world_size()} {acc.device.type} "
            f"processes, but accelerate counts {acc.num_processes} (it reads the process count "
            "only on GPUs and other accelerators): run DeepSpeed on GPUs, or these processes "
            f"as DDP (ACCELERATE_USE_CPU=true, without --use_deepspeed; see {DOCS})")
    if kind == "DEEPSPEED" and zero.stage(acc) not in (2, 3):
        raise PlugtuneError(
            f"DeepSpeed ZeRO stage {zero.stage(acc)} is not supported: launch with --zero_stage "
            f"2 or 3 (zero_optimization.stage in the DeepSpeed config; see {DOCS})")
    if kind == "FSDP" and acc.state.fsdp_plugin.fsdp_version != 2:
        raise PlugtuneError(
            "FSDP1 is not supported: launch with FSDP2 (accelerate launch --use_fsdp "
            f"--fsdp_version 2, or fsdp_version: 2 in the accelerate config; see {DOCS})")
    asked = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"),
                                    ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(var, "").lower() == "true"]
    if asked and kind not in ("FSDP", "DEEPSPEED") and acc.num_processes > 1:
        why = ("accelerate starts it only on GPUs (and other accelerators)" if asked[0] == "FSDP"
               else "accelerate ignores it under ACCELERATE_USE_CPU")
        return (f"warning: {asked[0]} was asked for, but {why}; these {acc.num_processes} "
                f"{acc.device.type} processes run as DDP, each holding the whole model "
                f"(see {DOCS})")
    return None


def check_savers(acc: Any, pm: Any) -> None:
    """Under FSDP or DeepSpeed, refuse a ``plugtune_save_model`` that takes no ``state_dict``
    (it would save the main process's shards, not the model), and under DeepSpeed a task that
    cannot count its targets before the forward."""
    if not is_sharded(acc):
        return
    if zero.is_deepspeed(acc):
        zero.check_task(pm)
    for impl in pm.hook.plugtune_save_model.get_hookimpls():
        if "state_dict" not in impl.argnames:
            raise PlugtuneError(
                f"plugin {impl.plugin_name}: its plugtune_save_model takes no state_dict, so "
                f"under {acc.distributed_type} it would save one process's shards; have it save "
                "the gathered state_dict it is given (see docs/hooks.md), or run without it")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``t`` (``t`` itself where it is not sharded)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def trainable(acc: Any, model: Any) -> dict[str, torch.Tensor]:
    """The trained parameters, whole, by name, on the main process's CPU (under FSDP a
    collective: every process calls it; the others get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if zero.is_deepspeed(acc):
        return zero.trainable(acc, model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    full: dict[str, Any] = get_model_state_dict(model, options=_options(ignore_frozen_params=True))
    return {n: t.contiguous() for n, t in full.items() if n in names}


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (the form that loads under any engine and
    process count), whole, on the main process (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(optimizer), options=_options())


def load(acc: Any, model: Any, optimizer: Any, weights: dict[str, torch.Tensor],
         optim: dict[str, Any] | None) -> None:
    """Load whole ``weights`` (and ``optim``, name-keyed, or None to leave the optimizer) read
    by the main process into every process's shards (a collective: the others pass ``{}``)."""
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = _options(broadcast_from_rank0=acc.num_processes > 1, strict=False)
    set_model_state_dict(model, dict[str, Any](weights), options=options)
    if optim is not None:
        set_optimizer_state_dict(model, _inner(optimizer), optim, options=options)


def is_by_name(optim: dict[str, Any]) -> bool:
    """Whether an optimizer state dict is keyed by parameter name (:func:`optimizer_state`)
    rather than by position (``optimizer.state_dict()``)."""
    groups = optim.get("param_groups") or [{}]
    return any(isinstance(p, str) for p in groups[0].get("params", []))


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def full_state_dict(acc: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on the main process, gathered as accelerate does it for
    the final save (a collective: every process calls it); None where the model is not
    sharded (the save reads the main process's own copy)."""
    if zero.is_deepspeed(acc):
        return zero.full_state_dict(acc, acc.unwrap_model(model))
    return acc.get_state_dict(model) if is_sharded(acc) else None


def same_count(acc: Any, mine: int) -> int:
    """How many more forward passes this process must make so that every process makes as
    many as the busiest one (under FSDP a forward gathers each layer's weights from every
    process: a process that stopped early would leave the others waiting)."""
    if not is_sharded(acc) or acc.num_processes == 1:
        return 0
    counts = acc.gather(torch.tensor([mine], device=acc.device))
    return int(counts.max().item()) - mine
