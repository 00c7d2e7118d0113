"""Token classification: a new head labels every word, as in named-entity recognition.

Records are ``{"tokens": [words], "tags": [labels]}``; decoder and encoder models. Word labels
(BIO tags such as ``B-PER``, ``I-PER``, ``O``) go to the first sub-word token of each word; the
other sub-words, and special tokens, are not scored. The tag set is the training file's unless
the recipe lists it, and is saved with the run. Evaluation reports entity-level precision,
recall and F1 (seqeval, conlleval rules), F1 per entity type and word accuracy.

Composes like ``sequence_classification``: ``full``, ``freeze`` (the head always trains),
``lora`` (the head is saved with the adapter), ``int8``/``nf4`` under ``lora``.
"""
import warnings

from pydantic import Field

from plugtune import hookimpl
from plugtune.data import Tokenized
from plugtune.errors import DataError
from plugtune.loss import count_labels
from plugtune.plugins import head_family as heads

NAME = "token_classification"
#: ``position-targets``: its targets sit at the input's token positions (one tag per token), so
#: a method that puts tokens before the input (prompt_tuning) asks for this role and refuses.
PLUGTUNE_ROLES = {"task", "position-targets"}

# the hook implementations every head shares, as this plugin's own
HEAD = heads.Head(NAME, "AutoModelForTokenClassification")
plugtune_check_recipe = HEAD.plugtune_check_recipe
plugtune_model_class = HEAD.plugtune_model_class
plugtune_model_kwargs = HEAD.plugtune_model_kwargs
plugtune_select_trainable = HEAD.plugtune_select_trainable
plugtune_train_start = HEAD.plugtune_train_start


class TokenClassificationSection(heads.HeadSection):
    tokens_field: str = Field("tokens", description="the record field holding the words")
    tags_field: str = Field("tags", description="the record field holding one tag per word")
    labels: list[str] | None = Field(None, description="the tag set in id order; default: the "
                                     "tags of the training file, sorted")


@hookimpl
def plugtune_recipe_sections(register):
    register(NAME, TokenClassificationSection)


def words_and_tags(record, s):
    needs = f"{s.tokens_field!r} (a list of words) and {s.tags_field!r} (one tag per word)"
    words = heads.field(record, s.tokens_field, NAME, needs)
    tags = heads.field(record, s.tags_field, NAME, needs)
    if not (isinstance(words, list) and words and all(isinstance(w, str) and w.strip()
                                                      for w in words)):
        raise DataError(f"{record.where}: {s.tokens_field!r} must be a non-empty list of "
                        "non-empty strings (words)")
    if not isinstance(tags, list) or len(tags) != len(words):
        raise DataError(f"{record.where}: {s.tags_field!r} must be a list with one tag per word "
                        f"({len(words)} words, got {tags!r:.80})")
    return words, tags


def align(offsets, spans, tags):
    """Labels per token: the tag of a word on the first token that overlaps it, -100 on the
    word's other tokens, on special tokens and on tokens of only white space.

    :param offsets: ``(start, end)`` characters of each token in the joined text.
    :param spans: ``(start, end)`` characters of each word.
    """
    labels, word, done = [], 0, set()
    for start, end in offsets:
        while word < len(spans) and spans[word][1] <= start:
            word += 1
        overlaps = end > start and word < len(spans) and spans[word][0] < end
        labels.append(tags[word] if overlaps and word not in done else heads.IGNORE)
        if overlaps:
            done.add(word)
    return labels


def join(words):
    """The words joined by spaces, and each word's character span."""
    spans, at = [], 0
    for w in words:
        spans.append((at, at + len(w)))
        at += len(w) + 1
    return " ".join(words), spans


@hookimpl
def plugtune_tokenize(records, tokenizer, recipe, split):
    s = recipe[NAME]
    pairs = [words_and_tags(r, s) for r in records]
    tag_ids = heads.label_ids(recipe, NAME, records, [tags for _, tags in pairs], split)
    if not getattr(tokenizer, "is_fast", True):
        raise DataError(f"{NAME}: the tokenizer of {recipe.model.name} is not a fast (Rust) "
                        "tokenizer, so sub-words cannot be matched to words; give one with "
                        "model.tokenizer")
    examples, truncated = [], 0
    for (words, _), ids in zip(pairs, tag_ids):
        text, spans = join(words)
        enc, cut = heads.encode(tokenizer, text, recipe.train.max_length,
                                return_offsets_mapping=True)
        truncated += cut
        examples.append({"input_ids": enc["input_ids"],
                         "labels": align(enc["offset_mapping"], spans, ids)})
    return Tokenized(examples, heads.collator(tokenizer, per_token=True), truncated, records)


@hookimpl
def plugtune_compute_loss(model, batch):
    return heads.loss(model, batch)


@hookimpl
def plugtune_count_targets(batch):
    return count_labels(batch["labels"])


def metrics(labels, predictions, names):
    """Entity-level micro precision, recall and F1, F1 per entity type (``f1/TYPE``) and word
    accuracy, from per-word tag ids (seqeval)."""
    from seqeval.metrics import accuracy_score, classification_report

    gold = [[names[i] for i in seq] for seq in labels]
    guess = [[names[i] for i in seq] for seq in predictions]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a set without entities makes numpy warn about means
        report = classification_report(gold, guess, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    out = {"entity_precision": float(micro["precision"]), "entity_recall": float(micro["recall"]),
           "entity_f1": float(micro["f1-score"]), "accuracy": float(accuracy_score(gold, guess))}
    for kind, row in report.items():
        if not kind.endswith(" avg"):
            out[f"f1/{kind}"] = float(row["f1-score"])
    return out


@hookimpl
def plugtune_evaluate(run, model, split):
    return metrics(*heads.predict(run, model, split), heads.labels_of(run.recipe, NAME))
