"""Validating a recipe tree: unknown keys (with "did you mean"), wrong types and values,
inactive plugins' sections, missing files and a taken run directory, each a structured
:class:`~plugtune.errors.Problem`, all found at once (:func:`plugtune.recipe.load_recipe`
puts them together with the plugins' own checks)."""
from __future__ import annotations

import copy
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .. import rundir
from ..errors import Problem
from .loading import QUOTE_CHARS, _is_dir, brief, is_file
from .schema import (CORE_KEYS, DATA_PATH_KEYS, SYNONYMS, CoreRecipe, OutputSection,
                     _is_component, did_you_mean)

#: The line that refuses ``model.trust_remote_code: true`` without ``--trust-remote-code``.
REMOTE_CODE_REFUSED = (
    "model.trust_remote_code: true would run Python code that comes with the model; plugtune "
    "runs it only when the command line says so: add --trust-remote-code to the command (after "
    "reading the model's code), or drop the key from the recipe")


def float16_training_problem(what: str) -> str:
    """The problem with training float16 weights (``what`` trains them), for plugins that
    train base weights to report from ``plugtune_check_recipe``."""
    return (f"model.dtype: float16 weights cannot train ({what}): AdamW's updates underflow in "
            "float16 and write NaN; use model.dtype: bfloat16 or float32, with "
            "train.mixed_precision: fp16 for float16 compute")


def unknown_keys(data: dict[Any, Any], schema: type[BaseModel], prefix: str) -> list[Problem]:
    """Problems for keys ``schema`` does not know, with a "did you mean" where one is close."""
    problems = []
    fields = schema.model_fields
    for key, value in data.items():
        if key not in fields:
            problems.append(Problem(f"{prefix}{_key(key)}",
                                    f"unknown key{did_you_mean(key, fields)}"))
            continue
        sub = fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            problems += unknown_keys(value, sub, f"{prefix}{key}.")
    return problems


def _key(key: object) -> str:
    """A key as a message names it: itself, or cut short (a key can be any YAML value)."""
    return key if isinstance(key, str) and len(key) <= QUOTE_CHARS else brief(key)


def unknown_sections(tree: dict[Any, Any], sections: Collection[str],
                     installed: Collection[str]) -> list[Problem]:
    """Problems for top-level keys that are neither the core's nor an active plugin's section
    (``sections``): an installed plugin's section says to activate it."""
    problems = []
    for key in tree:
        if key in CORE_KEYS or key in sections:
            continue
        if key in installed:
            problems.append(Problem(key, f"this section configures plugin {key!r}, which is not "
                                    f"active; add {key} to plugins:, or drop the section ({key}: "
                                    "null where it is inherited)"))
        else:
            problems.append(Problem(_key(key), "unknown key"
                                    f"{_top_level_hint(key, CORE_KEYS | set(sections))}"))
    return problems


def _top_level_hint(key: object, names: Collection[str]) -> str:
    """A "did you mean" for an unknown top-level key: a close name, or the core section key
    it belongs in (``lr`` -> ``train.lr``, ``output_dir`` -> ``output.dir``)."""
    hint = did_you_mean(key, names)
    if hint or not isinstance(key, str):
        return hint
    if SYNONYMS.get(key) == "name" and "model" in key:
        return " (did you mean 'model'?)"
    wanted = SYNONYMS.get(key, key)
    for section in ("train", "data", "output", "model"):
        schema = CoreRecipe.model_fields[section].annotation
        if isinstance(schema, type) and issubclass(schema, BaseModel) and \
                wanted in schema.model_fields:
            return f" (did you mean '{section}.{wanted}'?)"
    return ""


def validate(schema: type[BaseModel], data: object,
             prefix: str) -> tuple[BaseModel | None, list[Problem]]:
    """``(instance or None, problems)`` for one section."""
    if data is not None and not isinstance(data, dict):
        return None, [Problem(prefix.rstrip("."), f"expected a mapping of keys, got {brief(data)}")]
    data = data or {}
    problems = unknown_keys(data, schema, prefix)
    try:
        return schema.model_validate(data), problems
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == "extra_forbidden":
                continue
            got = f" (got {brief(err['input'])})" if err["type"] != "missing" else ""
            hint = "; add it to the recipe" if err["type"] == "missing" else ""
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(Problem(prefix + ".".join(str(p) for p in err["loc"]),
                                    f"{msg}{got}{hint}"))
        return None, problems


def stand_in(schema: type[BaseModel], data: object) -> BaseModel | None:
    """``schema`` validated from ``data`` with every invalid key dropped (its default in its
    place), or None when a required key is missing: lets the plugins' combination checks run,
    and report, on a recipe whose other keys have problems already listed."""
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    while True:
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            dropped = False
            for err in exc.errors():
                if err["type"] == "missing":
                    return None
                node, loc = data, list(err["loc"])
                while len(loc) > 1 and isinstance(node.get(loc[0]), dict):
                    node = node[loc.pop(0)]
                if loc and loc[0] in node:  # a union's errors name one key several times
                    del node[loc[0]]
                    dropped = True
            if not dropped:
                return None


def missing_files(tree: dict[Any, Any]) -> list[Problem]:
    """Data files that do not exist and a run directory that does (read from the raw tree, so
    that they are reported even when other keys are invalid)."""
    problems = []
    data = tree.get("data")
    data = data if isinstance(data, dict) else {}
    for key in DATA_PATH_KEYS:
        for file in _listed(data.get(key) or []):
            if isinstance(file, str) and not is_file(file) and not _is_dir(file):
                problems.append(Problem(f"data.{key}", f"file not found: {file}; paths in a "
                                        "recipe are relative to the recipe file, on the command "
                                        "line to the cwd"))
    output = tree.get("output")
    output = output if isinstance(output, dict) else {}
    name, parent = output.get("name"), output.get("dir", OutputSection().dir)
    if not rundir.is_main_process() or not isinstance(parent, str):
        return problems
    problem = rundir.unusable_parent(parent)
    if problem:
        problems.append(Problem("output.dir", problem))
    elif isinstance(name, str) and _is_component(name) and os.path.lexists(Path(parent) / name):
        problems.append(Problem("output.name", f"{Path(parent) / name} already exists; pick "
                                "another name (output.name=...) or delete it"))
    return problems


def _listed(files: object) -> Iterable[object]:
    """A data key's sources as a list: one, a list, or none (any other value)."""
    return [files] if isinstance(files, str) else files if isinstance(files, list) else []


def plugin_problems(results: Iterable[list[str] | None],
                    found: list[Problem]) -> list[Problem]:
    """The plugins' ``plugtune_check_recipe`` lines as problems, less those already ``found``
    and those about a section that has problems already: it was checked with its invalid keys
    dropped, and what the checks say of it again would mislead."""
    seen = {str(p) for p in found}
    faulty = {p.section for p in found} - {"plugins"}
    out: list[Problem] = []
    for result in results:
        new = [Problem.parse(line) for line in result or []]
        new = [p for p in new if str(p) not in seen and p.section not in faulty]
        seen.update(str(p) for p in new)
        out += new
    return out
