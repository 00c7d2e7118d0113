"""What preference objectives share (plugin API 1.1): the ``dpo`` and ``orpo`` plugins use it,
and any other pairwise objective (a reward model, a stranger's loss) can too. Not a plugin
itself.

**Records** (:func:`check_pair`, :func:`check_records`) are ``{"prompt", "chosen",
"rejected"}``: three strings, or a conversation — ``prompt`` a list of ``{"role", "content"}``
messages, ``chosen`` and ``rejected`` each a string (one assistant answer) or a list of
assistant messages — rendered with the tokenizer's chat template.

**Pairs** (:func:`encode_pair`, :func:`truncate_pair`, :func:`tokenize`): the chosen and the
rejected answer share the prompt's tokens. A string prompt starts as ``causal_lm`` starts a
prompt (the tokenizer's BOS token, :func:`plugtune.plugins.lm_family.special_prefix`) and a
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
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt

from plugtune.data import Record, Tokenized, check_each, pad
from plugtune.errors import DataError, PlugtuneError
from plugtune.loss import IGNORE
from plugtune.plugins import lm_family, peft_family
from plugtune import Section

if TYPE_CHECKING:
    import torch

    from plugtune import Recipe, Run

class PairSection(Section):
    """The keys every preference objective's section has (subclass it): how a record longer
    than ``train.max_length`` is cut (:func:`truncate_pair`) and the roles a conversation may
    use."""

    max_prompt_length: PositiveInt | None = Field(
        None, description="a record longer than train.max_length keeps this many of its "
        "prompt's last tokens, then its answers' first tokens; default max_length // 2")
    roles: list[str] = Field(list(lm_family.ROLES), min_length=1, description="the roles a "
                             "conversation may use (those the model's chat template knows)")


class ReferenceSection(PairSection):
    """:class:`PairSection` for an objective with a reference model: also whether dropout is
    turned off (the section adds its own ``reference`` key, the modes it takes)."""

    disable_dropout: bool = Field(True, description="turn dropout off in the model (TRL's "
                                  "default), so the policy and reference passes agree")


def prompt_length_problems(recipe: "Recipe", name: str) -> list[str]:
    """The ``check_recipe`` line for a ``NAME.max_prompt_length`` that leaves no room for the
    answers within ``train.max_length``."""
    cap, room = recipe[name].max_prompt_length, recipe.train.max_length
    if cap is None or cap < room:
        return []
    return [f"{name}.max_prompt_length: {cap} leaves no room for the answers within "
            f"train.max_length={room}; make it smaller"]


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
               roles: tuple[str, ...] | list[str] = lm_family.ROLES) -> None:
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
        lm_family.check_messages(answer, f"{where}: \"{key}\"", roles)
    if isinstance(prompt, list):
        if prompt:
            lm_family.check_messages(prompt + [{"role": "assistant", "content": ""}],
                                     f"{where}: \"prompt\"", roles)
        else:
            raise DataError(f"{where}: \"prompt\" is an empty list of messages; give at least "
                            "the user's turn")
    if data["chosen"] == data["rejected"]:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are the same, so there is "
                        "nothing to prefer; drop the record or fix one of the answers")


def check_records(records: list[Record],
                  roles: tuple[str, ...] | list[str] = lm_family.ROLES) -> list[str]:
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
    ids, _ = lm_family.encode_messages(tokenizer, prompt + turns, where, roles)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise DataError(f"{where}: the chat template renders the prompt differently when an "
                        "answer follows, so the answer's tokens cannot be told apart")
    return ids[len(prompt_ids):]


def encode_pair(data: dict[str, Any], tokenizer: Any, where: str, prefix: list[int] | None = None,
                roles: tuple[str, ...] | list[str] = lm_family.ROLES
                ) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` of a preference record (checked first by
    :func:`check_pair`). ``prefix``: what a string prompt starts with (default
    :func:`plugtune.plugins.lm_family.special_prefix` of the tokenizer); string answers end
    with the end-of-sequence token."""
    check_pair(data, where, roles)
    prompt = data["prompt"]
    if isinstance(prompt, str):
        start = lm_family.special_prefix(tokenizer) if prefix is None else list(prefix)
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
             roles: tuple[str, ...] | list[str] = lm_family.ROLES,
             echo: Callable[[str], object] = print, keep: tuple[str, ...] = ()) -> Tokenized:
    """What a preference plugin's ``plugtune_tokenize`` returns: each record's pair
    (:func:`encode_pair`), truncated at ``train.max_length`` (:func:`truncate_pair`; counted
    in ``Tokenized.truncated``), the pairs that cannot be kept dropped and said in one line
    through ``echo``, batched by :func:`collator`. A split left with no pair is an error.
    ``keep``: record fields copied into each example where the record has them (a reward
    model's per-pair ``margin``)."""
    max_length, prefix = recipe.train.max_length, lm_family.special_prefix(tokenizer)
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
        batch = {"input_ids": pad(ids, pad_id), "labels": pad(labels, IGNORE),
                 "attention_mask": pad([[1] * len(i) for i in ids], 0)}
        if all("reference_chosen" in e for e in examples):
            batch[REFERENCE_KEY] = torch.tensor(
                [e["reference_chosen"] for e in examples]
                + [e["reference_rejected"] for e in examples], dtype=torch.float32)
        return batch
    return collate


def count_pairs(batch: dict[str, Any]) -> int:
    """The pairs of a :func:`collator` batch (half its rows): the count a pairwise task's loss
    gives, known before the forward (``plugtune_count_targets``)."""
    return int(batch["input_ids"].shape[0]) // 2


def split_rows(values: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(chosen, rejected)`` halves of per-row values of a :func:`collator` batch."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


# ---------------------------------------------------------------------------------------------
# Log-probabilities of the answers.
# ---------------------------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def sequence_logps(model: Any, batch: dict[str, Any], chunk_tokens: int | None = None,
                   select: bool | None = None, forward: Any = None
                   ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(logps, counts)``: each row's log-probability of its labelled tokens (its answer),
    summed in float32, and how many tokens that is (for length-normalized losses: divide).

    The output layer's input is captured (:func:`plugtune.plugins.lm_family.final_hidden_states`)
    and only the answers' positions (on a CPU; every position on a GPU, where selecting waits
    for the device) go through the output layer, ``chunk_tokens`` at a time (default: chunks
    of at most 128 MiB of float32 logits), each chunk's log-softmax recomputed in backward
    rather than kept: a micro-batch's ``rows x length x vocabulary`` float32 logits are never
    held. A model that rescales its logits in a way not repeated here runs whole. ``select``:
    only the answers' positions meet the output layer (default: on a CPU). ``forward``: a
    context the model's forward pass alone runs in (the autocast that accelerate gives a
    prepared model's forward, for a model it did not prepare)."""
    import torch
    import torch.utils.checkpoint

    inputs: dict[str, Any] = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if "attention_mask" in inputs:  # (without one transformers reads packed sequences from
        inputs["use_cache"] = False  # the positions, a host sync the planner cannot make)
    labels = batch["labels"]
    width = labels.shape[1]
    head = lm_family.output_layer(model)
    transform = lm_family.logit_transform(model) if head is not None else "other"
    forward = forward if forward is not None else contextlib.nullcontext()
    if transform == "other":
        with forward:
            hidden, head = model(**inputs).logits[:, -width:], None
    else:
        with lm_family.final_hidden_states(model) as captured, forward:
            model(**inputs)
        hidden = captured[0][:, -width:]  # an adapter's virtual tokens come first
    softcap = (_unwrap(model).config.final_logit_softcapping if transform == "softcap"
               else None)
    hidden, targets = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    valid = targets != IGNORE
    rows = torch.arange(targets.shape[0], device=hidden.device)[:, None].expand_as(targets)
    if select is None:
        select = hidden.device.type == "cpu"
    if select:  # only the answers' positions meet the output layer
        states, picked, owner, weight = hidden[valid], targets[valid], rows[valid], None
    else:
        states, picked = hidden.flatten(0, -2), targets.clamp(min=0).flatten()
        owner, weight = rows.flatten(), valid.flatten().float()

    def piece(h: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        logits = (head(h) if head is not None else h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)

    if chunk_tokens is None:
        chunk_tokens = lm_family.chunk_tokens("auto", model) or max(len(picked), 1)
    parts = [piece(states[:0], picked[:0])]  # keeps the graph when there is nothing to score
    for i in range(0, len(picked), chunk_tokens):
        h, t = states[i:i + chunk_tokens], picked[i:i + chunk_tokens]
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False))
        else:
            parts.append(piece(h, t))
    per_token = torch.cat(parts)
    if weight is not None:
        per_token = per_token * weight
    logps = torch.zeros(targets.shape[0], device=hidden.device, dtype=torch.float32)
    logps = logps.index_add(0, owner, per_token)
    return logps, valid.sum(1).float()


# ---------------------------------------------------------------------------------------------
# The reference.
# ---------------------------------------------------------------------------------------------

#: Reference modes: ``adapter`` (the policy with its adapter disabled, or the starting
#: adapter frozen), ``copy`` (a frozen copy of the model as loaded), ``precompute`` (reference
#: log-probabilities computed once before training, kept in the run directory), ``none``.
REFERENCES = ("auto", "adapter", "copy", "precompute", "none")

#: The file of the run directory that holds precomputed reference log-probabilities.
PRECOMPUTED = "reference_logps.safetensors"

_copies: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def resolve_reference(recipe: "Recipe", setting: str, reference_free: bool = False) -> str:
    """The reference mode ``setting`` stands for: ``auto`` is ``none`` for a reference-free
    loss, ``adapter`` with an adapter method, else ``copy``."""
    if setting != "auto":
        return setting
    if reference_free:
        return "none"
    return "adapter" if peft_family.adapter_of(recipe) else "copy"


def reference_problems(recipe: "Recipe", key: str, setting: str,
                       reference_free: bool = False) -> list[str]:
    """What is wrong with the reference ``setting`` (recipe key ``key``) for ``recipe``: one
    line each (for ``plugtune_check_recipe``), and packing, which the pair batches do not
    support."""
    mode, adapter = resolve_reference(recipe, setting, reference_free), peft_family.adapter_of(
        recipe)
    problems = []
    if recipe.train.packing:
        problems.append("train.packing: preference pairs are batched as chosen and rejected "
                        "rows, not packed; set train.packing: false (train.group_by_length "
                        "cuts padding instead)")
    if reference_free and mode != "none":
        problems.append(f"{key}: {setting}: this loss needs no reference model; set it to "
                        "none (or leave it auto)")
    if not reference_free and mode == "none":
        problems.append(f"{key}: none: this loss compares the policy with a reference model; "
                        "use auto, adapter, copy or precompute (or a reference-free loss: "
                        "simpo, orpo)")
    if mode == "adapter" and not adapter:
        problems.append(f"{key}: adapter: the reference is the model with its adapter "
                        "disabled, and the recipe has no adapter method; add one (lora, ...) "
                        "or use copy or precompute")
    if mode == "copy" and adapter:
        problems.append(f"{key}: copy: with the adapter method {adapter} the base itself is "
                        "the reference (use adapter: no second copy of the model is needed)")
    return problems


def freeze_copy(model: Any, recipe: "Recipe") -> None:
    """Keep a frozen copy of ``model`` as it is now (loaded, before any step) as its
    reference (``copy`` mode), for :func:`reference_logps`."""
    import copy

    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    _copies[model] = frozen


@contextlib.contextmanager
def _reference_adapter(model: Any) -> Iterator[None]:
    """Within the block the frozen starting adapter is active; after it the trained one is
    again, every parameter's ``requires_grad`` as it was (peft's ``set_adapter`` marks the
    active adapter trainable)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    trained = model.active_adapter
    model.set_adapter(peft_family.REFERENCE_ADAPTER)
    try:
        yield
    finally:
        model.set_adapter(trained)
        for p, flag in flags:
            p.requires_grad_(flag)


def load_reference_adapter(model: Any, recipe: "Recipe") -> None:
    """Load the starting adapter (``model.adapter``) a second time, frozen, as
    :data:`peft_family.REFERENCE_ADAPTER` (TRL's ``ref_adapter_name``), where it is not yet."""
    import warnings

    base = _unwrap(model)
    if peft_family.REFERENCE_ADAPTER in base.peft_config:
        return
    flags = [(p, p.requires_grad) for p in base.parameters()]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        base.load_adapter(str(peft_family.start_adapter(recipe)),
                          adapter_name=peft_family.REFERENCE_ADAPTER, is_trainable=False)
    for p, flag in flags:
        p.requires_grad_(flag)
    for name, module in base.named_modules():  # a frozen reference drops nothing
        if name.endswith(f".{peft_family.REFERENCE_ADAPTER}") and hasattr(module, "p"):
            module.p = 0.0


def _autocast(recipe: "Recipe", device: "torch.device") -> Any:
    import torch

    precision = recipe.train.mixed_precision
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16"
                          else torch.float16)


def reference_logps(model: Any, batch: dict[str, Any], recipe: "Recipe") -> "torch.Tensor":
    """Each row's reference log-probability of its answer, without gradients: the batch's
    precomputed :data:`REFERENCE_KEY` where it has one; else the frozen copy of the model
    (:func:`freeze_copy`); else, for a peft model, the starting adapter frozen (where the run
    starts from one: ``model.adapter``) or the adapter disabled (``disable_adapter()``)."""
    import torch

    if REFERENCE_KEY in batch:
        return batch[REFERENCE_KEY]
    if batch["input_ids"].device.type == "meta":  # the planner: a pass without gradients
        # keeps nothing for backward
        return torch.zeros(batch["input_ids"].shape[0], device="meta")
    base = _unwrap(model)
    with torch.no_grad():
        frozen = _copies.get(base)
        if frozen is not None:
            device = batch["input_ids"].device
            if next(frozen.parameters()).device != device:
                frozen.to(device)
            # as a prepared model: the forward pass under the run's autocast, the rest not
            return sequence_logps(frozen, batch, forward=_autocast(recipe, device))[0]
        if not hasattr(base, "disable_adapter") and peft_family.adapter_of(recipe):
            # an adapter run's base without its adapter (``plugtune eval --baseline``): it is
            # its own reference
            return sequence_logps(model, batch)[0]
        if not hasattr(base, "disable_adapter"):
            raise PlugtuneError("no reference model: a fully fine-tuned model keeps no copy of "
                                "the model it started from after training, so its preference "
                                "loss and rewards cannot be evaluated here (the run's own "
                                "evaluations are in its metrics.jsonl)")
        if recipe.model.adapter is not None:
            load_reference_adapter(base, recipe)
            with _reference_adapter(base):
                return sequence_logps(model, batch)[0]
        with base.disable_adapter():
            return sequence_logps(model, batch)[0]


def _current_or_reference(model: Any, batch: dict[str, Any], recipe: "Recipe") -> "torch.Tensor":
    """The reference before the first step: the model as it is (it is the reference then),
    except a peft model started afresh, whose reference is its base (adapter disabled)."""
    import torch

    base = _unwrap(model)
    if hasattr(base, "disable_adapter") and recipe.model.adapter is None:
        return reference_logps(model, batch, recipe)
    with torch.no_grad():
        return sequence_logps(model, batch)[0]


def precompute(run: "Run", echo: Callable[[str], object] = print) -> None:
    """``precompute`` mode, at ``plugtune_train_start``: every split's reference
    log-probabilities, computed once before the first step (with the model in eval mode) and
    kept in the examples (the collator puts them in the batch) and in the run directory's
    :data:`PRECOMPUTED`; a resumed run reads them from there and computes nothing (its model
    has trained). No reference weights stay in memory."""
    from safetensors.torch import load_file, save_file

    from plugtune.data import eval_batch_size

    path = Path(run.dir) / PRECOMPUTED if run.dir is not None else None
    if path is not None and path.is_file():
        saved = load_file(path)
        for split, data in run.data.items():
            chosen, rejected = saved.get(f"{split}.chosen"), saved.get(f"{split}.rejected")
            if chosen is None or rejected is None or len(chosen) != len(data.examples):
                raise DataError(f"{path}: holds no reference log-probabilities for the "
                                f"{len(data.examples)} pairs of the {split} split (the data "
                                "changed?); start a new run")
            _keep(data.examples, chosen.tolist(), rejected.tolist())
        echo(f"reference: log-probabilities read from {path}")
        return
    if run.step > 0 and path is None:
        raise DataError("dpo.reference: precompute: only the main process reads the reference "
                        "log-probabilities back on resume; resume this run in one process")
    if run.step > 0:
        raise DataError(f"{path}: missing, and the model has trained since; the reference "
                        "log-probabilities cannot be computed again (start a new run)")
    model, device, size = run.model, run.accelerator.device, eval_batch_size(run.recipe)
    training = model.training
    model.eval()
    tensors = {}
    try:
        for split, data in run.data.items():
            values = []
            for i in range(0, len(data.examples), size):
                chunk = [{k: v for k, v in e.items() if not k.startswith("reference_")}
                         for e in data.examples[i:i + size]]
                batch = {k: v.to(device) for k, v in data.collate(chunk).items()}
                # as in a training step: the prepared model's forward under the run's
                # autocast, the output layer not
                values.append(_current_or_reference(model, batch, run.recipe).float().cpu())
            chosen, rejected = _halves(values)
            tensors[f"{split}.chosen"], tensors[f"{split}.rejected"] = chosen, rejected
            _keep(data.examples, chosen.tolist(), rejected.tolist())
    finally:
        model.train(training)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp)
        tmp.replace(path)
    echo(f"reference: log-probabilities of {sum(len(d.examples) for d in run.data.values())} "
         f"pairs computed once -> {PRECOMPUTED}")


def _halves(values: list["torch.Tensor"]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-pair chosen and rejected values from per-batch row values (each batch: its chosen
    rows, then its rejected rows)."""
    import torch

    chosen = [v[:len(v) // 2] for v in values]
    rejected = [v[len(v) // 2:] for v in values]
    if not values:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def _keep(examples: list[dict[str, Any]], chosen: list[float], rejected: list[float]) -> None:
    for e, c, r in zip(examples, chosen, rejected):
        e["reference_chosen"], e["reference_rejected"] = c, r


# ---------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------


def reward_metrics(chosen_rewards: "torch.Tensor", rejected_rewards: "torch.Tensor",
                   chosen_logps: "torch.Tensor", rejected_logps: "torch.Tensor"
                   ) -> dict[str, "torch.Tensor"]:
    """TRL's preference metrics, each summed over the micro-batch's pairs (the core divides by
    the pairs, as it does the loss): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` (the share of pairs whose chosen reward is the
    higher), ``logps/chosen``, ``logps/rejected`` (summed answer log-probabilities)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(),
            "rewards/margins": (c - r).sum(), "rewards/accuracies": (c > r).float().sum(),
            "logps/chosen": chosen_logps.detach().float().sum(),
            "logps/rejected": rejected_logps.detach().float().sum()}


def pair_loss(total: "torch.Tensor", pairs: int, metrics: dict[str, "torch.Tensor"]) -> Any:
    """``plugtune.Loss(total, pairs, metrics=metrics)``: the objective is the mean over the
    optimizer step's pairs."""
    from plugtune import Loss

    return Loss(total, pairs, metrics=dict(metrics))


def disable_dropout(model: Any) -> None:
    """Set every dropout probability of ``model`` to 0 (TRL's ``disable_dropout``): the
    policy's pass and the reference's then see the same network."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------
# The planner.
# ---------------------------------------------------------------------------------------------


def pair_batch(batch_size: int, seq_len: int) -> dict[str, "torch.Tensor"]:
    """A preference batch on the meta device (``Plan.make_batch``): ``batch_size`` pairs, so
    twice as many rows (chosen and rejected), every row ``seq_len`` tokens."""
    import torch

    ids = torch.zeros(2 * batch_size, seq_len, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids}  # no padding: no mask (nor its host sync)


def plan_memory(plan: Any, recipe: "Recipe", mode: str) -> None:
    """What a preference objective adds to ``plugtune plan``: every pair is two sequences (the
    traced batch has a chosen and a rejected row per pair, so activations and logits count
    twice per planned sequence); the reference: a frozen copy of the loaded weights
    (``copy``), the starting adapter's weights a second time (``adapter`` with
    ``model.adapter``), nothing per step for ``adapter`` (the base, adapter disabled),
    ``precompute`` (log-probabilities, 8 bytes a pair) and ``none``."""
    plan.make_batch = pair_batch
    plan.loss_chunk_tokens = lm_family.chunk_tokens("auto", plan.model)
    plan.notes.append("preference pairs: each planned sequence is a chosen and a rejected row")
    if mode == "copy":
        nbytes = sum(p.bytes for p in plan.params if not p.added)
        plan.add("reference model (frozen copy)", nbytes, "the loaded weights again, frozen; "
                 "reference: precompute needs none")
    elif mode == "adapter" and recipe.model.adapter is not None:
        nbytes = sum(p.bytes for p in plan.params if p.added and p.trainable)
        plan.add("reference adapter (frozen)", nbytes, "model.adapter loaded a second time")
    elif mode == "precompute":
        plan.notes.append("reference: log-probabilities computed once before training; no "
                          "reference weights are kept")


def fit_variants(recipe: "Recipe", name: str, mode: str) -> list[Any]:
    """``plan --fit``: where the reference is a frozen copy of the model (full fine-tuning, or
    a plugin freezing part of it), the same recipe with ``reference: precompute`` (the same
    objective, and no copy in memory), ranked just after full fine-tuning: tried after the
    recipe as it is, before anything that trains fewer weights. ``name``: the plugin's
    section."""
    from plugtune import Variant, active_roles

    trainable = active_roles(recipe).get("trainable", [])
    if name not in recipe.plugins or mode != "copy" or not trainable:
        return []
    own = dict(recipe.raw.get(name) or {})
    return [Variant(f"{' + '.join(trainable)}, reference precomputed", Variant.FULL + 1,
                    list(trainable), {name: {**own, "reference": "precompute"}}, override=True)]
