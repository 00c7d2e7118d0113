"""Reading a recipe: YAML within bounds (size, depth, aliases), ``extends:`` chains merged,
``key.sub=value`` overrides applied, relative paths made absolute. Every problem found here
stops the reading at once (the file cannot be read further); validation comes after."""
from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from ..errors import Problem, RecipeError, did_you_mean
from .schema import DATA_PATH_KEYS


def shipped_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes that ship with plugtune."""
    return {p.name[:-len(".yaml")]: Path(str(p)) for p in files("plugtune.recipes").iterdir()
            if p.name.endswith(".yaml")}


def find_recipe(arg: str | Path) -> Path:
    """The recipe file ``arg`` names: a path, or the name of a shipped recipe."""
    path = Path(arg)
    if is_file(path):
        return path
    shipped = shipped_recipes()
    name = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if name in shipped and path.parent == Path("."):
        return shipped[name]
    raise RecipeError([f"recipe file not found: {arg}{did_you_mean(name, shipped)}"
                       "; give a path, or a shipped recipe name from `plugtune recipes`"])


#: Bounds on a recipe, which is a page of settings: a hostile or broken file (a YAML alias
#: "bomb", a 900-deep nesting, a data file given as a recipe) is refused in one line instead of
#: taking minutes and gigabytes, or overflowing PyYAML's recursion.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_VALUES = 100_000
#: The longest a value or key is quoted in a message, and the longest a problem line gets.
QUOTE_CHARS = 200
LINE_CHARS = 1000


class _Bound(yaml.MarkedYAMLError):
    """A recipe over one of the bounds (at ``problem_mark`` where known)."""


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader within the bounds: the nesting depth is checked while composing,
    and the values the document holds once aliases are expanded are counted before anything
    is built (an alias is one node here, but validation and messages would expand it copy by
    copy: 9 levels of 9 aliases are 387 million values)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Bound(None, None, f"nested more than {MAX_DEPTH} levels deep; a recipe's "
                             "sections are a few levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded(node, {}) > MAX_VALUES:
            raise _Bound(None, None, f"its aliases (*NAME) expand to more than {MAX_VALUES:,} "
                         "values (or refer to themselves); a recipe holds settings, not data",
                         None)
        return node


def _expanded(node: yaml.Node, memo: dict[int, int | None]) -> int:
    """How many values ``node`` stands for with every alias expanded (a cycle: unbounded)."""
    if id(node) in memo:
        counted = memo[id(node)]
        return counted if counted is not None else MAX_VALUES + 1
    memo[id(node)] = None  # being counted: meeting it again is a cycle
    children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total += _expanded(child, memo)
        if total > MAX_VALUES:
            break
    memo[id(node)] = total
    return total


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` within the recipe bounds (:class:`BoundedLoader`)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def brief(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with an ellipsis: a message quotes what is
    at fault, never a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _read_text(path: Path) -> str:
    """A recipe file's text: refused in one line when it is over the size bound or not
    UTF-8 (naming the line and column of the first bad byte)."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError([Problem(None, f"{size:,} bytes; a recipe is at most "
                                       f"{MAX_RECIPE_BYTES >> 20} MiB of settings (data "
                                       "belongs in data files)", str(path))])
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError([Problem(None, f"cannot read it ({exc.strerror})", str(path))]) \
            from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError([Problem(None, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                                   f"column {column}); save the file as UTF-8",
                                   f"{path}:{line}")]) from None


def _read_yaml(path: Path) -> dict[Any, Any]:
    try:
        data = load_yaml(_read_text(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        what = "" if isinstance(exc, _Bound) else "not valid YAML: "
        raise RecipeError([Problem(None, f"{what}{getattr(exc, 'problem', exc)}",
                                   where).capped(LINE_CHARS)]) from None
    if not isinstance(data, dict):
        raise RecipeError([Problem(None, "a recipe is a mapping of keys (model:, data:, ...), "
                                   f"got {type(data).__name__}", str(path))])
    return data


def _absolute_paths(tree: dict[Any, Any], base: Path) -> None:
    """Make the recipe's relative file paths absolute: data files, and a model given as
    ``./dir`` or ``../dir``."""
    model = tree.get("model")
    name = model.get("name") if isinstance(model, dict) else model
    if isinstance(name, str) and name.startswith(("./", "../")):
        name = str((base / name).resolve())
        tree["model"] = {**model, "name": name} if isinstance(model, dict) else name
    adapter = model.get("adapter") if isinstance(model, dict) else None
    if isinstance(adapter, str) and not Path(adapter).is_absolute():
        tree["model"] = {**tree["model"], "adapter": str((base / adapter).resolve())}
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    template = data.get("chat_template")
    if isinstance(template, str) and template.endswith(".jinja") and "{" not in template:
        data["chat_template"] = str(base / template)  # a path, not a name or Jinja text
    _weighted_sources(data)
    for key in DATA_PATH_KEYS:
        value = data.get(key)
        if isinstance(value, (str, list, dict)):
            items = value if isinstance(value, list) else [value]
            paths = [_absolute_source(v, base) for v in items]
            data[key] = paths if isinstance(value, list) else paths[0]


def _weighted_sources(data: dict[Any, Any]) -> None:
    """``data.train`` entries written ``{path: FILE, weight: W}`` (or ``{dataset: ..., weight:
    W}``) as the source alone, their weights moved to ``data.weights`` (one per entry, 1 where
    an entry has none), so that every later reader of ``data.train`` sees paths and datasets."""
    train = data.get("train")
    entries = train if isinstance(train, list) else [train]
    if not any(isinstance(s, dict) and ("weight" in s or "path" in s) for s in entries):
        return
    weights, sources = [], []
    for s in entries:
        weight = s.get("weight", 1.0) if isinstance(s, dict) else 1.0
        if isinstance(s, dict):
            s = {k: v for k, v in s.items() if k != "weight"}
            s = s["path"] if set(s) == {"path"} else s
        weights.append(weight)
        sources.append(s)
    data["train"] = sources
    if any(isinstance(s, dict) and "weight" in s for s in entries):
        if "weights" in data:
            raise RecipeError([Problem("data.weights", "given twice: as data.weights and as "
                                       "weight: in data.train's entries; keep one")])
        data["weights"] = weights


def _absolute_source(source: object, base: Path) -> object:
    """A data source with its path made absolute: a file or directory name, or the
    ``dataset:`` of a mapping when it is written as a path (``./saved``, ``../saved``)."""
    if isinstance(source, str) and not Path(source).is_absolute():
        return str(base / source)
    if isinstance(source, dict) and isinstance(source.get("dataset"), str) and \
            source["dataset"].startswith(("./", "../")):
        return {**source, "dataset": str((base / source["dataset"]).resolve())}
    return source


def _model_section(tree: dict[Any, Any]) -> dict[Any, Any]:
    """``model: NAME`` as ``model: {name: NAME}``, so that ``model.dtype=...`` overrides and
    an ``extends:`` child's ``model: {dtype: ...}`` apply to it."""
    if isinstance(tree.get("model"), str):
        tree["model"] = {"name": tree["model"]}
    return tree


def merge(base: dict[Any, Any], over: dict[Any, Any]) -> dict[Any, Any]:
    """Deep-merge mappings; lists and scalars in ``over`` replace those in ``base``."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[Any, Any]:
    """Read a recipe file and the files it ``extends:``, merged; data paths made absolute."""
    path = Path(path).resolve()
    if path in _chain:
        raise RecipeError([Problem("extends", "cycle " + " -> ".join(map(str, _chain + (path,))),
                                   str(path))])
    tree = _model_section(_read_yaml(path))
    _absolute_paths(tree, path.parent)
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise RecipeError([Problem("extends", f"expects one recipe file name, got "
                                   f"{brief(parent)}", str(path))])
    parent_path = path.parent / parent
    if not is_file(parent_path):
        try:
            parent_path = find_recipe(parent)
        except RecipeError as exc:
            raise RecipeError([Problem("extends", f"{parent}: no such recipe next to it "
                                       f"({parent_path}) nor a shipped one; fix the name or "
                                       "remove extends:", str(path))]) from exc
    return merge(load_tree(parent_path, _chain + (path,)), tree)


def apply_overrides(tree: dict[Any, Any], overrides: Iterable[str]) -> dict[Any, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML; paths relative to the cwd)."""
    tree = _model_section(dict(tree))
    over: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError([Problem(None, f"override {brief(item)}: expected KEY=VALUE, "
                                       "e.g. train.lr=1e-4")])
        try:
            value = load_yaml(text)
        except yaml.YAMLError as exc:
            raise RecipeError([Problem(None, f"override {brief(item)}: value is not valid "
                                       f"YAML: {exc}").capped(LINE_CHARS)]) from None
        *parents, leaf = key.split(".")
        node, existing = over, tree
        for i, part in enumerate(parents):
            existing = existing.get(part, {}) if isinstance(existing, dict) else None
            if existing is not None and not isinstance(existing, dict):
                raise RecipeError([Problem(None, f"override {brief(item)}: "
                                           f"{'.'.join(parents[:i + 1])} is not a section, so "
                                           "it has no sub-keys").capped(LINE_CHARS)])
            node = node.setdefault(part, {})
        node[leaf] = value
    _absolute_paths(over, Path.cwd())
    return merge(tree, over)


def is_file(path: str | os.PathLike[str]) -> bool:
    """``Path.is_file`` that says False, not raises, for a name with a NUL byte or too long."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _is_dir(path: str | os.PathLike[str]) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


