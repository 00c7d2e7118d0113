"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

``RUN/checkpoints/step-K/`` holds

- ``trainable.safetensors``: the parameters that train, by name (for LoRA the adapters and
  heads: megabytes, not the base, which the recipe reloads),
- ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` under fp16 mixed precision),
- ``rng.pt``: the python, numpy, torch and every CUDA device's random states of every
  process, a list by rank (each process draws its own dropout masks),
- ``state.json``: the step, the data position and the loop's own counters,
- whatever plugins write through ``plugtune_save_checkpoint``.

A checkpoint is assembled in a hidden temporary directory and renamed into place, and an old
one is renamed away before it is deleted: a run killed at any moment leaves every
``step-K`` directory whole.
"""
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .rundir import UMASK

PATTERN = re.compile(r"step-(\d+)")
WEIGHTS = "trainable.safetensors"


def directory(run_dir):
    return Path(run_dir) / "checkpoints"


def rng_state():
    """This process's random states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
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


def _rank():
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def trainable_state(model):
    """``{name: tensor}`` of the parameters that train (copied, contiguous, on the CPU)."""
    return {n: p.detach().to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, path):
    """Copy saved trainable parameters into ``model`` in place; every name must match."""
    saved = load_file(path)
    params = dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise KeyError(f"the checkpoint has parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def save(path, *, model, optimizer, scheduler, scaler, state, plugin_hook, rng=None):
    """Write a checkpoint into the directory ``path`` atomically (replacing one there).

    :param state: the loop's counters (``step`` first), written as ``state.json``.
    :param rng: random states to record, a list by rank (default: this process's current
        ones alone).
    :param plugin_hook: ``plugin_hook(tmp_path)`` lets plugins add their files.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)
        save_file(trainable_state(model), tmp / WEIGHTS)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng or [rng_state()], tmp / "rng.pt")
        plugin_hook(tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        _sync(tmp)
        if final.exists():
            remove(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune(run_dir, keep):
    """Delete all but the ``keep`` newest checkpoints of a run (None: keep all)."""
    for old in checkpoints(run_dir)[:-keep] if keep else []:
        remove(old)


def _sync(folder):
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


def remove(path):
    """Delete a directory (a checkpoint): renamed away first, so no half-deleted ``step-K`` is
    ever seen."""
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def checkpoints(run_dir):
    """The complete checkpoints of a run, oldest first."""
    parent = directory(run_dir)
    found = [(int(m.group(1)), p) for p in parent.iterdir()
             if (m := PATTERN.fullmatch(p.name)) and (p / "state.json").is_file()] \
        if parent.is_dir() else []
    return [p for _, p in sorted(found)]


def clean(run_dir):
    """Remove what a killed run left half-done: temporary and half-deleted checkpoints."""
    parent = directory(run_dir)
    for p in parent.iterdir() if parent.is_dir() else []:
        if p.name.startswith(".") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def latest(run_dir):
    found = checkpoints(run_dir)
    return found[-1] if found else None


def load(path, *, model, optimizer, scheduler, scaler, plugin_hook):
    """Restore a checkpoint written by :func:`save` into the set-up objects; return its
    ``state.json``. The random states are restored last, just before training goes on."""
    path = Path(path)
    load_trainable(model, path / WEIGHTS)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu",
                                         weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    plugin_hook(path)
    state = json.loads((path / "state.json").read_text())
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state
