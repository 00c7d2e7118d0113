"""What preference objectives share (plugin API 1.1): the ``dpo`` and ``orpo`` plugins use it,
and any other pairwise objective (a reward model, a stranger's loss) can too. Not a plugin
itself.

**Records** (:func:`check_pair`, :func:`check_records`) are ``{"prompt", "chosen",
"rejected"}``: three strings, or a conversation — ``prompt`` a list of ``{"role", "content"}``
messages, ``chosen`` and ``rejected`` each a string (one assistant answer) or a list of
assistant messages — rendered with the tokenizer's chat template.

**Pairs** (:func:`encode_pair`, :func:`truncate_pair`, :func:`tokenize`): the chosen and the
rejected answer share the prompt's tokens. A string prompt starts as ``causal_lm`` starts a
prompt (the tokenizer's BOS token, :func:`plugtune.plugins.causal_lm.special_prefix`) and a
string answer ends with the end-of-sequence token, as a ``causal_lm`` completion does; a
conversation's answer is the rendering of the whole conversation after the rendering of the
prompt with the generation prompt (so it ends with the template's end-of-turn tokens).
A pair longer than ``train.max_length`` (prompt + its longer answer) is truncated by TRL's
rule: the prompt first, keeping its last ``max_prompt_length`` tokens, then both answers,
keeping their first tokens. A pair whose answers are the same after truncation (nothing left
to prefer), or that cannot fit, is dropped and counted: never silently.

**Batches** (:func:`collator`): the micro-batch's chosen rows, then its rejected rows, in one
padded batch (one forward pass for both, as TRL's ``concatenated_forward``), ``labels`` only
on the answers' tokens. :func:`sequence_logps` returns each row's summed log-probability of
its answer and the answer's token count, never holding a micro-batch's whole float32 logits.

**The reference** (:func:`reference_logps`): the policy with its adapter disabled, a frozen
copy of the starting adapter (:data:`REFERENCE_ADAPTER`), a frozen copy of the model, or
log-probabilities computed once before training (:func:`precompute`).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from plugtune.data import Record, Tokenized, check_each, pad
from plugtune.errors import DataError
from plugtune.loss import IGNORE
from plugtune.plugins import causal_lm

if TYPE_CHECKING:
    import torch

    from plugtune import Recipe

#: The fields of a preference record.
FIELDS = ("prompt", "chosen", "rejected")

#: The batch entry holding precomputed reference log-probabilities (chosen rows, then
#: rejected rows), when the examples carry them (:func:`precompute`).
REFERENCE_KEY = "reference_logps"


# ---------------------------------------------------------------------------------------------
# Records: what `validate` can tell without a tokenizer.
# ---------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return {int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def check_pair(data: dict[str, Any], where: str,
               roles: tuple[str, ...] | list[str] = causal_lm.ROLES) -> None:
    """Raise a one-line :class:`~plugtune.errors.DataError` naming ``where`` unless ``data``
    is a preference record: ``prompt``, ``chosen`` and ``rejected`` present; three strings,
    or a prompt that is a conversation (a list of messages) and answers that are strings or
    lists of assistant messages; the two answers not the same."""
    missing = [k for k in FIELDS if k not in data]
    if missing:
        raise DataError(f"{where}: a preference record needs \"prompt\", \"chosen\" and "
                        f"\"rejected\"; this one has no {', '.join(map(repr, missing))} (it has "
                        f"{sorted(data)}; map other column names with data.columns)")
    prompt = data["prompt"]
    if not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: \"prompt\" must be a string or a list of messages, got "
                        f"{_kind(prompt)}")
    for key in ("chosen", "rejected"):
        answer = data[key]
        if isinstance(answer, str):
            continue
        if not isinstance(answer, list):
            raise DataError(f"{where}: \"{key}\" must be a string or a list of assistant "
                            f"messages, got {_kind(answer)}")
        if isinstance(prompt, str):
            raise DataError(f"{where}: \"{key}\" is a list of messages but \"prompt\" is a "
                            "string; give the prompt as messages too ([{\"role\": \"user\", "
                            "\"content\": ...}])")
        if not answer or not all(isinstance(m, dict) and m.get("role") == "assistant"
                                 for m in answer):
            raise DataError(f"{where}: \"{key}\" must be a string or a non-empty list of "
                            "{\"role\": \"assistant\", \"content\": ...} messages")
        causal_lm.check_messages(answer, f"{where}: \"{key}\"", roles)
    if isinstance(prompt, list):
        if prompt:
            causal_lm.check_messages(prompt + [{"role": "assistant", "content": ""}],
                                     f"{where}: \"prompt\"", roles)
        else:
            raise DataError(f"{where}: \"prompt\" is an empty list of messages; give at least "
                            "the user's turn")
    if data["chosen"] == data["rejected"]:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are the same, so there is "
                        "nothing to prefer; drop the record or fix one of the answers")


def check_records(records: list[Record],
                  roles: tuple[str, ...] | list[str] = causal_lm.ROLES) -> list[str]:
    """What a preference plugin's ``plugtune_check_records`` returns: the first bad record of
    each file (:func:`check_pair`), one line each."""
    return check_each(records, lambda r: check_pair(r.data, r.where, roles))


# ---------------------------------------------------------------------------------------------
# Pairs: token ids, truncation.
# ---------------------------------------------------------------------------------------------


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer(tokenizer: Any, prompt: list[dict[str, Any]], prompt_ids: list[int],
            answer: str | list[dict[str, Any]], where: str,
            roles: tuple[str, ...] | list[str]) -> list[int]:
    """A conversation's answer tokens: what rendering prompt + answer adds to the prompt's
    rendering with the generation prompt."""
    turns = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
    ids, _ = causal_lm.encode_messages(tokenizer, prompt + turns, where, roles)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise DataError(f"{where}: the chat template renders the prompt differently when an "
                        "answer follows, so the answer's tokens cannot be told apart")
    return ids[len(prompt_ids):]


def encode_pair(data: dict[str, Any], tokenizer: Any, where: str, prefix: list[int] | None = None,
                roles: tuple[str, ...] | list[str] = causal_lm.ROLES
                ) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` of a preference record (checked first by
    :func:`check_pair`). ``prefix``: what a string prompt starts with (default
    :func:`plugtune.plugins.causal_lm.special_prefix` of the tokenizer); string answers end
    with the end-of-sequence token."""
    check_pair(data, where, roles)
    prompt = data["prompt"]
    if isinstance(prompt, str):
        start = causal_lm.special_prefix(tokenizer) if prefix is None else list(prefix)
        eos = [tokenizer.eos_token_id]
        return (start + _ids(tokenizer, prompt), _ids(tokenizer, data["chosen"]) + eos,
                _ids(tokenizer, data["rejected"]) + eos)
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: a conversation needs a tokenizer with a chat template; this "
                        "one has none (give prompt, chosen and rejected as strings)")
    prompt_ids = _ids(tokenizer, tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True))
    return (prompt_ids,
            _answer(tokenizer, prompt, prompt_ids, data["chosen"], where, roles),
            _answer(tokenizer, prompt, prompt_ids, data["rejected"], where, roles))


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  max_prompt_length: int | None = None
                  ) -> tuple[list[int], list[int], list[int]] | None:
    """The pair cut to fit ``max_length`` tokens per row (prompt + answer), by TRL's rule:
    when the prompt and the longer answer do not fit, the prompt keeps its last
    ``max_prompt_length`` tokens (default ``max_length // 2``); if they still do not fit, both
    answers keep their first ``max_length - len(prompt)`` tokens. None when the pair cannot be
    kept: no room for an answer token, or the answers are the same once cut."""
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected
    if len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_length - len(prompt)
    if room < 1:
        return None
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        return None
    return prompt, chosen, rejected


def example(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, Any]:
    """A tokenized pair as the data phase keeps it: ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``, and ``input_ids``, both rows end to end (what the core counts as the
    example's tokens and groups by length)."""
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "input_ids": prompt + chosen + prompt + rejected}


def tokenize(records: list[Record], tokenizer: Any, recipe: "Recipe", split: str = "train",
             max_prompt_length: int | None = None,
             roles: tuple[str, ...] | list[str] = causal_lm.ROLES,
             echo: Callable[[str], object] = print, keep: tuple[str, ...] = ()) -> Tokenized:
    """What a preference plugin's ``plugtune_tokenize`` returns: each record's pair
    (:func:`encode_pair`), truncated at ``train.max_length`` (:func:`truncate_pair`; counted
    in ``Tokenized.truncated``), the pairs that cannot be kept dropped and said in one line
    through ``echo``, batched by :func:`collator`. A split left with no pair is an error.
    ``keep``: record fields copied into each example where the record has them (a reward
    model's per-pair ``margin``)."""
    max_length, prefix = recipe.train.max_length, causal_lm.special_prefix(tokenizer)
    examples, truncated, dropped = [], 0, []
    for record in records:
        pair = encode_pair(record.data, tokenizer, record.where, prefix, roles)
        cut = truncate_pair(*pair, max_length, max_prompt_length)
        if cut is None:
            dropped.append(record.where)
            continue
        truncated += cut != pair
        examples.append({**example(*cut), **{k: record.data[k] for k in keep if k in record.data}})
    if dropped:
        echo(f"data: {split} {len(dropped)} pair(s) dropped: their answers are the same once "
             f"cut at train.max_length={max_length} (first: {dropped[0]}); raise "
             "train.max_length or shorten the prompts")
    if records and not examples:
        raise DataError(f"{dropped[0]}: no pair of this split fits train.max_length="
                        f"{max_length} with answers that differ; raise train.max_length")
    return Tokenized(examples, collator(tokenizer.pad_token_id), truncated, records)


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------


def collator(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Batches of pairs: ``input_ids``, ``attention_mask`` and ``labels`` of the chosen rows
    (prompt + chosen answer) then the rejected rows, right padded to the longest row;
    ``labels`` are the answers' tokens (the prompt and padding :data:`IGNORE`). Where the
    examples carry precomputed reference log-probabilities (``reference_chosen`` and
    ``reference_rejected``, :func:`precompute`), :data:`REFERENCE_KEY` holds them in the same
    row order."""
    import torch

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for e in examples:
                ids.append(e["prompt_ids"] + e[side])
                labels.append([IGNORE] * len(e["prompt_ids"]) + e[side])
        batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(i) for i in ids], 0),
                 "labels": pad(labels, IGNORE)}
        if all("reference_chosen" in e for e in examples):
            batch[REFERENCE_KEY] = torch.tensor(
                [e["reference_chosen"] for e in examples]
                + [e["reference_rejected"] for e in examples], dtype=torch.float32)
        return batch
    return collate


def split_rows(values: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(chosen, rejected)`` halves of per-row values of a :func:`collator` batch."""
    half = values.shape[0] // 2
    return values[:half], values[half:]
