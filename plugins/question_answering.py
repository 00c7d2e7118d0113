"""Extractive question answering: a new head (transformers' ``AutoModelForQuestionAnswering``,
``qa_outputs``) learns where the answer to a question starts and ends in a context.

Records are SQuAD's: ``{"context", "question", "answers": {"text": [...], "answer_start":
[...]}}`` (character offsets into the context; the first answer trains, every answer counts in
evaluation). A context too long for ``train.max_length`` tokens (with the question) is split
into overlapping windows, ``question_answering.stride`` tokens shared between neighbours
(Hugging Face's ``run_qa.py`` way: ``return_overflowing_tokens``); a window that does not hold
the answer learns to point at its first token. Evaluation takes, per record, the best-scoring
span over all its windows (start logit + end logit, the end not before the start, at most
``max_answer_length`` tokens, inside the context), maps it back to the context's text through
the tokenizer's offsets, and reports SQuAD v1.1's exact match and F1 (0-1).

The loss is the start and end cross-entropies, halved (as transformers' QA models do, so the
figures compare with theirs), summed over windows; its count is the number of windows.

Composes like the other heads: ``full``, ``freeze`` (the head always trains), ``lora`` (the
head trains in full and is saved with the adapter, peft's ``QUESTION_ANS`` task).
"""
import collections
import re
import string

import torch
from pydantic import Field

from plugtune import Section, hookimpl
from plugtune.data import Tokenized, check_each, eval_batches, pad
from plugtune.errors import DataError
from plugtune.loss import Loss, count_labels, cross_entropy
from plugtune.plugins import head_family as heads

NAME = "question_answering"
#: ``position-targets``: its targets are token positions of the input (the answer's start and
#: end), so a method that puts tokens before the input (prompt_tuning) refuses.
PLUGTUNE_ROLES = {"task", "position-targets"}

# the hook implementations every head shares, as this plugin's own
HEAD = heads.Head(NAME, "AutoModelForQuestionAnswering")
plugtune_model_class = HEAD.plugtune_model_class
plugtune_select_trainable = HEAD.plugtune_select_trainable
POSITIONS = ("start_positions", "end_positions")


class QuestionAnsweringSection(Section):
    context_field: str = Field("context", description="the record field holding the context")
    question_field: str = Field("question", description="the record field holding the question")
    answers_field: str = Field("answers", description="the record field holding {text: [...], "
                               "answer_start: [...]}")
    stride: int = Field(64, gt=0, description="tokens shared by neighbouring windows of a long "
                        "context")
    max_answer_length: int = Field(30, gt=0, description="longest answer span, in tokens")
    n_best: int = Field(20, gt=0, description="start and end candidates tried per window")


@hookimpl
def plugtune_recipe_sections(register):
    register(NAME, QuestionAnsweringSection)


@hookimpl
def plugtune_check_recipe(recipe):
    problems = heads.check(recipe, NAME)
    if recipe[NAME].stride >= recipe.train.max_length:
        problems.append(f"{NAME}.stride: {recipe[NAME].stride} tokens shared between windows "
                        f"must be fewer than train.max_length ({recipe.train.max_length})")
    return problems


@hookimpl
def plugtune_check_records(recipe, split, records):
    """Records with a context, a question and answers found in the context (a training
    record needs an answer)."""
    return check_each(records, lambda r: parse(r, recipe[NAME], need_answer=split == "train"))


def parse(record, s, need_answer=True):
    """``(context, question, [(text, start), ...])`` of a record, or a DataError naming it."""
    needs = (f"{s.context_field!r}, {s.question_field!r} and {s.answers_field!r} "
             "({text: [...], answer_start: [...]})")
    context = heads.field(record, s.context_field, NAME, needs)
    question = heads.field(record, s.question_field, NAME, needs)
    answers = heads.field(record, s.answers_field, NAME, needs)
    for key, value in ((s.context_field, context), (s.question_field, question)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{record.where}: {key!r} must be a non-empty string")
    texts = answers.get("text") if isinstance(answers, dict) else None
    starts = answers.get("answer_start") if isinstance(answers, dict) else None
    if not (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)
            and all(isinstance(t, str) for t in texts)
            and all(isinstance(a, int) and not isinstance(a, bool) for a in starts)):
        raise DataError(f"{record.where}: {s.answers_field!r} must be {{\"text\": [strings], "
                        "\"answer_start\": [character offsets]}, one offset per text")
    if need_answer and not texts:
        raise DataError(f"{record.where}: a training record needs an answer (answers.text is "
                        "empty)")
    for text, start in zip(texts, starts):
        if context[start:start + len(text)] != text:
            raise DataError(f"{record.where}: answer {text!r} is not at character {start} of the "
                            f"context (found {context[start:start + len(text)]!r}); fix "
                            "answer_start")
    return context, question, list(zip(texts, starts))


def windows(tokenizer, question, context, max_length, stride, where):
    """The tokenizer's encoding of ``question`` + ``context`` cut into overlapping windows."""
    if not getattr(tokenizer, "is_fast", True):
        raise DataError(f"{NAME}: the tokenizer is not a fast (Rust) tokenizer, so answers "
                        "cannot be mapped to tokens; give one with model.tokenizer")
    try:
        return tokenizer(question, context, truncation="only_second", max_length=max_length,
                         stride=stride, return_overflowing_tokens=True,
                         return_offsets_mapping=True)
    except Exception as exc:  # the question alone is longer than max_length
        raise DataError(f"{where}: cannot fit the question and a window of context in "
                        f"train.max_length={max_length} tokens with stride {stride} ({exc}); "
                        "raise train.max_length or lower question_answering.stride") from exc


def answer_tokens(offsets, in_context, start, end):
    """Token indices ``(first, last)`` of the characters ``[start, end)`` in one window, or
    ``(0, 0)`` (the first token) when the window does not hold the whole answer."""
    tokens = [i for i, inside in enumerate(in_context) if inside]
    if not tokens or offsets[tokens[0]][0] > start or offsets[tokens[-1]][1] < end:
        return 0, 0
    first = next(i for i in tokens if offsets[i][1] > start)
    last = next(i for i in reversed(tokens) if offsets[i][0] < end)
    return first, last


@hookimpl
def plugtune_tokenize(records, tokenizer, recipe, split):
    s, max_length = recipe[NAME], recipe.train.max_length
    examples = []
    for index, record in enumerate(records):
        context, question, answers = parse(record, s, need_answer=split == "train")
        enc = windows(tokenizer, question, context, max_length, s.stride, record.where)
        for w, ids in enumerate(enc["input_ids"]):
            in_context = [sid == 1 for sid in enc.sequence_ids(w)]
            offsets = [tuple(o) for o in enc["offset_mapping"][w]]
            text, start = answers[0] if answers else ("", 0)
            first, last = answer_tokens(offsets, in_context, start, start + len(text)) \
                if answers else (0, 0)
            example = {"input_ids": ids, "start_positions": first, "end_positions": last,
                       "offsets": [o if inside else None for o, inside in zip(offsets, in_context)],
                       "record": index, "context": context, "answers": [a for a, _ in answers]}
            if "token_type_ids" in enc:
                example["token_type_ids"] = enc["token_type_ids"][w]
            examples.append(example)
    # nothing is cut: a long context's windows cover all of it
    return Tokenized(examples, collator(tokenizer), 0, records)


def collator(tokenizer):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = tokenizer.padding_side == "left"

    def collate(examples):
        ids = [e["input_ids"] for e in examples]
        batch = {"input_ids": pad(ids, pad_id, left=left),
                 "attention_mask": pad([[1] * len(i) for i in ids], 0, left=left)}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = pad([e["token_type_ids"] for e in examples], 0, left=left)
        shift = [batch["input_ids"].shape[1] - len(i) if left else 0 for i in ids]
        for key in POSITIONS:
            batch[key] = torch.tensor([e[key] + d for e, d in zip(examples, shift)])
        if left:
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch

    return collate


def logits(model, batch):
    out = model(**{k: v for k, v in batch.items() if k not in POSITIONS})
    return out.start_logits, out.end_logits


@hookimpl
def plugtune_compute_loss(model, batch):
    start, end = logits(model, batch)
    s = cross_entropy(start, batch["start_positions"])
    e = cross_entropy(end, batch["end_positions"])
    return Loss((s.sum + e.sum) / 2, s.count)


@hookimpl
def plugtune_count_targets(batch):
    return count_labels(batch["start_positions"])


def best_span(start_logits, end_logits, offsets, n_best, max_answer_length):
    """``(score, (start_char, end_char))`` of the best span of one window inside its context,
    or None."""
    best = None
    starts = sorted(range(len(start_logits)), key=lambda i: -start_logits[i])[:n_best]
    ends = sorted(range(len(end_logits)), key=lambda i: -end_logits[i])[:n_best]
    for i in starts:
        for j in ends:
            if offsets[i] is None or offsets[j] is None or j < i or j - i + 1 > max_answer_length:
                continue
            score = start_logits[i] + end_logits[j]
            if best is None or score > best[0]:
                best = (score, (offsets[i][0], offsets[j][1]))
    return best


def predict(run, model, split):
    """``(predicted text, gold answers)`` per record of ``split``: the best span over all of
    its windows, as text of its context. Each process scores its share of the batches; the
    windows' best spans are gathered, so every process gets every record's answer."""
    data, s = run.data[split], run.recipe[NAME]
    found = []  # (record, score, text) of each window's best span
    with torch.no_grad():
        for chunk, batch in eval_batches(run, split):
            with run.accelerator.autocast():
                start, end = logits(model, batch)
            width = batch["input_ids"].shape[1]
            for e, st, en in zip(chunk, start.float().tolist(), end.float().tolist()):
                pad = width - len(e["input_ids"])  # left padding shifts the tokens
                shift = pad if run.tokenizer.padding_side == "left" else 0
                span = best_span(st[shift:shift + len(e["input_ids"])],
                                 en[shift:shift + len(e["input_ids"])], e["offsets"], s.n_best,
                                 s.max_answer_length)
                if span is not None:
                    found.append((e["record"], span[0], e["context"][span[1][0]:span[1][1]]))
    best = {}
    for record, score, text in run.gather(found):
        if record not in best or score > best[record][0]:
            best[record] = (score, text)
    gold = {e["record"]: e["answers"] for e in data.examples}
    return [(best.get(r, (None, ""))[1], answers) for r, answers in gold.items()]


# SQuAD v1.1's official scoring (evaluate-v1.1.py), written out here: the `evaluate` and
# `datasets` metric scripts that hold it are downloaded at run time, which plugtune avoids.
def normalize_answer(text):
    """Lower case; no punctuation, articles (a, an, the) or repeated white space."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def f1_score(prediction, truth):
    guess, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((collections.Counter(guess) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(guess), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(pairs):
    """SQuAD exact match and F1 (0-1): each prediction against its best gold answer. A record
    without answers scores 1 for an empty prediction (SQuAD v2's rule), else 0."""
    em = f1 = 0.0
    for prediction, answers in pairs:
        answers = answers or [""]
        em += max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)
        f1 += max(f1_score(prediction, a) if a else float(not prediction) for a in answers)
    n = max(len(pairs), 1)
    return {"exact_match": em / n, "f1": f1 / n}


@hookimpl
def plugtune_evaluate(run, model, split):
    return squad_metrics(predict(run, model, split))


@hookimpl
def plugtune_estimate_memory(plan):
    """The planner's batch: a start and an end position per window, not a label per token."""
    plan.make_batch = heads.meta_batch(*POSITIONS)
