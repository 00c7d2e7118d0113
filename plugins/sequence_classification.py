"""Sequence classification: a new head learns one label per text.

Records are ``{"text", "label"}``. A decoder's head reads the last token that is not padding (on
either padding side), an encoder's its pooled output. Labels are strings or numbers; the label
set is the training file's unless the recipe lists it, and is saved with the run
(``recipe.yaml``, ``labels.json``, the model config).
Evaluation reports accuracy, macro-F1 and per-class precision and recall (scikit-learn).

Composes with ``full``, ``freeze`` (the head always trains), ``lora`` (the head trains in full
and is saved with the adapter) and ``int8``/``nf4`` bases under ``lora``.
"""
from typing import Literal

import torch
from pydantic import Field, field_validator

from plugtune import hookimpl
from plugtune.data import Tokenized
from plugtune.errors import DataError, RecipeError
from plugtune.loss import count_labels
from plugtune.plugins import head_family as heads

NAME = "sequence_classification"
PLUGTUNE_ROLES = {"task"}

# the hook implementations every head shares, as this plugin's own
HEAD = heads.Head(NAME, "AutoModelForSequenceClassification")
plugtune_check_recipe = HEAD.plugtune_check_recipe
plugtune_model_class = HEAD.plugtune_model_class
plugtune_model_kwargs = HEAD.plugtune_model_kwargs
plugtune_select_trainable = HEAD.plugtune_select_trainable
plugtune_train_start = HEAD.plugtune_train_start


class SequenceClassificationSection(heads.HeadSection):
    text_field: str = Field("text", description="the record field holding the text")
    label_field: str = Field("label", description="the record field holding the label")
    labels: list[str] | None = Field(None, description="the label set in id order; default: "
                                     "the labels of the training file, sorted")
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        None, description="weigh the loss per class: balanced (inversely to the class's share "
        "of the training split) or {label: weight} (1 for labels not given)")

    @field_validator("class_weights", mode="before")
    @classmethod
    def _keys_as_text(cls, value):
        if isinstance(value, dict):
            return {heads.label_name(k) if heads.is_label(k) else k: v
                    for k, v in value.items()}
        return value


@hookimpl
def plugtune_recipe_sections(register):
    register(NAME, SequenceClassificationSection)


@hookimpl
def plugtune_tokenize(records, tokenizer, recipe, split):
    s = recipe[NAME]
    needs = f"{s.text_field!r} and {s.label_field!r}"
    texts = [heads.field(r, s.text_field, NAME, needs) for r in records]
    labels = heads.label_ids(recipe, NAME, records,
                             [heads.field(r, s.label_field, NAME, needs) for r in records], split)
    if split == "train":
        resolve_class_weights(recipe, labels)
    examples, truncated = [], 0
    for record, text, label in zip(records, texts, labels):
        if not isinstance(text, str):
            raise DataError(f"{record.where}: {s.text_field!r} must be a string, got "
                            f"{type(text).__name__}")
        enc, cut = heads.encode(tokenizer, text, recipe.train.max_length)
        truncated += cut
        examples.append({"input_ids": enc["input_ids"], "labels": label})
    return Tokenized(examples, heads.collator(tokenizer, per_token=False), truncated, records)


def resolve_class_weights(recipe, label_ids):
    """Turn ``balanced`` into weights per label (scikit-learn's ``n / (classes * count)``) and
    check labels given by name; the run keeps the weights it used (``recipe.yaml`` records
    them)."""
    weights, labels = recipe[NAME].class_weights, heads.labels_of(recipe, NAME)
    if weights == "balanced":
        import numpy as np
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(label_ids)
        balanced = compute_class_weight("balanced", classes=present, y=np.array(label_ids))
        recipe.decide(NAME, "class_weights",
                      {labels[i]: float(w) for i, w in zip(present, balanced)})
    elif weights:
        unknown = sorted(set(weights) - set(labels))
        if unknown:
            raise RecipeError([f"{NAME}.class_weights: {unknown} are not labels of the "
                               f"training data {labels}"])


def class_weight(recipe):
    """The per-class weights of ``class_weights`` as a tensor, or None (unweighted)."""
    weights = recipe.setting(NAME, "class_weights")
    if not isinstance(weights, dict):
        return None
    return torch.tensor([weights.get(name, 1.0) for name in heads.labels_of(recipe, NAME)])


@hookimpl
def plugtune_compute_loss(model, batch, recipe):
    return heads.loss(model, batch, class_weight(recipe))


@hookimpl
def plugtune_count_targets(batch, recipe):
    return count_labels(batch["labels"], class_weight(recipe))


def metrics(labels, predictions, names):
    """Accuracy, macro-F1 (over the classes present in either list) and precision and recall
    of every class (``precision/NAME``, ``recall/NAME``), from label ids."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    precision, recall, _, _ = precision_recall_fscore_support(
        labels, predictions, labels=list(range(len(names))), zero_division=0)
    out = {"accuracy": float(accuracy_score(labels, predictions)),
           "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0))}
    for name, p, r in zip(names, precision, recall):
        out[f"precision/{name}"], out[f"recall/{name}"] = float(p), float(r)
    return out


@hookimpl
def plugtune_evaluate(run, model, split):
    return metrics(*heads.predict(run, model, split), heads.labels_of(run.recipe, NAME))


@hookimpl
def plugtune_estimate_memory(plan):
    """The planner's batch: one label per sequence, not one per token."""
    plan.make_batch = heads.meta_batch("labels")
