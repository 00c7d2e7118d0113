"""``model.attn_implementation``: whether the chosen attention kernel can train here (checked at
``plugtune validate``, before any model loads), whether it keeps packed examples apart, what
the planner traces in its place, and which one a loaded model runs."""
from __future__ import annotations

from typing import Any

import torch

from .errors import Problem
from .recipe.schema import ATTENTION

__all__ = ["ATTENTION", "problems", "unavailable", "planned", "in_use", "KEEPS_PACKED_APART"]

KEY = "model.attn_implementation"

#: Implementations that keep packed examples apart (``train.packing``): transformers builds a
#: block-diagonal mask from the restarting ``position_ids`` for eager, SDPA and flex attention,
#: and flash attention reads them as variable-length sequences. ``paged|eager`` (made for
#: generation with a paged cache) ignores them: a packed example sees the one before it.
#: tests/test_attention.py checks each one that runs on a CPU.
KEEPS_PACKED_APART = frozenset(ATTENTION) - {"paged|eager"}


def _flash_package(version: int) -> bool:
    """Whether transformers finds the package of flash attention ``version`` (2: flash-attn)."""
    try:
        from transformers.modeling_flash_attention_utils import (
            FLASH_ATTENTION_COMPATIBILITY_MATRIX)
    except ImportError:  # pragma: no cover - a transformers without it
        return False
    entry = FLASH_ATTENTION_COMPATIBILITY_MATRIX.get(version)
    return bool(entry and entry["pkg_availability_check"]())


def unavailable(name: str | None, cuda: bool | None = None) -> str | None:
    """Why ``name`` cannot train on this machine (what is missing, and what to use instead),
    or None. ``cuda``: whether a CUDA GPU is there (default: ask torch)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name is not None and name.startswith("flash_attention_"):
        version = int(name.rsplit("_", 1)[1])
        package = {2: "flash-attn", 3: "flash-attn-3", 4: "flash-attn-4"}[version]
        missing = ([] if cuda else ["a CUDA GPU (torch.cuda.is_available() is False)"]) + (
            [] if _flash_package(version) else [f"the {package} package"])
        if missing:
            return (f"{name} needs {' and '.join(missing)}; use sdpa (the default) here, or "
                    f"install {package} on a CUDA machine")
    if name == "flex_attention" and not cuda:
        return (f"flex_attention cannot train on a CPU (torch {torch.__version__.split('+')[0]}'s "
                "flex attention has no backward pass there); use sdpa, or train on a CUDA GPU")
    return None


def problems(model: Any, packing: bool, hardware: bool = True) -> list[Problem]:
    """The problems of ``model.attn_implementation`` (``model``: the recipe's model section)
    with ``train.packing``, one line each; ``hardware``: whether this machine must run it."""
    name = model.attn_implementation
    out = []
    why = unavailable(name) if hardware else None
    if why:
        out.append(Problem(KEY, why))
    if packing and name is not None and name not in KEEPS_PACKED_APART:
        out.append(Problem(KEY, f"{name} would let packed examples attend to each other (it "
                           "ignores the restarting position_ids of train.packing); use sdpa, "
                           "eager or flash_attention_2, or set train.packing: false"))
    return out


def planned(name: str | None) -> str | None:
    """What the planner builds its meta-device model with for ``name``: eager attention keeps
    its probabilities (batch x heads x T^2) for backward, which the meta pass then counts; the
    fused kernels (SDPA, flash, flex) keep only their output and log-sum-exp, which the planner
    counts by tracing SDPA (their kernels cannot run on the meta device)."""
    return "eager" if name is not None and "eager" in name else None


def in_use(model: Any) -> str | None:
    """The attention implementation a loaded model runs (transformers' ``_attn_implementation``
    of its config, through any wrapper: peft, DDP)."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        config = getattr(model, "config", None)
        if config is not None and not isinstance(config, dict):
            return getattr(config, "_attn_implementation", None)
        model = getattr(model, "module", None) or getattr(model, "base_model", None) or getattr(
            model, "model", None)
    return None
