"""Roles and arbitration: which plugin answers a single-answer (firstresult) hook is the core's
decision, never registration order. A plugin declares the roles it fills (``PLUGTUNE_ROLES``)
and the answers of others it replaces (``PLUGTUNE_REPLACES``); :func:`arbitrate` refuses two
active plugins in one exclusive role, or two answerers of one firstresult hook, naming both
(docs/plugins.md, "Roles")."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from .. import hookspecs
from ..errors import PluginError, did_you_mean

if TYPE_CHECKING:
    from .discovery import PluginInfo

#: The entry-point group plugins register in, and the prefix of pluggy's hook markers.
GROUP = "plugtune"

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


def check_declarations(info: PluginInfo, where: str) -> None:
    """Refuse a ``PLUGTUNE_ROLES`` that is not a set of names, or a ``PLUGTUNE_REPLACES`` that
    is not ``{plugin: hook or [hooks]}``."""
    def names(value: object) -> bool:
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


def resolve_active(requested: list[str],
                   discovered: dict[str, PluginInfo]) -> tuple[list[str], list[str]]:
    """Names of the plugins active for a recipe's ``plugins:`` list, and problems found:
    unknown names, and what :func:`arbitrate` refuses.

    Defaults come first (in discovery order), then the requested ones in recipe order;
    ``no:NAME`` removes a default.
    """
    problems: list[str] = []
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


def role_map(names: list[str], discovered: dict[str, PluginInfo]) -> dict[str, list[str]]:
    """``{role: [plugin, ...]}`` of the active plugins ``names``: a default plugin yields a
    role that a plugin the recipe asked for fills (``adamw_8bit`` takes ``optimizer`` from the
    default ``adamw``)."""
    roles: dict[str, list[str]] = {}
    for name in names:
        for role in sorted(discovered[name].roles):
            roles.setdefault(role, []).append(name)
    for role, fillers in roles.items():
        chosen = [n for n in fillers if not discovered[n].default]
        roles[role] = chosen or fillers
    return roles


def firstresult_hooks() -> list[str]:
    """The names of the single-answer hooks."""
    return [n for n, f in vars(hookspecs).items() if n.startswith("plugtune_")
            and getattr(f, f"{GROUP}_spec", {}).get("firstresult")]


def answers(obj: object) -> dict[str, str]:
    """``{hook: attribute}`` of the firstresult hooks ``obj`` answers (wrappers only watch)."""
    out: dict[str, str] = {}
    for attr in dir(obj):
        fn = getattr(obj, attr, None) if attr.startswith("plugtune_") else None
        if not inspect.isroutine(fn):
            continue
        opts = getattr(fn, f"{GROUP}_impl", None) or {}
        if not (opts.get("wrapper") or opts.get("hookwrapper")):
            out[opts.get("specname") or attr] = attr
    return out


def arbitrate(names: list[str], discovered: dict[str, PluginInfo]
              ) -> tuple[dict[str, set[str]], list[str]]:
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


def role_problems(roles: dict[str, list[str]]) -> tuple[list[str], list[set[str]]]:
    """``(problems, clashes)``: a line for each exclusive role filled twice, and the sets of
    plugins named (a pair is named once, by its first shared role)."""
    problems: list[str] = []
    clashes: list[set[str]] = []
    for role, what in EXCLUSIVE_ROLES.items():
        fillers = roles.get(role, [])
        if len(fillers) > 1 and not any(set(fillers) <= c for c in clashes):
            clashes.append(set(fillers))
            problems.append(f"plugins: {_both(fillers)} fill the role `{role}` (the plugin that "
                            f"{what}), which one plugin fills in a run: keep one of them"
                            f"{ROLE_HINTS.get(role, '')}")
    return problems, clashes


def answer_problems(names: list[str], discovered: dict[str, PluginInfo],
                    clashes: list[set[str]]) -> tuple[dict[str, set[str]], list[str]]:
    """``(excluded, problems)`` of the firstresult hooks: per hook, a replaced answer and a
    default's beside a named plugin's are excluded; two answers left are a problem, unless
    their plugins already clash by role."""
    excluded: dict[str, set[str]] = {}
    problems: list[str] = []
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


def _both(names: list[str]) -> str:
    """```a` and `b` both`` or ```a`, `b` and `c` all``."""
    quoted = [f"`{n}`" for n in names]
    return (", ".join(quoted[:-1]) + " and " + quoted[-1]
            + (" both" if len(names) == 2 else " all"))


def active_roles(recipe: Any) -> dict[str, list[str]]:
    """``{role: [plugin, ...]}`` of the plugins active in ``recipe`` (validated by
    ``plugtune``): ask ``"adapter" in plugtune.active_roles(recipe)`` rather than for a plugin
    by name. A default plugin that yielded a role to a plugin the recipe named is not listed
    in it."""
    roles: dict[str, list[str]] | None = getattr(recipe, "roles", None)
    if roles is None:  # a Recipe built by hand: the installed plugins decide
        from plugtune import manager  # at call time: tests replace manager.discover

        found = manager.discover()
        roles = role_map([n for n in recipe.plugins if n in found], found)
    return roles


