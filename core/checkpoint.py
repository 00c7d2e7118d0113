"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

``RUN/checkpoints/step-K/`` holds

- ``trainable.safetensors``: the parameters that train, by name (for LoRA the adapters and
  heads: megabytes, not the base, which the recipe reloads),
- ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` under fp16 mixed precision),
- ``rng.pt``: the python, numpy, torch and every CUDA device's random states of every
  process, a list by rank (each process draws its own dropout masks),
- ``state.json``: the step, the data position and the loop's own counters,
- whatever plugins write through ``plugtune_save_checkpoint``,
- ``checksums.json``, written last: the size and sha256 of every other file (``state.json``
  and plugins' files included), so that :func:`verify` finds a file that was truncated,
  altered or replaced since (a disk error, a hand edit, a copy cut short).

A checkpoint is assembled in a hidden temporary directory and renamed into place, and an old
one is renamed away before it is deleted: a run killed at any moment leaves every
``step-K`` directory whole.
"""
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import rundir
from .rundir import UMASK

PATTERN = re.compile(r"step-(\d+)")
WEIGHTS = "trainable.safetensors"
CHECKSUMS = "checksums.json"
#: The suffix a damaged checkpoint is renamed with when a resume passes it over.
DAMAGED = ".damaged"

#: ``plugin_hook(folder)``: plugins add their files to, or read them from, a checkpoint folder
PluginHook = Callable[[Path], object]


def directory(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """This process's random states."""
    # legacy=True (the default) gives the tuple form
    kind, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float],
                                             np.random.get_state())
    return {"python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Restore this process's random states from :func:`rng_state`'s answer, or from a list of
    them by rank (``rng.pt``; older checkpoints hold one state, restored on every process)."""
    if isinstance(state, list):
        state = state[_rank() if _rank() < len(state) else 0]  # more processes than saved
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters that train (copied, contiguous, on the CPU)."""
    return {n: p.detach().to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, path: str | Path) -> None:
    """Copy saved trainable parameters into ``model`` in place; every name must match."""
    copy_trainable(model, load_file(path))


def copy_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``{name: tensor}`` into ``model``'s parameters in place; every name must match."""
    params = dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise KeyError(f"the checkpoint has parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def save(path: str | Path, *, model: torch.nn.Module | None = None,
         optimizer: torch.optim.Optimizer | None = None, scheduler: Any, scaler: Any,
         state: dict[str, Any], plugin_hook: PluginHook,
         rng: list[dict[str, Any]] | None = None,
         weights: dict[str, torch.Tensor] | None = None,
         optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint into the directory ``path`` atomically (replacing one there).

    :param state: the loop's counters (``step`` first), written as ``state.json``.
    :param rng: random states to record, a list by rank (default: this process's current
        ones alone).
    :param plugin_hook: ``plugin_hook(tmp_path)`` lets plugins add their files.
    :param weights, optimizer_state: what to save in place of ``model``'s trainable parameters
        and ``optimizer.state_dict()`` (gathered from every process's shards under FSDP).
    """
    if weights is None:
        assert model is not None
        weights = trainable_state(model)
    if optimizer_state is None:
        assert optimizer is not None
        optimizer_state = optimizer.state_dict()
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)
        save_file(weights, tmp / WEIGHTS)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng or [rng_state()], tmp / "rng.pt")
        plugin_hook(tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / CHECKSUMS).write_text(json.dumps(checksums(tmp), indent=2) + "\n")
        _sync(tmp)
        if final.exists():
            remove(final)
        os.replace(tmp, final)
    except BaseException as exc:
        full = rundir.is_disk_full(exc, final.parent)  # asked before the space is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise rundir.DiskFull(final) from exc
        raise
    return final


def _files(folder: str | Path) -> list[str]:
    """Every file under ``folder`` except ``checksums.json``, as relative names, sorted."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(folder: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"files": {name: {"size": bytes, "sha256": hex}}}`` of a checkpoint's files."""
    return {"files": {name: {"size": (Path(folder) / name).stat().st_size,
                             "sha256": _sha256(Path(folder) / name)}
                      for name in _files(folder)}}


def verify(path: str | Path) -> str | None:
    """What is wrong with the checkpoint directory ``path``, in a few words, or None when it
    is intact: each file its ``checksums.json`` lists is there, of its size and sha256, and
    ``state.json``'s step is the ``K`` of ``step-K``. A checkpoint written before plugtune
    kept checksums (no ``checksums.json``) is accepted on its step alone."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        step = state["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "state.json is unreadable"
    match = PATTERN.fullmatch(path.name)
    if match and step != int(match.group(1)):
        return f"state.json says step {step!r}, not {match.group(1)}"
    if not (path / CHECKSUMS).is_file():
        return None
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())["files"]
        assert isinstance(recorded, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{CHECKSUMS} is unreadable"
    for name, want in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want.get("size"):
            return f"{name} is {size} bytes, not the {want.get('size')} written"
        if _sha256(file) != want.get("sha256"):
            return f"{name} differs from what was written (sha256)"
    return None


def prune(run_dir: str | Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest checkpoints of a run (None: keep all)."""
    for old in checkpoints(run_dir)[:-keep] if keep else []:
        remove(old)


def _sync(folder: Path) -> None:
    """fsync every file and the folder, so a power cut after the rename finds the data."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a directory (a checkpoint): renamed away first, so no half-deleted ``step-K`` is
    ever seen."""
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    parent = directory(run_dir)
    found = [(int(m.group(1)), p) for p in parent.iterdir()
             if (m := PATTERN.fullmatch(p.name)) and (p / "state.json").is_file()] \
        if parent.is_dir() else []
    return [p for _, p in sorted(found)]


def clean(run_dir: str | Path) -> None:
    """Remove what a killed run left half-done: temporary and half-deleted checkpoints."""
    parent = directory(run_dir)
    for p in parent.iterdir() if parent.is_dir() else []:
        if p.name.startswith(".") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def latest(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def _keep_recipe_lrs(optimizer: torch.optim.Optimizer, scheduler: Any,
                     recipe_lrs: Sequence[float]) -> None:
    """The learning rates the recipe gives now, where a resume was forced past an edited
    ``train.lr``, ``max_steps`` or schedule: the saved optimizer and scheduler state hold the
    old rates, which would silently win. A ``LambdaLR`` (the default schedule; its factor
    function is the recipe's, not saved) gives each group ``base * factor(step)`` -- the very
    value it set at the last step when nothing changed; another schedule's rates are scaled
    by new base / old base."""
    saved = list(getattr(scheduler, "base_lrs", []))
    groups = optimizer.param_groups
    if not recipe_lrs or len(saved) != len(groups) or len(recipe_lrs) != len(groups):
        return
    factors = getattr(scheduler, "lr_lambdas", None)
    for i, (group, old, new) in enumerate(zip(groups, saved, recipe_lrs)):
        if factors is not None:
            group["lr"] = new * factors[i](scheduler.last_epoch)
        elif old != new:
            group["lr"] = group["lr"] * new / old if old else new
        if "initial_lr" in group:
            group["initial_lr"] = new
    scheduler.base_lrs = list(recipe_lrs)
    scheduler._last_lr = [group["lr"] for group in groups]


#: ``restore(weights, optimizer_state)``: loads both into a model and optimizer whose state
#: is sharded across processes (every process calls it; only the main one's dicts are read)
Restore = Callable[[dict[str, torch.Tensor], dict[str, Any]], object]


def load(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, scaler: Any, plugin_hook: PluginHook,
         restore: Restore | None = None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save` into the set-up objects; return its
    ``state.json``. The random states are restored last, just before training goes on.
    ``restore`` replaces the loading of the weights and the optimizer state."""
    path = Path(path)
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if restore is not None:
        restore(load_file(path / WEIGHTS), optimizer_state)
    else:
        load_trainable(model, path / WEIGHTS)
        optimizer.load_state_dict(optimizer_state)
    recipe_lrs = list(getattr(scheduler, "base_lrs", []))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _keep_recipe_lrs(optimizer, scheduler, recipe_lrs)
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    plugin_hook(path)
    state = json.loads((path / "state.json").read_text())
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state
