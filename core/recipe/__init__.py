"""Recipes: load YAML (with ``extends:`` and ``key.sub=value`` overrides), validate it against
the core's schema and every active plugin's section, and report every problem at once.

Nothing here loads a model or writes a file; ``plugtune validate`` is this package:
:mod:`.schema` (the sections), :mod:`.loading` (YAML within bounds, ``extends:``, overrides,
paths), :mod:`.validation` (each problem a :class:`~plugtune.errors.Problem`), and
:func:`load_recipe`, which puts them together.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from .. import manager
from ..data import validate_records
from ..errors import PluginError, Problem, RecipeError
from .loading import (LINE_CHARS, MAX_DEPTH, MAX_RECIPE_BYTES, MAX_VALUES, QUOTE_CHARS,
                      BoundedLoader, apply_overrides, brief, find_recipe, is_file, load_tree,
                      load_yaml, merge, shipped_recipes)
from .schema import (CORE_KEYS, DATA_PATH_KEYS, SYNONYMS, CoreRecipe, DataSection,
                     DatasetSource, ModelSection, OutputSection, Recipe, Section, TrainSection,
                     did_you_mean)
from .validation import (REMOTE_CODE_REFUSED, float16_training_problem, missing_files,
                         plugin_problems, stand_in, unknown_sections, validate)

__all__ = ["LINE_CHARS", "MAX_DEPTH", "MAX_RECIPE_BYTES", "MAX_VALUES", "QUOTE_CHARS",
           "BoundedLoader", "apply_overrides", "brief", "find_recipe", "is_file", "load_tree",
           "load_yaml", "merge", "shipped_recipes", "CORE_KEYS", "DATA_PATH_KEYS", "SYNONYMS",
           "CoreRecipe", "DataSection", "DatasetSource", "ModelSection", "OutputSection",
           "Recipe", "Section", "TrainSection", "did_you_mean", "REMOTE_CODE_REFUSED",
           "float16_training_problem", "load_recipe", "Problem"]


def load_recipe(arg: str | Path, overrides: Iterable[str] = (),
                discovered: dict[str, Any] | None = None, check_files: bool = True,
                trust_remote_code: bool = False,
                check_hardware: bool = True) -> tuple[Recipe, manager.Manager]:
    """Load, validate and return ``(recipe, plugin_manager)``; raise RecipeError listing every
    problem. Loads no model and writes nothing.

    ``check_files=False`` skips the data-file and run-directory checks, to reload the
    ``recipe.yaml`` of a finished run (whose directory exists and whose data may have moved).
    ``trust_remote_code`` is the command line's ``--trust-remote-code``: only it sets
    ``recipe.model.trust_remote_code`` (what loaders read); the recipe key alone is refused."""
    path = find_recipe(arg)
    tree = apply_overrides(load_tree(path), overrides)
    # `section: null` drops a plugin section (one inherited through extends: included)
    tree = {k: v for k, v in tree.items() if v is not None or k in CORE_KEYS}
    discovered = manager.discover() if discovered is None else discovered
    requested = tree.get("plugins") or []
    if not (isinstance(requested, list) and all(isinstance(p, str) for p in requested)):
        raise RecipeError([f"plugins: expected a list of plugin names, got {brief(requested)}"],
                          path)
    active, refused = manager.resolve_active(requested, discovered)
    pm = manager.make_manager(active, discovered)
    schemas = plugin_sections(pm)
    problems = [Problem.parse(p) for p in refused] + unknown_sections(tree, schemas, discovered)
    core = core_section(tree, trust_remote_code, problems, check_hardware)
    sections = {}
    for name, schema in schemas.items():
        sections[name], section_problems = validate(schema, tree.get(name), f"{name}.")
        problems += section_problems
    problems += missing_files(tree) if check_files else []
    if not pm.hook.plugtune_compute_loss.get_hookimpls():
        problems.append(Problem("plugins", "no active plugin computes the loss; add a task "
                                "plugin (one that implements plugtune_compute_loss; `plugtune "
                                "plugins` lists them)"))
    recipe = Recipe(core, {name: section or stand_in(schemas[name], tree.get(name))
                           for name, section in sections.items()}, active, path, tree)
    recipe.roles = pm.roles  # {role: [plugin]}: plugtune.active_roles(recipe)
    problems += start_adapter_problems(recipe, check_files)
    problems += plugins_checks(recipe, pm, problems)
    if check_files and recipe.core is not None:  # the records, as the data plugin reads them
        with manager.blamed(pm):
            problems += [Problem.parse(p) for p in
                         validate_records(pm, recipe, [str(p) for p in problems])]
    if problems:
        raise RecipeError([p.capped(LINE_CHARS) for p in problems], path)
    return recipe, pm


def plugin_sections(pm: manager.Manager) -> dict[str, type[BaseModel]]:
    """``{name: schema}`` of the sections the active plugins register."""
    schemas: dict[str, type[BaseModel]] = {}

    def register(name: str, schema: type[BaseModel]) -> None:
        if name in CORE_KEYS or name in schemas:
            raise PluginError(f"a plugin registers recipe section {name!r}, which is taken")
        schemas[name] = schema

    with manager.blamed(pm):  # a plugin's bug is named, even before training
        pm.hook.plugtune_recipe_sections(register=register)
    return schemas


def core_section(tree: dict[Any, Any], trust_remote_code: bool,
                 problems: list[Problem], check_hardware: bool = True) -> CoreRecipe | None:
    """The core's sections validated (their problems added to ``problems``), or a stand-in
    with the invalid keys dropped; ``model.trust_remote_code`` is the command line's."""
    core_tree = {k: v for k, v in tree.items() if k in CoreRecipe.model_fields}
    core, core_problems = validate(CoreRecipe, core_tree, "")
    problems += core_problems
    core = core or stand_in(CoreRecipe, core_tree)
    if not isinstance(core, CoreRecipe):
        return None
    if core.model.trust_remote_code and not trust_remote_code:
        problems.append(Problem.parse(REMOTE_CODE_REFUSED))
    core.model.trust_remote_code = trust_remote_code
    from ..attention import problems as attention_problems  # (it imports the schema)
    problems += attention_problems(core.model, core.train.packing, check_hardware)
    return core


def plugins_checks(recipe: Recipe, pm: manager.Manager, problems: list[Problem]) -> list[Problem]:
    """What the plugins' ``plugtune_check_recipe`` find (when every section could be built):
    a check that fails on a valid recipe is a plugin's bug, shown; on an invalid one it tripped
    over keys already reported, which come first."""
    if recipe.core is None or None in recipe.sections.values():
        return []
    check: Callable[..., list[list[str] | None]] = pm.hook.plugtune_check_recipe
    try:
        with manager.blamed(pm):
            results = check(recipe=recipe)
    except Exception:
        if not problems:
            raise
        return []
    return plugin_problems(results, problems)


def start_adapter_problems(recipe: Recipe, check_files: bool) -> list[Problem]:
    """``model.adapter`` needs an adapter method plugin, and (``check_files``) a directory
    holding an adapter (:func:`plugtune.models.adapter_dir`)."""
    from ..models import adapter_dir

    if recipe.core is None or recipe.core.model.adapter is None:
        return []
    if not (recipe.roles or {}).get("adapter"):
        return [Problem.parse("model.adapter: starting from an adapter needs the adapter "
                              "method it was trained with among the plugins")]
    try:
        adapter_dir(recipe.core.model.adapter) if check_files else None
    except RecipeError as exc:
        return exc.details
    return []
