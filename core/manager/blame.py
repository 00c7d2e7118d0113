"""Blame: an exception raised inside a plugin's hook becomes a :class:`PluginFault` naming the
plugin, its hook and, once training has begun, the step."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pluggy

from ..errors import PluginError, PlugtuneError


class PluginFault(PluginError):
    """A plugin's hook raised; the message names the plugin, its hook and, once training has
    begun, the step. ``plugin`` and ``hook`` name them."""

    def __init__(self, message: str, plugin: str | None = None, hook: str | None = None) -> None:
        super().__init__(message)
        self.plugin, self.hook = plugin, hook


def blame(pm: pluggy.PluginManager, exc: BaseException,
          step: int | None = None) -> PluginFault | None:
    """A :class:`PluginFault` naming the plugin whose hook implementation ``exc`` was raised
    in (the innermost one on the traceback), or None when no hook implementation is on it.
    ``step``: the optimizer step being taken or evaluated, or None before training (the
    recipe, data, model and optimizer phases), which the message then leaves out.
    Set ``PLUGTUNE_TRACEBACK=1`` (or pass ``-v``) to see the traceback too."""
    impls: dict[Any, tuple[str, str]] = {}
    for caller in pm.hook.__dict__.values():
        for impl in getattr(caller, "get_hookimpls", lambda: [])():
            code = getattr(impl.function, "__code__", None)
            if code is not None:
                impls[code] = (impl.plugin_name, caller.name)
    found: tuple[str, str] | None = None
    tb = exc.__traceback__
    while tb is not None:
        found = impls.get(tb.tb_frame.f_code, found)
        tb = tb.tb_next
    if found is None:
        return None
    name, hook = found
    info = getattr(pm, "infos", {}).get(name)
    dist = f" (distribution {info.dist} {info.version})" if info else ""
    when = f" at step {step}" if step is not None else ""
    return PluginFault(f"plugin {name}{dist} failed in {hook}{when}: "
                       f"{type(exc).__name__}: {exc}", plugin=name, hook=hook)


@contextlib.contextmanager
def blamed(pm: pluggy.PluginManager, step: int | None = None) -> Iterator[None]:
    """Turn an exception a plugin's hook raises inside the block into a :class:`PluginFault`
    naming it (the original is its ``__cause__``); plugtune's own errors pass as they are."""
    try:
        yield
    except PlugtuneError:
        raise
    except Exception as exc:
        fault = blame(pm, exc, step)
        if fault is None:
            raise
        raise fault from exc
