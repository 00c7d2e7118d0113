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

By concern: :mod:`.discovery` (entry points, API ranges), :mod:`.roles` (roles and
arbitration), :mod:`.registry` (the plugin manager and its checks), :mod:`.blame` (a plugin's
exception named).
"""
from ..errors import did_you_mean
from .blame import PluginFault, blame, blamed
from .discovery import (SKIP_ENV, BrokenPlugin, Discovered, PluginInfo, check_api, discover,
                        duplicate_message, load)
from .registry import Manager, hooks_of, inspect_all, make_manager, near_miss, register
from .roles import (EXCLUSIVE_ROLES, GROUP, IMPLIED_ROLES, ROLE_HINTS, active_roles,
                    answer_problems, answers, arbitrate, check_declarations, firstresult_hooks,
                    resolve_active, role_map, role_problems)

__all__ = ["did_you_mean", "PluginFault", "blame", "blamed", "SKIP_ENV", "BrokenPlugin",
           "Discovered", "PluginInfo", "check_api", "discover", "duplicate_message", "load",
           "Manager", "hooks_of", "inspect_all", "make_manager", "near_miss", "register",
           "EXCLUSIVE_ROLES", "GROUP", "IMPLIED_ROLES", "ROLE_HINTS", "active_roles",
           "answer_problems", "answers", "arbitrate", "check_declarations",
           "firstresult_hooks", "resolve_active", "role_map", "role_problems"]
