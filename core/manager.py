"""Find plugins through the ``plugtune`` entry-point group and build the plugin manager.

Built-in plugins are found exactly as a third party's are. A plugin module (or class) that sets
``PLUGTUNE_DEFAULT = True`` is active in every run unless a recipe blocks it with
``no:NAME`` in ``plugins:``; any other plugin is active when a recipe names it. A plugin that
is a class is instantiated afresh for every run, so it can keep per-run state on ``self``.
"""
import contextlib
import difflib
import inspect
import os
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import PluginError, PlugtuneError

GROUP = "plugtune"
#: Comma-separated plugin names not to import at all (to run despite a broken plugin).
SKIP_ENV = "PLUGTUNE_SKIP_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    obj: object  # the module or class the entry point names
    dist: str
    version: str

    @property
    def default(self):
        return bool(getattr(self.obj, "PLUGTUNE_DEFAULT", False))

    @property
    def doc(self):
        """The first sentence of the docstring of what the entry point names: the module's,
        or the class's (the module's where the class has none)."""
        text = self.obj.__doc__ if isinstance(self.obj.__doc__, str) else ""
        if not text.strip() and inspect.isclass(self.obj):
            text = getattr(inspect.getmodule(self.obj), "__doc__", None) or ""
        paragraph = inspect.cleandoc(text).split("\n\n")[0].replace("\n", " ")
        return paragraph.split(". ")[0].rstrip(".")


def discover(broken=None):
    """Import every plugin of the entry-point group; return ``{name: PluginInfo}``.

    A plugin that fails to import, or whose ``PLUGTUNE_API`` range excludes this plugtune's
    :data:`plugtune.API_VERSION`, is a :class:`PluginError` naming it, its distribution and
    how to skip it; with ``broken`` (a dict) such plugins are put there (``name -> error``)
    instead, and discovery goes on (``plugtune plugins`` lists them all)."""
    skip = {s.strip() for s in os.environ.get(SKIP_ENV, "").split(",") if s.strip()}
    found = {}
    for ep in entry_points(group=GROUP):
        if ep.name in skip:
            continue
        dist = ep.dist.name if ep.dist else "unknown distribution"
        ver = ep.dist.version if ep.dist else "?"
        if ep.name in found and (found[ep.name].dist, found[ep.name].version) != (dist, ver):
            raise PluginError(
                f"plugin name {ep.name!r} is registered by two distributions: "
                f"{found[ep.name].dist} and {dist}; uninstall one of them"
            )
        try:
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
        except PluginError as exc:
            if broken is None:
                raise
            broken[ep.name] = BrokenPlugin(ep.name, dist, ver, str(exc))
            continue
        found[ep.name] = info
    return found


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin that cannot be used, and why (``plugtune plugins`` lists it)."""

    name: str
    dist: str
    version: str
    error: str


def check_api(info):
    """Refuse a plugin whose ``PLUGTUNE_API`` (a PEP 440 specifier such as ``">=1.0,<2"``, on
    its module or class) excludes :data:`plugtune.API_VERSION`. A plugin that declares none is
    taken to work with every version."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    from . import API_VERSION

    wanted = getattr(info.obj, "PLUGTUNE_API", None)
    if wanted is None:
        return
    where = f"plugin {info.name!r} (distribution {info.dist} {info.version})"
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


def _version():
    from . import __version__

    return __version__


def resolve_active(requested, discovered):
    """Names of the plugins active for a recipe's ``plugins:`` list, and problems found.

    Defaults come first (in discovery order), then the requested ones in recipe order;
    ``no:NAME`` removes a default.
    """
    problems = []
    blocked = {r[3:] for r in requested if r.startswith("no:")}
    wanted = [r for r in requested if not r.startswith("no:")]
    for name in sorted(blocked | set(wanted)):
        if name not in discovered:
            problems.append(f"plugins: unknown plugin {name!r}{did_you_mean(name, discovered)}"
                            "; `plugtune plugins` lists the installed ones")
    active = [n for n, info in discovered.items() if info.default and n not in blocked]
    active += [n for n in dict.fromkeys(wanted) if n in discovered and n not in active]
    return active, problems


def make_manager(names, discovered):
    """A plugin manager with the hookspecs and the named plugins registered, checked: a hook
    or hook argument that ``plugtune.hookspecs`` does not define, a near miss of a hook name
    (``plugtun_step_end``) or an excluded ``PLUGTUNE_API`` is an error naming the plugin."""
    pm = Manager(GROUP)
    pm.infos = {name: discovered[name] for name in names}
    pm.add_hookspecs(hookspecs)
    for name in names:
        register(pm, discovered[name])
    pm.check_pending()  # each plugin was checked as it registered; this is the backstop
    return pm


def register(pm, info):
    """Register one plugin (a class is instantiated) and check it; :class:`PluginError` when
    it breaks the hook contract, with the plugin unregistered again."""
    check_api(info)
    problem = near_miss(info.obj)
    if problem:
        raise _invalid(info, problem)
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


def near_miss(obj):
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


def inspect_all(discovered):
    """``(plugin manager, {name: BrokenPlugin})`` with every discovered plugin registered that
    can be: one that breaks the hook contract is left out and reported, not raised."""
    pm = Manager(GROUP)
    pm.infos = dict(discovered)
    pm.add_hookspecs(hookspecs)
    broken = {}
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

    def parse_hookimpl_opts(self, plugin, name):
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("plugtune_") and inspect.isroutine(
                getattr(plugin, name, None)):
            opts = {"wrapper": False, "hookwrapper": False, "optionalhook": False,
                    "tryfirst": False, "trylast": False, "specname": None}
        return opts


def _invalid(info, problem):
    return PluginError(f"plugin {info.name!r} (distribution {info.dist} {info.version}): "
                       f"{problem}; hook names and arguments must match plugtune.hookspecs "
                       "(see docs/hooks.md)")


class PluginFault(PluginError):
    """A plugin's hook raised; the message names the plugin, its hook and, once training has
    begun, the step. ``plugin`` and ``hook`` name them."""

    def __init__(self, message, plugin=None, hook=None):
        super().__init__(message)
        self.plugin, self.hook = plugin, hook


def blame(pm, exc, step=None):
    """A :class:`PluginFault` naming the plugin whose hook implementation ``exc`` was raised
    in (the innermost one on the traceback), or None when no hook implementation is on it.
    ``step``: the optimizer step being taken or evaluated, or None before training (the
    recipe, data, model and optimizer phases), which the message then leaves out.
    Set ``PLUGTUNE_TRACEBACK=1`` (or pass ``-v``) to see the traceback too."""
    impls = {}
    for caller in pm.hook.__dict__.values():
        for impl in getattr(caller, "get_hookimpls", lambda: [])():
            code = getattr(impl.function, "__code__", None)
            if code is not None:
                impls[code] = (impl.plugin_name, caller.name)
    found, tb = None, exc.__traceback__
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
def blamed(pm, step=None):
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


def hooks_of(pm, name):
    """The hook names the registered plugin ``name`` implements."""
    callers = pm.get_hookcallers(pm.get_plugin(name)) or []
    return sorted(c.name for c in callers)


def did_you_mean(word, candidates):
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
