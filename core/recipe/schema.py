"""The recipe's schema: the core's sections (``model``, ``data``, ``train``, ``output``) as
pydantic models, the base :class:`Section` plugins subclass for theirs, the names other tools
give its keys, and :class:`Recipe`, what a validated recipe is."""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, ValidationInfo, field_validator)

from ..errors import did_you_mean as _close_name


class Section(BaseModel):
    """Base for recipe sections: unknown keys are errors. Plugins may subclass it."""

    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    """Which model to fine-tune. A string ``model: NAME`` is short for ``model: {name: NAME}``."""

    name: str = Field(description="hub id, local save_pretrained directory, path to a .gguf "
                      "file, or pkg:PACKAGE/FILE for a file inside an installed Python package")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer: str | None = Field(default=None,
                                  description="tokenizer source when not the model's")
    trust_remote_code: bool = False
    adapter: str | None = Field(default=None, description="start from this trained adapter "
                                "(trained further, not a fresh one): a finished plugtune run "
                                "directory or a PEFT adapter directory; needs the adapter "
                                "method plugin it was trained with")
    attn_implementation: str | None = Field(
        default=None, description="attention kernel, as transformers names it: eager, sdpa, "
        "flex_attention, flash_attention_2 (3, 4), paged|eager; default: transformers' choice "
        "(sdpa where the model supports it)")

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, v: str | None) -> str | None:
        if v is not None and v not in ATTENTION:
            raise ValueError(f"unknown attention implementation {v!r}{did_you_mean(v, ATTENTION)};"
                             f" it takes {', '.join(ATTENTION)}")
        return v


#: The attention implementations of the installed transformers (5.x: ``"eager"`` and the keys
#: of ``ALL_ATTENTION_FUNCTIONS``; a test keeps the two the same). Kernels from the hub
#: (``kernels-community/...``) are left out: they are downloaded when the model loads.
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
             "flash_attention_4", "paged|eager")


class DatasetSource(Section):
    """A split of a ``datasets`` dataset: ``{dataset: NAME, config: ..., split: train}``."""

    dataset: str = Field(description="hub dataset id, or a directory written by save_to_disk")
    config: str | None = Field(default=None,
                               description="the dataset's configuration (subset) name")
    split: str | None = Field(default=None, description="the split to read; default the key's "
                              "own (train, validation or test)")
    revision: str | None = Field(default=None, description="a hub dataset's git revision")


class DataSection(Section):
    """Where the data is: local files (JSONL, JSON, CSV, text, Parquet, Arrow), directories
    written by ``datasets``' ``save_to_disk``, or ``{dataset: ...}`` splits of hub datasets."""

    train: list[str | DatasetSource] = Field(description="one source or a list; file paths are "
                                             "relative to the recipe's folder")
    validation: list[str | DatasetSource] | None = Field(
        default=None, description="held-out source(s); else a split")
    test: list[str | DatasetSource] | None = Field(
        default=None, description="test source(s), evaluated once at the end with the final (or "
        "early stopping's best) model")
    val_fraction: float = Field(default=0.1, gt=0, lt=1,
                                description="held-out share without validation")
    columns: dict[str, str] = Field(default={}, description="record field -> the column it is "
                                    "read from ({text: body}), for every source")
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt_completion", "text",
                    "completion"] = Field(
        default="auto", description="the records' shape: openai ({messages: [{role, content}]}), "
        "sharegpt ({conversations: [{from, value}]}), alpaca ({instruction, input, output}), "
        "prompt_completion ({prompt, completion}), text ({text}; completion is axolotl's name "
        "for it); auto: each record by its fields")
    roles: dict[str, str | list[str]] = Field(
        default={}, description="role -> the tag(s) a conversation's records use for it "
        "({user: human, assistant: [gpt, bot]}); sharegpt's human, gpt, system, tool are known")
    message_fields: dict[Literal["role", "content"], str] = Field(
        default={}, description="message field -> the key it is read from "
        "({role: from, content: value}); default role/content, from/value for sharegpt")
    chat_template: str | None = Field(
        default=None, description="the chat template conversations are rendered with: a name "
        "(chatml, llama-3, llama-2, mistral, qwen2.5, phi-3, smollm2, gemma, alpaca), a Jinja "
        "string, or a .jinja file; null: the tokenizer's own. Saved with the run's tokenizer")
    roles_to_train: list[str] = Field(default=["assistant"], min_length=1,
                                      description="the roles whose turns are learnt")
    train_on_eos: Literal["turn", "last", "all", "none"] = Field(
        default="turn", description="which end-of-turn tokens are learnt: those of learnt turns "
        "(turn), of the last learnt turn only (last), of every turn (all), or none")

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        from ..chat import problem

        if v is not None and (found := problem(v)):
            raise ValueError(found)
        return v
    mix: Literal["concat", "interleave_under", "interleave_over"] = Field(
        default="concat", description="how several train sources combine: concat (each record "
        "once), or an epoch holding each in proportion to its weight: interleave_under (ends "
        "when the first source runs out), interleave_over (until every source is seen whole)")
    streaming: bool = Field(default=False, description="read data.train as training needs "
                            "it (JSONL, CSV, text, Parquet, hub datasets): memory flat in the "
                            "data's size; needs train.max_steps and data.validation")
    buffer_size: PositiveInt = Field(default=1000, description="streamed records shuffled at a "
                                     "time (a seeded shuffle buffer)")
    weights: list[Any] | None = Field(default=None, description="one per data.train entry "
                                      "(or weight: in the entry): its share of an interleaved "
                                      "epoch; default 1 each")

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        items = [v] if isinstance(v, (str, dict)) else v
        return [_dataset_source(i) if isinstance(i, dict) else i for i in items] \
            if isinstance(items, list) else v


    @field_validator("weights")
    @classmethod
    def _shares(cls, v: list[Any] | None, info: ValidationInfo) -> list[float] | None:
        """Each a number >= 0, not all 0, one per source, under an interleaving ``mix``."""
        if v is None:
            return v
        train = info.data.get("train")
        if train is not None and len(v) != len(train):
            raise ValueError(f"{len(v)} weight(s) for {len(train)} data.train source(s); give "
                             "one per source")
        for i, w in enumerate(v):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w or \
                    w in (float("inf"), float("-inf")):
                raise ValueError(f"the weight of data.train[{i}] is {w!r}, not a number; a "
                                 "weight is a source's share of the mixture, e.g. 2 or 0.5")
            if w < 0:
                raise ValueError(f"the weight of data.train[{i}] is {w}, below 0; a weight is a "
                                 "share of the mixture: 0 or more (0 leaves the source out)")
        if not any(v):
            raise ValueError("every weight is 0, so the mixture draws nothing; give at least "
                             "one source a weight above 0")
        if info.data.get("mix") == "concat" and len(set(v)) > 1:
            raise ValueError("data.mix: concat (the default) reads every record once, so "
                             "weights change nothing; set data.mix: interleave_under or "
                             "interleave_over")
        return [float(w) for w in v]


def _dataset_source(entry: dict[Any, Any]) -> DatasetSource:
    """A ``{dataset: ...}`` entry as a :class:`DatasetSource`, its problems said in one line
    (rather than one per member of the ``str | DatasetSource`` union)."""
    kind, fields = ("a {path: ...} entry", ["path", "weight"]) if "path" in entry else (
        "a dataset entry", [*DatasetSource.model_fields, "weight"])
    for key in entry:
        if key not in fields:
            raise ValueError(f"unknown key {key!r} in {kind}{did_you_mean(key, fields)}"
                             f"; it takes {', '.join(fields)}")
    try:
        return DatasetSource.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"dataset entry {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class TrainSection(Section):
    """The optimization loop."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = Field(default=0, ge=0, lt=2 ** 32, description="0 to 2**32 - 1 (numpy's range)")
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = Field(default=None,
                                          description="optimizer steps; overrides epochs")
    batch_size: PositiveInt = Field(default=4, description="micro-batch size per device")
    eval_batch_size: PositiveInt | None = Field(
        default=None, description="micro-batch of evaluation and of generation for metrics; "
        "default batch_size")
    grad_accum: PositiveInt = Field(default=1, description="micro-batches per optimizer step")
    group_by_length: bool = Field(default=False, description="micro-batches of examples of "
                                  "similar length (less padding), in shuffled order")
    packing: bool = Field(default=False, description="padding-free batches (language "
                          "modelling); each micro-batch's examples packed into one row (rows of "
                          "at most max_length under eager attention), attention kept inside "
                          "each example")
    lr: PositiveFloat = 2e-5
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: PositiveFloat | None = 1.0
    eval_every: PositiveInt | Literal["end"] | None = Field(
        default="end", description="evaluate before training, every N steps and after the last; "
        "end (the default): before and after only; null: never")
    log_every: PositiveInt = 1
    max_length: PositiveInt = Field(default=512,
                                    description="tokens; longer sequences are truncated")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    compile: bool = Field(default=False, description="torch.compile the model's forward "
                          "(Module.compile, dynamic shapes); opt-in: on a CPU it measured no "
                          "gain (see docs/performance.md)")
    peak_tflops: PositiveFloat | None = Field(
        default=None, description="the device's peak TFLOP/s per process, for the model FLOPs "
        "utilization (mfu) in metrics.jsonl; default: the dense bf16 peak of a known GPU "
        "(H200, H100, A100, L40S, L4, RTX 4090, 3090, ...), none on a CPU")
    save_every: PositiveInt | None = Field(default=None, description="write a checkpoint every "
                                           "N optimizer steps (RUN/checkpoints/step-N)")
    keep_checkpoints: PositiveInt | None = Field(default=2, description="newest checkpoints "
                                                 "kept; null keeps all")
    max_bad_steps: PositiveInt = Field(default=3, description="stop after this many optimizer "
                                       "steps in a row with a non-finite loss or gradient (each "
                                       "is skipped, never applied), with no target token, or "
                                       "with a gradient of exactly 0")


class OutputSection(Section):
    dir: str = Field(default="runs", description="parent folder of run directories")
    name: str | None = Field(default=None,
                             description="run directory name; default RECIPE-TIMESTAMP")
    save_model: bool = True

    @field_validator("name")
    @classmethod
    def _one_component(cls, v: str | None) -> str | None:
        if v is not None and not _is_component(v):
            raise ValueError("must be a single path component: a folder name inside output.dir, "
                             "not empty, without '/', and not '.' or '..'")
        return v


def _is_component(name: str) -> bool:
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
    def _model_shorthand(cls, v: Any) -> Any:
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
    "formatting": "format", "conversation_style": "format", "chat_template_jinja":
    "chat_template", "template": "chat_template", "message_property_mappings": "message_fields",
    "tags": "roles", "train_on_inputs": "roles_to_train", "field_messages": "columns",
    "message_field_role": "message_fields", "message_field_content": "message_fields",
    "attention": "attn_implementation", "flash_attention": "attn_implementation",
    "sdp_attention": "attn_implementation",
}
DATA_PATH_KEYS = ("train", "validation", "test")


class Recipe:
    """A validated recipe: ``recipe.train.lr``, ``recipe.plugins``, ``recipe["freeze"]``."""

    def __init__(self, core: CoreRecipe | None, sections: dict[str, Any], plugins: list[str],
                 path: Path, raw: dict[str, Any]) -> None:
        self.core, self.sections, self.plugins, self.path, self.raw = (
            core, sections, plugins, path, raw)
        #: ``{section: {key: value}}`` decided from the data during this run (:meth:`decide`)
        self.decided: dict[str, dict[str, Any]] = {}
        #: ``{role: [plugin]}`` of the run (:func:`plugtune.active_roles`); None: not known
        self.roles: dict[str, list[str]] | None = None

    def __getattr__(self, name: str) -> Any:
        if name in CoreRecipe.model_fields:
            return getattr(self.core, name)
        raise AttributeError(name)

    def __getitem__(self, section: str) -> Any:
        return self.sections[section]

    def decide(self, section: str, key: str, value: Any) -> None:
        """Keep a setting a plugin worked out from the data during this run (a classifier's
        label set, ``balanced`` class weights as numbers). The validated section is not changed
        (``recipe[section]`` stays what the recipe said); :meth:`setting` returns the decided
        value, and ``recipe.yaml`` records it, so a run reloaded from its directory
        (``plugtune eval``, ``export``, ``generate``, ``resume``) finds it in its section."""
        self.decided.setdefault(section, {})[key] = value

    def setting(self, section: str, key: str) -> Any:
        """What this run uses for ``section.key``: the value decided from the data
        (:meth:`decide`), else the recipe's."""
        if key in self.decided.get(section, {}):
            return self.decided[section][key]
        return getattr(self.sections[section], key)

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (defaults filled in, and what plugins
        decided from the data), for ``recipe.yaml``."""
        assert self.core is not None, "only a valid recipe is resolved"
        out = self.core.model_dump(mode="json")
        out.update({k: {**s.model_dump(mode="json"), **self.decided.get(k, {})}
                    for k, s in self.sections.items()})
        return out


def did_you_mean(key: object, fields: Collection[str]) -> str:
    """" (did you mean 'lr'?)" for a close spelling or another tool's name of a key."""
    if isinstance(key, str) and SYNONYMS.get(key) in fields:
        return f" (did you mean {SYNONYMS[key]!r}?)"
    return _close_name(str(key), fields)


