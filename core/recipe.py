"""Recipes: load YAML (with ``extends:`` and ``key.sub=value`` overrides), validate it against
the core's schema and every active plugin's section, and report every problem at once.

Nothing here loads a model or writes a file; ``plugtune validate`` is this module.
"""
import copy
import os
from importlib.resources import files
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, field_validator)

from . import manager, rundir
from .data import validate_records
from .errors import PluginError, RecipeError


class Section(BaseModel):
    """Base for recipe sections: unknown keys are errors. Plugins may subclass it."""

    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    """Which model to fine-tune. A string ``model: NAME`` is short for ``model: {name: NAME}``."""

    name: str = Field(description="hub id, local save_pretrained directory, path to a .gguf "
                      "file, or pkg:PACKAGE/FILE for a file inside an installed Python package")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer: str | None = Field(None, description="tokenizer source when not the model's")
    trust_remote_code: bool = False


class DatasetSource(Section):
    """A split of a ``datasets`` dataset: ``{dataset: NAME, config: ..., split: train}``."""

    dataset: str = Field(description="hub dataset id, or a directory written by save_to_disk")
    config: str | None = Field(None, description="the dataset's configuration (subset) name")
    split: str | None = Field(None, description="the split to read; default the key's own "
                              "(train, validation or test)")
    revision: str | None = Field(None, description="a hub dataset's git revision")


class DataSection(Section):
    """Where the data is: local files (JSONL, JSON, CSV, text, Parquet, Arrow), directories
    written by ``datasets``' ``save_to_disk``, or ``{dataset: ...}`` splits of hub datasets."""

    train: list[str | DatasetSource] = Field(description="one source or a list; file paths are "
                                             "relative to the recipe's folder")
    validation: list[str | DatasetSource] | None = Field(None, description="held-out source(s); "
                                                         "else a split")
    test: list[str | DatasetSource] | None = Field(
        None, description="test source(s), evaluated once at the end with the final (or early "
        "stopping's best) model")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share without validation")
    columns: dict[str, str] = Field({}, description="record field -> the column it is read from "
                                    "({text: body}), for every source")

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        items = [v] if isinstance(v, (str, dict)) else v
        return [_dataset_source(i) if isinstance(i, dict) else i for i in items] \
            if isinstance(items, list) else v


def _dataset_source(entry):
    """A ``{dataset: ...}`` entry as a :class:`DatasetSource`, its problems said in one line
    (rather than one per member of the ``str | DatasetSource`` union)."""
    fields = DatasetSource.model_fields
    for key in entry:
        if key not in fields:
            raise ValueError(f"unknown key {key!r} in a dataset entry{did_you_mean(key, fields)}"
                             f"; it takes {', '.join(fields)}")
    try:
        return DatasetSource.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"dataset entry {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class TrainSection(Section):
    """The optimization loop."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = Field(0, ge=0, lt=2 ** 32, description="0 to 2**32 - 1 (numpy's range)")
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = Field(None, description="optimizer steps; overrides epochs")
    batch_size: PositiveInt = Field(4, description="micro-batch size per device")
    eval_batch_size: PositiveInt | None = None
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step")
    group_by_length: bool = Field(False, description="micro-batches of examples of similar "
                                  "length (less padding), in shuffled order")
    packing: bool = Field(False, description="padding-free batches (language modelling); each "
                          "micro-batch's examples packed into rows of at most max_length "
                          "tokens, attention kept inside each example")
    lr: PositiveFloat = 2e-5
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: PositiveFloat | None = 1.0
    eval_every: PositiveInt | Literal["end"] | None = Field(
        "end", description="evaluate before training, every N steps and after the last; "
        "end (the default): before and after only; null: never")
    log_every: PositiveInt = 1
    max_length: PositiveInt = Field(512, description="tokens; longer sequences are truncated")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    save_every: PositiveInt | None = Field(None, description="write a checkpoint every N "
                                           "optimizer steps (RUN/checkpoints/step-N)")
    keep_checkpoints: PositiveInt | None = Field(2, description="newest checkpoints kept; "
                                                 "null keeps all")
    max_bad_steps: PositiveInt = Field(3, description="stop after this many optimizer steps "
                                       "in a row with a non-finite loss or gradient (each is "
                                       "skipped, never applied), with no target token, or with "
                                       "a gradient of exactly 0")


class OutputSection(Section):
    dir: str = Field("runs", description="parent folder of run directories")
    name: str | None = Field(None, description="run directory name; default RECIPE-TIMESTAMP")
    save_model: bool = True

    @field_validator("name")
    @classmethod
    def _one_component(cls, v):
        if v is not None and not _is_component(v):
            raise ValueError("must be a single path component: a folder name inside output.dir, "
                             "not empty, without '/', and not '.' or '..'")
        return v


def _is_component(name):
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


class CoreRecipe(Section):
    description: str = ""
    model: ModelSection
    plugins: list[str] = []
    data: DataSection
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v


CORE_KEYS = set(CoreRecipe.model_fields) | {"extends"}

#: What other tools (HF Trainer, axolotl, torchtune) call a key: an unknown key found here
#: gets "did you mean" this plugtune key, where the section has it.
SYNONYMS = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
    "eval_steps": "eval_every", "logging_steps": "log_every", "warmup": "warmup_steps",
    "lr_scheduler_type": "schedule", "lr_scheduler": "schedule", "scheduler": "schedule",
    "sequence_len": "max_length", "max_seq_length": "max_length", "max_seq_len": "max_length",
    "cutoff_len": "max_length", "max_grad_norm_clip": "max_grad_norm",
    "gradient_clipping": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
    "mixed_precision_dtype": "mixed_precision", "bf16": "mixed_precision",
    "fp16": "mixed_precision", "random_seed": "seed", "steps": "max_steps",
    "output_dir": "dir", "run_name": "name", "base_model": "name", "model_name": "name",
    "model_name_or_path": "name", "torch_dtype": "dtype", "tokenizer_name": "tokenizer",
    "datasets": "train", "train_file": "train", "validation_file": "validation",
    "val_set_size": "val_fraction", "eval_file": "validation", "test_file": "test",
    "sample_packing": "packing", "padding_free": "packing", "pack_sequences": "packing",
}
DATA_PATH_KEYS = ("train", "validation", "test")


class Recipe:
    """A validated recipe: ``recipe.train.lr``, ``recipe.plugins``, ``recipe["freeze"]``."""

    def __init__(self, core, sections, plugins, path, raw):
        self.core, self.sections, self.plugins, self.path, self.raw = (
            core, sections, plugins, path, raw)
        #: ``{section: {key: value}}`` decided from the data during this run (:meth:`decide`)
        self.decided = {}

    def __getattr__(self, name):
        if name in CoreRecipe.model_fields:
            return getattr(self.core, name)
        raise AttributeError(name)

    def __getitem__(self, section):
        return self.sections[section]

    def decide(self, section, key, value):
        """Keep a setting a plugin worked out from the data during this run (a classifier's
        label set, ``balanced`` class weights as numbers). The validated section is not changed
        (``recipe[section]`` stays what the recipe said); :meth:`setting` returns the decided
        value, and ``recipe.yaml`` records it, so a run reloaded from its directory
        (``plugtune eval``, ``export``, ``generate``, ``resume``) finds it in its section."""
        self.decided.setdefault(section, {})[key] = value

    def setting(self, section, key):
        """What this run uses for ``section.key``: the value decided from the data
        (:meth:`decide`), else the recipe's."""
        if key in self.decided.get(section, {}):
            return self.decided[section][key]
        return getattr(self.sections[section], key)

    def resolved(self):
        """The fully resolved recipe as plain data (defaults filled in, and what plugins
        decided from the data), for ``recipe.yaml``."""
        out = self.core.model_dump(mode="json")
        out.update({k: {**s.model_dump(mode="json"), **self.decided.get(k, {})}
                    for k, s in self.sections.items()})
        return out


def float16_training_problem(what):
    """The problem with training float16 weights (``what`` trains them), for plugins that
    train base weights to report from ``plugtune_check_recipe``."""
    return (f"model.dtype: float16 weights cannot train ({what}): AdamW's updates underflow in "
            "float16 and write NaN; use model.dtype: bfloat16 or float32, with "
            "train.mixed_precision: fp16 for float16 compute")


def shipped_recipes():
    """``{name: path}`` of the recipes that ship with plugtune."""
    return {p.name[:-len(".yaml")]: Path(str(p)) for p in files("plugtune.recipes").iterdir()
            if p.name.endswith(".yaml")}


def find_recipe(arg):
    path = Path(arg)
    if is_file(path):
        return path
    shipped = shipped_recipes()
    name = path.name[:-len(".yaml")] if path.name.endswith(".yaml") else path.name
    if name in shipped and path.parent == Path("."):
        return shipped[name]
    raise RecipeError([f"recipe file not found: {arg}{manager.did_you_mean(name, shipped)}"
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

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Bound(None, None, f"nested more than {MAX_DEPTH} levels deep; a recipe's "
                             "sections are a few levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded(node, {}) > MAX_VALUES:
            raise _Bound(None, None, f"its aliases (*NAME) expand to more than {MAX_VALUES:,} "
                         "values (or refer to themselves); a recipe holds settings, not data",
                         None)
        return node


def _expanded(node, memo):
    """How many values ``node`` stands for with every alias expanded (a cycle: unbounded)."""
    if id(node) in memo:
        return memo[id(node)] if memo[id(node)] is not None else MAX_VALUES + 1
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


def load_yaml(text):
    """``yaml.safe_load`` within the recipe bounds (:class:`BoundedLoader`)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def brief(value, limit=QUOTE_CHARS):
    """``repr(value)``, cut to ``limit`` characters with an ellipsis: a message quotes what is
    at fault, never a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _cap(line):
    return line if len(line) <= LINE_CHARS else f"{line[:LINE_CHARS]}... (cut)"


def _read_text(path):
    """A recipe file's text: refused in one line when it is over the size bound or not
    UTF-8 (naming the line and column of the first bad byte)."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError([f"{path}: {size:,} bytes; a recipe is at most "
                               f"{MAX_RECIPE_BYTES >> 20} MiB of settings (data belongs in "
                               "data files)"])
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError([f"{path}: cannot read it ({exc.strerror})"]) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError([f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                           f"column {column}); save the file as UTF-8"]) from None


def _read_yaml(path):
    try:
        data = load_yaml(_read_text(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        what = "" if isinstance(exc, _Bound) else "not valid YAML: "
        raise RecipeError([_cap(f"{where}: {what}{getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a mapping of keys (model:, data:, ...), "
                           f"got {type(data).__name__}"])
    return data


def _absolute_paths(tree, base):
    """Make the recipe's relative file paths absolute: data files, and a model given as
    ``./dir`` or ``../dir``."""
    model = tree.get("model")
    name = model.get("name") if isinstance(model, dict) else model
    if isinstance(name, str) and name.startswith(("./", "../")):
        name = str((base / name).resolve())
        tree["model"] = {**model, "name": name} if isinstance(model, dict) else name
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    for key in DATA_PATH_KEYS:
        value = data.get(key)
        if isinstance(value, (str, list, dict)):
            items = value if isinstance(value, list) else [value]
            paths = [_absolute_source(v, base) for v in items]
            data[key] = paths if isinstance(value, list) else paths[0]


def _absolute_source(source, base):
    """A data source with its path made absolute: a file or directory name, or the
    ``dataset:`` of a mapping when it is written as a path (``./saved``, ``../saved``)."""
    if isinstance(source, str) and not Path(source).is_absolute():
        return str(base / source)
    if isinstance(source, dict) and isinstance(source.get("dataset"), str) and \
            source["dataset"].startswith(("./", "../")):
        return {**source, "dataset": str((base / source["dataset"]).resolve())}
    return source


def _model_section(tree):
    """``model: NAME`` as ``model: {name: NAME}``, so that ``model.dtype=...`` overrides and
    an ``extends:`` child's ``model: {dtype: ...}`` apply to it."""
    if isinstance(tree.get("model"), str):
        tree["model"] = {"name": tree["model"]}
    return tree


def merge(base, over):
    """Deep-merge mappings; lists and scalars in ``over`` replace those in ``base``."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_tree(path, _chain=()):
    """Read a recipe file and the files it ``extends:``, merged; data paths made absolute."""
    path = Path(path).resolve()
    if path in _chain:
        raise RecipeError([f"{path}: extends: cycle " + " -> ".join(map(str, _chain + (path,)))])
    tree = _model_section(_read_yaml(path))
    _absolute_paths(tree, path.parent)
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise RecipeError([f"{path}: extends: expects one recipe file name, got "
                           f"{brief(parent)}"])
    parent_path = path.parent / parent
    if not is_file(parent_path):
        try:
            parent_path = find_recipe(parent)
        except RecipeError as exc:
            raise RecipeError([f"{path}: extends: {parent}: no such recipe next to it "
                               f"({parent_path}) nor a shipped one; fix the name or remove "
                               "extends:"]) from exc
    return merge(load_tree(parent_path, _chain + (path,)), tree)


def apply_overrides(tree, overrides):
    """Apply ``key.sub=value`` strings (values parsed as YAML; paths relative to the cwd)."""
    tree = _model_section(dict(tree))
    over = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError([f"override {brief(item)}: expected KEY=VALUE, e.g. "
                               "train.lr=1e-4"])
        try:
            value = load_yaml(text)
        except yaml.YAMLError as exc:
            raise RecipeError([_cap(f"override {brief(item)}: value is not valid YAML: "
                                    f"{exc}")]) from None
        *parents, leaf = key.split(".")
        node, existing = over, tree
        for i, part in enumerate(parents):
            existing = existing.get(part, {}) if isinstance(existing, dict) else None
            if existing is not None and not isinstance(existing, dict):
                raise RecipeError([_cap(f"override {brief(item)}: {'.'.join(parents[:i + 1])} "
                                        "is not a section, so it has no sub-keys")])
            node = node.setdefault(part, {})
        node[leaf] = value
    _absolute_paths(over, Path.cwd())
    return merge(tree, over)


def _unknown_keys(data, schema, prefix):
    """Problems for keys ``schema`` does not know, with a "did you mean" where one is close."""
    problems = []
    fields = schema.model_fields
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{prefix}{_key(key)}: unknown key{did_you_mean(key, fields)}")
            continue
        sub = fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            problems += _unknown_keys(value, sub, f"{prefix}{key}.")
    return problems


def _key(key):
    """A key as a message names it: itself, or cut short (a key can be any YAML value)."""
    return key if isinstance(key, str) and len(key) <= QUOTE_CHARS else brief(key)


def did_you_mean(key, fields):
    """" (did you mean 'lr'?)" for a close spelling or another tool's name of a key."""
    if isinstance(key, str) and SYNONYMS.get(key) in fields:
        return f" (did you mean {SYNONYMS[key]!r}?)"
    return manager.did_you_mean(str(key), fields)


def _top_level_hint(key, names):
    """A "did you mean" for an unknown top-level key: a close name, or the core section key
    it belongs in (``lr`` -> ``train.lr``, ``output_dir`` -> ``output.dir``)."""
    hint = did_you_mean(key, names)
    if hint or not isinstance(key, str):
        return hint
    if SYNONYMS.get(key) == "name" and "model" in key:
        return " (did you mean 'model'?)"
    wanted = SYNONYMS.get(key, key)
    for section in ("train", "data", "output", "model"):
        if wanted in CoreRecipe.model_fields[section].annotation.model_fields:
            return f" (did you mean '{section}.{wanted}'?)"
    return ""


def _validate(schema, data, prefix):
    """``(instance or None, problems)`` for one section."""
    if data is not None and not isinstance(data, dict):
        return None, [f"{prefix.rstrip('.')}: expected a mapping of keys, got {brief(data)}"]
    data = data or {}
    problems = _unknown_keys(data, schema, prefix)
    try:
        return schema.model_validate(data), problems
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == "extra_forbidden":
                continue
            loc = prefix + ".".join(str(p) for p in err["loc"])
            got = f" (got {brief(err['input'])})" if err["type"] != "missing" else ""
            hint = "; add it to the recipe" if err["type"] == "missing" else ""
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}{got}{hint}")
        return None, problems


def _stand_in(schema, data):
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


def load_recipe(arg, overrides=(), discovered=None, check_files=True, trust_remote_code=False):
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
    active, problems = manager.resolve_active(requested, discovered)
    pm = manager.make_manager(active, discovered)

    schemas = {}

    def register(name, schema):
        if name in CORE_KEYS or name in schemas:
            raise PluginError(f"a plugin registers recipe section {name!r}, which is taken")
        schemas[name] = schema

    with manager.blamed(pm):  # a plugin's bug is named, even before training
        pm.hook.plugtune_recipe_sections(register=register)

    for key in tree:
        if key in CORE_KEYS or key in schemas:
            continue
        if key in discovered:
            problems.append(f"{key}: this section configures plugin {key!r}, which is not "
                            f"active; add {key} to plugins:, or drop the section ({key}: null "
                            "where it is inherited)")
        else:
            problems.append(f"{_key(key)}: unknown key"
                            f"{_top_level_hint(key, CORE_KEYS | set(schemas))}")
    core_tree = {k: v for k, v in tree.items() if k in CoreRecipe.model_fields}
    core, core_problems = _validate(CoreRecipe, core_tree, "")
    problems += core_problems
    core = core or _stand_in(CoreRecipe, core_tree)
    if core is not None:
        if core.model.trust_remote_code and not trust_remote_code:
            problems.append(REMOTE_CODE_REFUSED)
        core.model.trust_remote_code = trust_remote_code
    sections = {}
    for name, schema in schemas.items():
        sections[name], section_problems = _validate(schema, tree.get(name), f"{name}.")
        problems += section_problems
    problems += _missing_files(tree) if check_files else []
    if not pm.hook.plugtune_compute_loss.get_hookimpls():
        problems.append("plugins: no active plugin computes the loss; add a task plugin "
                        "(one that implements plugtune_compute_loss; `plugtune plugins` lists "
                        "them)")
    recipe = Recipe(core,
                    {name: section or _stand_in(schemas[name], tree.get(name))
                     for name, section in sections.items()}, active, path, tree)
    recipe.roles = pm.roles  # {role: [plugin]}: plugtune.active_roles(recipe)
    if recipe.core is not None and None not in recipe.sections.values():
        try:
            with manager.blamed(pm):
                results = pm.hook.plugtune_check_recipe(recipe=recipe)
        except Exception:
            if not problems:  # on a valid recipe a failing check is a plugin's bug: show it
                raise
            results = []  # a check tripped over keys already reported; those come first
        # a section that had problems was checked with its invalid keys dropped: what the
        # checks say of that section again would mislead
        def section_of(problem):
            return problem.split(":")[0].split(".")[0]

        faulty = {section_of(p) for p in problems} - {"plugins"}
        for result in results:
            problems += [p for p in result or [] if p not in problems
                         and section_of(p) not in faulty]
        if check_files:  # the records, as the data plugin reads them (plugtune_check_records)
            with manager.blamed(pm):
                problems += validate_records(pm, recipe, problems)
    if problems:
        raise RecipeError([_cap(p) for p in problems], path)
    return recipe, pm


REMOTE_CODE_REFUSED = (
    "model.trust_remote_code: true would run Python code that comes with the model; plugtune "
    "runs it only when the command line says so: add --trust-remote-code to the command (after "
    "reading the model's code), or drop the key from the recipe")


def is_file(path):
    """``Path.is_file`` that says False, not raises, for a name with a NUL byte or too long."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _is_dir(path):
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def _missing_files(tree):
    """Data files that do not exist and a run directory that does (read from the raw tree, so
    that they are reported even when other keys are invalid)."""
    problems = []
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    for key in DATA_PATH_KEYS:
        files = data.get(key) or []
        for file in [files] if isinstance(files, str) else files if isinstance(files, list) else []:
            if isinstance(file, str) and not is_file(file) and not _is_dir(file):
                problems.append(f"data.{key}: file not found: {file}; paths in a recipe are "
                                "relative to the recipe file, on the command line to the cwd")
    output = tree.get("output") if isinstance(tree.get("output"), dict) else {}
    name, parent = output.get("name"), output.get("dir", OutputSection().dir)
    if not rundir.is_main_process() or not isinstance(parent, str):
        return problems
    problem = rundir.unusable_parent(parent)
    if problem:
        problems.append(f"output.dir: {problem}")
    elif isinstance(name, str) and _is_component(name) and os.path.lexists(Path(parent) / name):
        problems.append(f"output.name: {Path(parent) / name} already exists; pick another name "
                        "(output.name=...) or delete it")
    return problems
