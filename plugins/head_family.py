"""What task-head plugins share (plugin API 1.1): the built-in ``sequence_classification``,
``token_classification`` and ``question_answering`` use it, and a stranger's head plugin can
too. Not a plugin itself.

A head is a new output layer on a pretrained model, loaded through a transformers task class
(``AutoModelFor...Classification``), which adds the layer (``score`` on decoders, ``classifier``
on encoders) with random weights. Its label set comes from the training split, sorted (numerically
when every label is a number), unless the recipe gives ``labels:``; the plugin keeps it as the
run's state (``recipe.decide(NAME, "labels", ...)``; the validated section is not changed) and
reads it with :func:`labels_of`; the run's ``recipe.yaml`` records it, and the run also writes
``labels.json`` and the model config's ``id2label``/``label2id``.

The head always trains: with ``lora`` peft saves and trains it as a ``modules_to_save`` module
(the ``lora`` plugin picks peft's classification task type from the model class); otherwise the
plugin turns its parameters on after every plugin has chosen what trains (``freeze`` included).

The hook implementations at the end are the same for every head: a head plugin makes a
:class:`Head` for its name and model class and takes them as its own (``plugtune_model_class =
HEAD.plugtune_model_class``); it declares ``PLUGTUNE_ROLES = {"task"}``, so the core refuses a
second task plugin beside it.
"""
import json
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import field_validator

from plugtune import Section, atomic_write, hookimpl
from plugtune.errors import DataError, PluginError
from plugtune.data import eval_batches
from plugtune.loss import IGNORE, Loss, cross_entropy  # IGNORE: heads.IGNORE for token heads

if TYPE_CHECKING:
    from plugtune import Recipe, Record, Run


class HeadSection(Section):
    """Fields every head's section has."""

    labels: list[str] | None = None

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [label_name(v) if is_label(v) else v for v in value]
        return value


def is_label(value: object) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def label_name(value: Any) -> str:
    """The text a label is known by (``1`` and ``"1"`` are one label)."""
    if not is_label(value):
        raise TypeError(f"a label is a string or a number, got {value!r}")
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def sorted_labels(names: Iterable[str]) -> list[str]:
    """Labels in id order: numerically when every one is a number, else alphabetically."""
    names = set(names)
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def field(record: "Record", key: str, section_name: str, needs: str) -> Any:
    """``record.data[key]``, or a DataError naming the line and the section key to change."""
    if key not in record.data:
        raise DataError(f"{record.where}: no {key!r} field; a {section_name} record needs "
                        f"{needs} (other field names: set {section_name}.*_field); this one has "
                        f"{sorted(record.data)}")
    return record.data[key]


def labels_of(recipe: "Recipe", section_name: str) -> list[str] | None:
    """The run's label set in id order: the recipe's ``labels:``, or the training split's
    (decided when it was tokenized); None before that."""
    return recipe.setting(section_name, "labels")


def label_ids(recipe: "Recipe", section_name: str, records: "Sequence[Record]",
              values: Sequence[Any], split: str) -> list[int | list[int]]:
    """Label ids of ``values`` (one label, or a list per record). The training split decides
    the label set where the recipe gives none; a label outside the set is a DataError."""
    def names(value: Any, record: "Record") -> str | list[str]:
        try:
            return [label_name(v) for v in value] if isinstance(value, list) else label_name(value)
        except TypeError as exc:
            raise DataError(f"{record.where}: {exc}") from exc

    texts = [names(v, r) for v, r in zip(values, records)]
    labels = labels_of(recipe, section_name)
    if labels is None:
        if split != "train":
            raise PluginError(f"{section_name}: the label set is unknown; tokenize the training "
                              f"split first or give {section_name}.labels")
        flat = [t for ts in texts for t in (ts if isinstance(ts, list) else [ts])]
        labels = sorted_labels(flat)
        recipe.decide(section_name, "labels", labels)
    label2id = {name: i for i, name in enumerate(labels)}

    def to_id(text: str, record: "Record") -> int:
        if text in label2id:
            return label2id[text]
        if split == "train":
            raise DataError(f"{record.where}: label {text!r} is not in {section_name}.labels "
                            f"{labels}; add it there or fix the record")
        raise DataError(f"{record.where}: label {text!r} is not one of the labels the head is "
                        f"trained on {labels}; a held-out record can only have one of "
                        f"those (fix the record, or list every label in {section_name}.labels)")

    return [[to_id(t, r) for t in ts] if isinstance(ts, list) else to_id(ts, r)
            for ts, r in zip(texts, records)]


def encode(tokenizer: Any, text: Any, max_length: int, **kwargs: Any) -> tuple[Any, bool]:
    """``(encoding, truncated)``: ``text`` tokenized with the tokenizer's special tokens, cut
    at ``max_length`` tokens."""
    enc = tokenizer(text, **kwargs)
    if len(enc["input_ids"]) <= max_length:
        return enc, False
    return tokenizer(text, truncation=True, max_length=max_length, **kwargs), True


def collator(tokenizer: Any,
             per_token: bool) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Pads a batch on the tokenizer's padding side (labels with -100 for token labels); with
    left padding it adds the positions, so absolute position embeddings see unshifted tokens."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    pad = (DataCollatorForTokenClassification if per_token else DataCollatorWithPadding)(tokenizer)

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(pad([{"input_ids": e["input_ids"], "labels": e["labels"]}
                          for e in examples]))
        if tokenizer.padding_side == "left":
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch

    return collate


def model_kwargs(labels: Sequence[str] | None, tokenizer: Any) -> dict[str, Any]:
    """``from_pretrained`` arguments for a head with the section's labels. The model learns the
    tokenizer's padding token: a decoder's classifier pools the last token that is not padding
    (transformers finds it by ``pad_token_id``, on either padding side)."""
    if labels is None:
        # Only the memory planner loads a model (on the meta device) before the training split
        # is read; the number of labels hardly changes its figures.
        return {}
    kwargs: dict[str, Any] = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
              "label2id": {name: i for i, name in enumerate(labels)}}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return kwargs


def loss(model: torch.nn.Module, batch: dict[str, Any],
         weight: torch.Tensor | None = None) -> Loss:
    """Cross-entropy of the head's logits (``-100`` labels ignored), optionally class-weighted:
    a :class:`plugtune.Loss` whose count is the labelled items (or their summed weight)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return cross_entropy(model(**inputs).logits, batch["labels"], weight=weight)


def predict(run: "Run", model: torch.nn.Module,
            split: str = "validation") -> tuple[list[Any], list[Any]]:
    """``(labels, predictions)`` per example of a held-out split: one id each for a sequence
    label, or the ids at the labelled (first sub-word) positions for token labels. Each process
    predicts its share of the batches; every process gets them all."""
    labels: list[Any] = []
    predictions: list[Any] = []
    with torch.no_grad():
        for _, batch in eval_batches(run, split):
            gold = batch.pop("labels")
            with run.accelerator.autocast():
                best = model(**batch).logits.argmax(-1)
            for g, b in zip(gold.tolist(), best.tolist()):
                if isinstance(g, list):
                    b = [p for p, t in zip(b, g) if t != IGNORE]
                    g = [t for t in g if t != IGNORE]
                labels.append(g)
                predictions.append(b)
    pairs = run.gather(list(zip(labels, predictions)))
    return [g for g, _ in pairs], [b for _, b in pairs]


def meta_batch(*per_sequence: str) -> Callable[[int, int], dict[str, torch.Tensor]]:
    """The planner's batch maker for a head whose targets are one id per sequence under each
    name of ``per_sequence`` (a class label; a start and an end position), not one per token."""
    def batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
        return {"input_ids": ids, **{k: torch.zeros(batch_size, dtype=torch.long, device="meta")
                                     for k in per_sequence}}
    return batch


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the layers a task class adds on top of the pretrained model."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return [p for child in model.children() if child is not backbone for p in child.parameters()]


# ---------------------------------------------------------------------------------------------
# Hook implementations every head shares.
# ---------------------------------------------------------------------------------------------


def check(recipe: "Recipe", name: str) -> list[str]:
    """The problems every head has with a recipe (a second task plugin is the core's: the role
    ``task``)."""
    if recipe.train.packing:
        return [f"train.packing: {name} keeps padded batches (each example is classified on its "
                "own row); packing is for causal_lm; remove train.packing (train.group_by_length "
                "cuts padding instead)"]
    return []


class Head:
    """The hook implementations every head shares, for the head plugin ``name`` (its section's
    name) whose model is loaded as ``model_class`` (a transformers class name such as
    ``"AutoModelForSequenceClassification"``). A head plugin module takes the ones it needs as
    its own: ``plugtune_check_recipe = HEAD.plugtune_check_recipe``."""

    def __init__(self, name: str, model_class: str) -> None:
        self.name, self.model_class = name, model_class

    @hookimpl
    def plugtune_check_recipe(self, recipe: "Recipe") -> list[str]:
        return check(recipe, self.name)

    @hookimpl
    def plugtune_model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class)

    @hookimpl
    def plugtune_model_kwargs(self, recipe: "Recipe", tokenizer: Any) -> dict[str, Any]:
        return model_kwargs(labels_of(recipe, self.name), tokenizer)

    @hookimpl(wrapper=True)
    def plugtune_select_trainable(self, model: torch.nn.Module) -> Generator[None, Any, Any]:
        """Make the head train. A wrapper runs after every plugin has chosen what trains
        (``freeze.last_n_blocks`` turns off all but the last blocks, the head too). Under peft,
        ``modules_to_save`` already trains it."""
        result = yield
        if not hasattr(model, "peft_config"):
            for p in head_parameters(model):
                p.requires_grad_(True)
        return result

    @hookimpl
    def plugtune_train_start(self, run: "Run") -> None:
        """``labels.json`` in the run directory: the task and its labels in id order."""
        if run.dir is not None:
            atomic_write(run.dir / "labels.json", json.dumps(
                {"task": self.name, "labels": labels_of(run.recipe, self.name)}, indent=2) + "\n")
