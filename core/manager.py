"""Find plugins through the ``plugtune`` entry-point group, arbitrate their roles and build
the plugin manager.

Built-in plugins are found exactly as a third party's are. A plugin module (or class) that sets
``PLUGTUNE_DEFAULT = True`` is active in every run unless a recipe blocks it with
``no:NAME`` in ``plugins:``; any other plugin is active when a recipe names it. A plugin that
is a class is instantiated afresh for every run, so it can keep per-run state on ``self``.

The core, not the plugins, decides who answers a single-answer (firstresult) hook: a plugin
declares the roles it fills (``PLUGTUNE_ROLES``) and the answers of others it replaces
(``PLUGTUNE_REPLACES``); :func:`arbitrate` refuses two active plugins in one exclusive role, or
two answerers of one firstresult hook, naming both (docs/plugins.md, "Roles").
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


#: The exclusive roles, in the order conflicts are reported, with what the one plugin filling
#: each does. A role not listed here is descriptive: plugins may share it, and others may ask
#: for it (``plugtune.active_roles(recipe)``).
EXCLUSIVE_ROLES = {
    "task": "turns records into examples and computes the loss",
    "adapter": "wraps the model with trainable adapters",
    "quantizer": "loads the base model quantized",
    "trainable": "decides which of the base model's weights train",
    "optimizer": "builds the optimizer",
    "scheduler": "builds the learning-rate schedule",
    "data": "reads the data files",
    "loader": "loads the model and its tokenizer",
}
ROLE_HINTS = {"trainable": " (an adapter method already freezes the base: choose where its "
                          "adapters go in its section, and what else trains in full with its "
                          "modules_to_save)"}
#: Roles a role brings with it: an adapter decides what trains (its adapters, on a frozen base).
IMPLIED_ROLES = {"adapter": {"trainable"}}


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
    def default(self):
        return bool(getattr(self.obj, "PLUGTUNE_DEFAULT", False))

    @property
    def roles(self):
        """The roles the plugin declares (``PLUGTUNE_ROLES``) and those they imply."""
        declared = getattr(self.obj, "PLUGTUNE_ROLES", ())
        roles = {declared} if isinstance(declared, str) else set(declared)
        return roles.union(*(IMPLIED_ROLES.get(r, ()) for r in roles))

    @property
    def replaces(self):
        """``{plugin: {hook, ...}}`` of ``PLUGTUNE_REPLACES`` (hook names completed to
        ``plugtune_…``; ``"*"`` stands for every hook)."""
        declared = getattr(self.obj, "PLUGTUNE_REPLACES", None) or {}
        return {name: {h if h == "*" or h.startswith("plugtune_") else f"plugtune_{h}"
                       for h in ([hooks] if isinstance(hooks, str) else hooks)}
                for name, hooks in declared.items()}

    @property
    def api(self):
        """The declared ``PLUGTUNE_API`` range, or None."""
        wanted = getattr(self.obj, "PLUGTUNE_API", None)
        return None if wanted is None else str(wanted)

    @property
    def doc(self):
        """The first sentence of the docstring of what the entry point names: the module's,
        or the class's (the module's where the class has none)."""
        text = self.obj.__doc__ if isinstance(self.obj.__doc__, str) else ""
        if not text.strip() and inspect.isclass(self.obj):
            text = getattr(inspect.getmodule(self.obj), "__doc__", None) or ""
        paragraph = inspect.cleandoc(text).split("\n\n")[0].replace("\n", " ")
        return paragraph.split(". ")[0].rstrip(".")


class Discovered(dict):
    """``{name: PluginInfo}`` of the usable plugins; ``disabled`` holds ``{name: message}`` of the
    names that two distributions register (neither is loaded: which one a recipe meant is
    unknowable)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.disabled = {}


def discover(broken=None):
    """Import every plugin of the entry-point group; return ``{name: PluginInfo}``
    (a :class:`Discovered`).

    A plugin that fails to import, or whose ``PLUGTUNE_API`` range excludes this plugtune's
    :data:`plugtune.API_VERSION`, is a :class:`PluginError` naming it, its distribution and
    how to skip it; with ``broken`` (a dict) such plugins are put there (``name -> error``)
    instead, and discovery goes on (``plugtune plugins`` lists them all). A name two
    distributions register disables those two only (``Discovered.disabled``, and ``broken``)."""
    skip = {s.strip() for s in os.environ.get(SKIP_ENV, "").split(",") if s.strip()}
    by_name = {}
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
        (dist, ver), ep = next(iter(dists.items()))
        try:
            info = load(ep, dist, ver)
        except PluginError as exc:
            if broken is None:
                raise
            broken[name] = BrokenPlugin(name, dist, ver, str(exc))
            continue
        found[name] = info
    return found


def duplicate_message(name, dists):
    both = " and ".join(f"{d} {v}" for d, v in dists)
    return (f"plugin {name!r} is registered by two distributions, {both}, so neither is "
            f"loaded\n  hint: uninstall one of {' and '.join(d for d, _ in dists)}, or set "
            f"{SKIP_ENV}={name} to run without both")


def load(ep, dist, ver):
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


def check_api(info):
    """Refuse a plugin whose ``PLUGTUNE_API`` (a PEP 440 specifier such as ``">=1.0,<2"``, on
    its module or class) excludes :data:`plugtune.API_VERSION`. A plugin that declares none is
    taken to work with every version."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    from . import API_VERSION

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


def check_declarations(info, where):
    """Refuse a ``PLUGTUNE_ROLES`` that is not a set of names, or a ``PLUGTUNE_REPLACES`` that
    is not ``{plugin: hook or [hooks]}``."""
    def names(value):
        return isinstance(value, str) or (isinstance(value, (set, frozenset, list, tuple))
                                          and all(isinstance(v, str) for v in value))

    roles = getattr(info.obj, "PLUGTUNE_ROLES", ())
    replaces = getattr(info.obj, "PLUGTUNE_REPLACES", None) or {}
    if not names(roles):
        raise PluginError(f"{where}: PLUGTUNE_ROLES = {roles!r} is not a set of role names; "
                          "write one such as {\"adapter\"} (docs/plugins.md, Roles)")
    if not (isinstance(replaces, dict) and all(isinstance(k, str) and names(v)
                                               for k, v in replaces.items())):
        raise PluginError(f"{where}: PLUGTUNE_REPLACES = {replaces!r} is not {{plugin: hook}}; "
                          "write one such as {\"PLUGIN\": \"plugtune_compute_loss\"} "
                          "(docs/plugins.md, Roles)")


def _version():
    from . import __version__

    return __version__


def resolve_active(requested, discovered):
    """Names of the plugins active for a recipe's ``plugins:`` list, and problems found:
    unknown names, and what :func:`arbitrate` refuses.

    Defaults come first (in discovery order), then the requested ones in recipe order;
    ``no:NAME`` removes a default.
    """
    problems = []
    blocked = {r[3:] for r in requested if r.startswith("no:")}
    wanted = [r for r in requested if not r.startswith("no:")]
    disabled = getattr(discovered, "disabled", {})
    for name in sorted(blocked | set(wanted)):
        if name in disabled:
            problems.append(f"plugins: {disabled[name].splitlines()[0]}; uninstall one of them")
        elif name not in discovered:
            problems.append(f"plugins: unknown plugin {name!r}{did_you_mean(name, discovered)}"
                            "; `plugtune plugins` lists the installed ones")
    active = [n for n, info in discovered.items() if info.default and n not in blocked]
    active += [n for n in dict.fromkeys(wanted) if n in discovered and n not in active]
    return active, problems + arbitrate(active, discovered)[1]


def role_map(names, discovered):
    """``{role: [plugin, ...]}`` of the active plugins ``names``: a default plugin yields a
    role that a plugin the recipe asked for fills (``adamw_8bit`` takes ``optimizer`` from the
    default ``adamw``)."""
    roles = {}
    for name in names:
        for role in sorted(discovered[name].roles):
            roles.setdefault(role, []).append(name)
    for role, fillers in roles.items():
        chosen = [n for n in fillers if not discovered[n].default]
        roles[role] = chosen or fillers
    return roles


def firstresult_hooks():
    return [n for n, f in vars(hookspecs).items() if n.startswith("plugtune_")
            and getattr(f, f"{GROUP}_spec", {}).get("firstresult")]


def answers(obj):
    """``{hook: attribute}`` of the firstresult hooks ``obj`` answers (wrappers only watch)."""
    out = {}
    for attr in dir(obj):
        fn = getattr(obj, attr, None) if attr.startswith("plugtune_") else None
        if not inspect.isroutine(fn):
            continue
        opts = getattr(fn, f"{GROUP}_impl", None) or {}
        if not (opts.get("wrapper") or opts.get("hookwrapper")):
            out[opts.get("specname") or attr] = attr
    return out


def arbitrate(names, discovered):
    """``(excluded, problems)`` for the active plugins ``names``.

    ``problems``: two plugins filling one exclusive role (:data:`EXCLUSIVE_ROLES`), or two
    answering one firstresult hook, one line each naming both. ``excluded``: ``{plugin:
    {hook attribute, ...}}`` of the answers not registered: the replaced ones
    (``PLUGTUNE_REPLACES``), and a default plugin's where a plugin the recipe asked for answers
    too. So who answers never depends on registration order."""
    for name in names:
        info = discovered[name]
        check_declarations(info, f"plugin {name!r} (distribution {info.dist} {info.version})")
    problems, clashes = role_problems(role_map(names, discovered))
    excluded, more = answer_problems(names, discovered, clashes)
    return excluded, problems + more


def role_problems(roles):
    """``(problems, clashes)``: a line for each exclusive role filled twice, and the sets of
    plugins named (a pair is named once, by its first shared role)."""
    problems, clashes = [], []
    for role, what in EXCLUSIVE_ROLES.items():
        fillers = roles.get(role, [])
        if len(fillers) > 1 and not any(set(fillers) <= c for c in clashes):
            clashes.append(set(fillers))
            problems.append(f"plugins: {_both(fillers)} fill the role `{role}` (the plugin that "
                            f"{what}), which one plugin fills in a run: keep one of them"
                            f"{ROLE_HINTS.get(role, '')}")
    return problems, clashes


def answer_problems(names, discovered, clashes):
    """``(excluded, problems)`` of the firstresult hooks: per hook, a replaced answer and a
    default's beside a named plugin's are excluded; two answers left are a problem, unless
    their plugins already clash by role."""
    excluded, problems = {}, []
    replaced = {(victim, hook) for n in names for victim, hooks in discovered[n].replaces.items()
                for hook in hooks}
    for hook in firstresult_hooks():
        answerers = {n: a[hook] for n in names if hook in (a := answers(discovered[n].obj))}
        keep = [n for n in answerers if (n, hook) not in replaced and (n, "*") not in replaced]
        keep = [n for n in keep if discovered[n].overrides] or keep
        keep = [n for n in keep if not discovered[n].default] or keep  # defaults yield
        for name in answerers:
            if name not in keep:
                excluded.setdefault(name, set()).add(answerers[name])
        if (len(keep) > 1 and not all(discovered[n].overrides for n in keep)
                and not any(len(c & set(keep)) > 1 for c in clashes)):
            clashes.append(set(keep))
            problems.append(f"plugins: {_both(keep)} answer {hook}, which one plugin answers: "
                            f"keep one, or declare in `{keep[-1]}` that it replaces the other's "
                            f"answer: PLUGTUNE_REPLACES = {{\"{keep[0]}\": \"{hook}\"}} "
                            "(docs/plugins.md, Roles)")
    return excluded, problems


def _both(names):
    """```a` and `b` both`` or ```a`, `b` and `c` all``."""
    quoted = [f"`{n}`" for n in names]
    return (", ".join(quoted[:-1]) + " and " + quoted[-1]
            + (" both" if len(names) == 2 else " all"))


def make_manager(names, discovered):
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


def active_roles(recipe):
    """``{role: [plugin, ...]}`` of the plugins active in ``recipe`` (validated by
    ``plugtune``): ask ``"adapter" in plugtune.active_roles(recipe)`` rather than for a plugin
    by name. A default plugin that yielded a role to a plugin the recipe named is not listed
    in it."""
    roles = getattr(recipe, "roles", None)
    if roles is None:  # a Recipe built by hand: the installed plugins decide
        found = discover()
        roles = role_map([n for n in recipe.plugins if n in found], found)
    return roles


def register(pm, info):
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

    excluded = {}  # {plugin name: {hook attribute}} not to register (see arbitrate)
    registering = None

    def parse_hookimpl_opts(self, plugin, name):
        if name in self.excluded.get(self.registering, ()):
            return None
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
