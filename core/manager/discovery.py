"""Finding plugins: every entry point of the ``plugtune`` group imported and checked (its
``PLUGTUNE_API`` range, its role declarations), a broken one named with how to skip it."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ..errors import PluginError
from .roles import GROUP, IMPLIED_ROLES, check_declarations

#: Comma-separated plugin names not to import at all (to run despite a broken plugin).
SKIP_ENV = "PLUGTUNE_SKIP_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    obj: object  # the module or class the entry point names
    dist: str
    version: str
    #: answers the firstresult hooks it implements before any other plugin, as if it declared
    #: replacing them all (plugins :func:`plugtune.testing.load_recipe` adds)
    overrides: bool = False

    @property
    def default(self) -> bool:
        return bool(getattr(self.obj, "PLUGTUNE_DEFAULT", False))

    @property
    def roles(self) -> set[str]:
        """The roles the plugin declares (``PLUGTUNE_ROLES``) and those they imply."""
        declared = getattr(self.obj, "PLUGTUNE_ROLES", ())
        roles = {declared} if isinstance(declared, str) else set(declared)
        return roles.union(*(IMPLIED_ROLES.get(r, ()) for r in roles))

    @property
    def replaces(self) -> dict[str, set[str]]:
        """``{plugin: {hook, ...}}`` of ``PLUGTUNE_REPLACES`` (hook names completed to
        ``plugtune_…``; ``"*"`` stands for every hook)."""
        declared = getattr(self.obj, "PLUGTUNE_REPLACES", None) or {}
        return {name: {h if h == "*" or h.startswith("plugtune_") else f"plugtune_{h}"
                       for h in ([hooks] if isinstance(hooks, str) else hooks)}
                for name, hooks in declared.items()}

    @property
    def api(self) -> str | None:
        """The declared ``PLUGTUNE_API`` range, or None."""
        wanted = getattr(self.obj, "PLUGTUNE_API", None)
        return None if wanted is None else str(wanted)

    @property
    def doc(self) -> str:
        """The first sentence of the docstring of what the entry point names: the module's,
        or the class's (the module's where the class has none)."""
        text = self.obj.__doc__ if isinstance(self.obj.__doc__, str) else ""
        if not text.strip() and inspect.isclass(self.obj):
            text = getattr(inspect.getmodule(self.obj), "__doc__", None) or ""
        paragraph = inspect.cleandoc(text).split("\n\n")[0].replace("\n", " ")
        return paragraph.split(". ")[0].rstrip(".")


class Discovered(dict[str, PluginInfo]):
    """``{name: PluginInfo}`` of the usable plugins; ``disabled`` holds ``{name: message}`` of the
    names that two distributions register (neither is loaded: which one a recipe meant is
    unknowable)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disabled: dict[str, str] = {}


def discover(broken: dict[str, BrokenPlugin] | None = None) -> Discovered:
    """Import every plugin of the entry-point group; return ``{name: PluginInfo}``
    (a :class:`Discovered`).

    A plugin that fails to import, or whose ``PLUGTUNE_API`` range excludes this plugtune's
    :data:`plugtune.API_VERSION`, is a :class:`PluginError` naming it, its distribution and
    how to skip it; with ``broken`` (a dict) such plugins are put there (``name -> error``)
    instead, and discovery goes on (``plugtune plugins`` lists them all). A name two
    distributions register disables those two only (``Discovered.disabled``, and ``broken``)."""
    skip = {s.strip() for s in os.environ.get(SKIP_ENV, "").split(",") if s.strip()}
    by_name: dict[str, dict[tuple[str, str], EntryPoint]] = {}
    for ep in entry_points(group=GROUP):
        if ep.name not in skip:
            dist = (ep.dist.name, ep.dist.version) if ep.dist else ("unknown distribution", "?")
            by_name.setdefault(ep.name, {}).setdefault(dist, ep)
    found = Discovered()
    for name, dists in by_name.items():
        if len(dists) > 1:
            found.disabled[name] = duplicate_message(name, dists)
            if broken is not None:
                broken[name] = BrokenPlugin(name, " and ".join(d for d, _ in dists), "",
                                            found.disabled[name])
            continue
        (dist_name, ver), ep = next(iter(dists.items()))
        try:
            info = load(ep, dist_name, ver)
        except PluginError as exc:
            if broken is None:
                raise
            broken[name] = BrokenPlugin(name, dist_name, ver, str(exc))
            continue
        found[name] = info
    return found


def duplicate_message(name: str, dists: dict[tuple[str, str], EntryPoint]) -> str:
    both = " and ".join(f"{d} {v}" for d, v in dists)
    return (f"plugin {name!r} is registered by two distributions, {both}, so neither is "
            f"loaded\n  hint: uninstall one of {' and '.join(d for d, _ in dists)}, or set "
            f"{SKIP_ENV}={name} to run without both")


def load(ep: EntryPoint, dist: str, ver: str) -> PluginInfo:
    """The checked :class:`PluginInfo` of one entry point, or a :class:`PluginError`."""
    try:
        obj = ep.load()
    except Exception as exc:
        raise PluginError(
            f"plugin {ep.name!r} (distribution {dist} {ver}, entry point {ep.value}) "
            f"failed to import: {type(exc).__name__}: {exc}\n"
            f"  hint: fix or uninstall {dist}, or set {SKIP_ENV}={ep.name} to run "
            "without it") from exc
    info = PluginInfo(ep.name, obj, dist, ver)
    check_api(info)
    return info


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin that cannot be used, and why (``plugtune plugins`` lists it)."""

    name: str
    dist: str
    version: str
    error: str


def check_api(info: PluginInfo) -> None:
    """Refuse a plugin whose ``PLUGTUNE_API`` (a PEP 440 specifier such as ``">=1.0,<2"``, on
    its module or class) excludes :data:`plugtune.API_VERSION`. A plugin that declares none is
    taken to work with every version."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    from .. import API_VERSION

    where = f"plugin {info.name!r} (distribution {info.dist} {info.version})"
    check_declarations(info, where)
    wanted = getattr(info.obj, "PLUGTUNE_API", None)
    if wanted is None:
        return
    try:
        spec = SpecifierSet(str(wanted))
    except InvalidSpecifier:
        raise PluginError(f"{where}: PLUGTUNE_API = {wanted!r} is not a version range; write "
                          f"one such as \">=1.0,<2\"\n  hint: fix or uninstall {info.dist}, or "
                          f"set {SKIP_ENV}={info.name} to run without it") from None
    if API_VERSION not in spec:
        raise PluginError(
            f"{where} needs plugtune plugin API {spec}, and this plugtune {_version()} provides "
            f"API {API_VERSION}\n  hint: install a version of {info.dist} made for API "
            f"{API_VERSION} (or a plugtune that provides {spec}), or set "
            f"{SKIP_ENV}={info.name} to run without it")


def _version() -> str:
    from .. import __version__

    return __version__


