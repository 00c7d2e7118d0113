"""The plugin manager of a run: the hookspecs and the active plugins registered and checked
(hook names and arguments, near misses of a hook's name), the answers arbitration excludes
left out."""
from __future__ import annotations

import difflib
import inspect
import pluggy
from pluggy import HookimplOpts

from .. import hookspecs
from ..errors import PluginError, did_you_mean
from .discovery import SKIP_ENV, BrokenPlugin, PluginInfo, check_api
from .roles import GROUP, arbitrate, role_map


def make_manager(names: list[str], discovered: dict[str, PluginInfo]) -> Manager:
    """A plugin manager with the hookspecs and the named plugins registered, checked: a hook
    or hook argument that ``plugtune.hookspecs`` does not define, a near miss of a hook name
    (``plugtun_step_end``) or an excluded ``PLUGTUNE_API`` is an error naming the plugin.
    The answers :func:`arbitrate` excludes are not registered; ``pm.roles`` is the
    :func:`role_map` of the run."""
    pm = Manager(GROUP)
    pm.infos = {name: discovered[name] for name in names}
    pm.roles = role_map(names, discovered)
    pm.excluded = arbitrate(names, discovered)[0]
    pm.add_hookspecs(hookspecs)
    for name in names:
        register(pm, discovered[name])
    pm.check_pending()  # each plugin was checked as it registered; this is the backstop
    return pm


def register(pm: Manager, info: PluginInfo) -> object:
    """Register one plugin (a class is instantiated) and check it; :class:`PluginError` when
    it breaks the hook contract, with the plugin unregistered again."""
    check_api(info)
    problem = near_miss(info.obj)
    if problem:
        raise _invalid(info, problem)
    pm.registering = info.name
    try:
        pm.register(info.obj() if inspect.isclass(info.obj) else info.obj, name=info.name)
    except pluggy.PluginValidationError as exc:
        if pm.get_plugin(info.name) is not None:
            pm.unregister(name=info.name)
        raise _invalid(info, str(exc).replace("\n", "; ")) from exc
    plugin = pm.get_plugin(info.name)
    unknown = [c.name for c in pm.get_hookcallers(plugin) or [] if not c.has_spec()]
    if unknown:
        pm.unregister(plugin)
        raise _invalid(info, f"unknown hook {unknown[0]!r}"
                       f"{did_you_mean(unknown[0], vars(hookspecs))}")
    return plugin


def near_miss(obj: object) -> str | None:
    """A message for a function whose name is almost a hook's but not ``plugtune_…``
    (``plugtun_step_end``, ``plugtune_step_end`` spelt ``plugtune__step_end``): pluggy would
    ignore it silently. None when there is none."""
    hooks = [n for n in vars(hookspecs) if n.startswith("plugtune_")]
    for attr in dir(obj):
        if attr.startswith(("plugtune_", "_")) or not inspect.isroutine(getattr(obj, attr, None)):
            continue
        close = difflib.get_close_matches(attr, hooks, n=1, cutoff=0.85)
        if close:
            return (f"function {attr!r} looks like a misspelt hook (did you mean {close[0]!r}?); "
                    "rename it, or start its name with an underscore if it is not a hook")
    return None


def inspect_all(discovered: dict[str, PluginInfo]
                ) -> tuple[Manager, dict[str, BrokenPlugin]]:
    """``(plugin manager, {name: BrokenPlugin})`` with every discovered plugin registered that
    can be: one that breaks the hook contract is left out and reported, not raised."""
    pm = Manager(GROUP)
    pm.infos = dict(discovered)
    pm.add_hookspecs(hookspecs)
    broken: dict[str, BrokenPlugin] = {}
    for name, info in discovered.items():
        try:
            register(pm, info)
        except PluginError as exc:
            broken[name] = BrokenPlugin(name, info.dist, info.version, f"{exc}\n  hint: fix or "
                                        f"uninstall {info.dist}, or set {SKIP_ENV}={name} to "
                                        "run without it")
    return pm, broken


class Manager(pluggy.PluginManager):
    """Like pytest's: a ``plugtune_*`` function is a hook implementation even without
    ``@hookimpl``, so a forgotten decorator (or a misspelt undecorated name) is not silence."""

    #: ``{plugin name: {hook attribute}}`` not to register (see :func:`arbitrate`)
    excluded: dict[str, set[str]] = {}
    registering: str | None = None  #: the plugin being registered
    infos: dict[str, PluginInfo]  #: ``{name: PluginInfo}`` of the plugins registered
    roles: dict[str, list[str]]  #: the run's :func:`role_map` (:func:`make_manager`)

    def parse_hookimpl_opts(self, plugin: object, name: str) -> HookimplOpts | None:
        if self.registering is not None and name in self.excluded.get(self.registering, ()):
            return None
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("plugtune_") and inspect.isroutine(
                getattr(plugin, name, None)):
            opts = {"wrapper": False, "hookwrapper": False, "optionalhook": False,
                    "tryfirst": False, "trylast": False, "specname": None}
        return opts


def _invalid(info: PluginInfo, problem: str) -> PluginError:
    return PluginError(f"plugin {info.name!r} (distribution {info.dist} {info.version}): "
                       f"{problem}; hook names and arguments must match plugtune.hookspecs "
                       "(see docs/hooks.md)")


def hooks_of(pm: pluggy.PluginManager, name: str) -> list[str]:
    """The hook names the registered plugin ``name`` implements."""
    callers = pm.get_hookcallers(pm.get_plugin(name)) or []
    return sorted(c.name for c in callers)
