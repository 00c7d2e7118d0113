"""Causal language modelling: next-token loss on ``{"text"}`` records, on the completion of
``{"prompt", "completion"}`` records, or on the assistant turns of ``{"messages"}`` records
rendered with the tokenizer's chat template. Where a held-out record has a reference answer
(the completion, or the last assistant turn) evaluation also scores the model's greedy answer
(exact match by default; BLEU, chrF and ROUGE with ``causal_lm.metrics``, see
``_generation_metrics``), and always reports the perplexity (``exp(eval_loss)``)."""
import math
from typing import Literal

import torch
from accelerate.utils import extract_model_from_parallel
from pydantic import Field, PositiveInt

from plugtune import Section, chat, hookimpl
from plugtune.data import REAL_TOKENS, Tokenized, check_each, eval_batch_size, pad
from plugtune.errors import DataError
from plugtune.loss import IGNORE, chunked_cross_entropy, count_labels, cross_entropy
from plugtune.models import read_config
from plugtune.sharding import is_sharded, same_count
from plugtune.plugins import formats, generation_metrics
from plugtune.plugins.generation_metrics import normalize  # noqa: F401  (its old home)
from plugtune.plugins import lm_family
from plugtune.plugins.lm_family import (  # noqa: F401  (defined here before plugin API 1.3)
    CHANGES_LOGITS, CHUNK_BYTES, CHUNK_VOCAB, ROLES, check_messages,
    encode_messages, end_tokens, final_hidden_states, is_learnt, logit_transform, output_layer,
    special_prefix, turn_start)

# the family's helpers under the names this module gave them before plugin API 1.3
_ids, _render, _rendering = lm_family.token_ids, lm_family.render, lm_family.rendering
_json_kind, _compare = lm_family.json_kind, lm_family.compare_logits

PLUGTUNE_ROLES = {"task"}


def chunk_tokens(recipe, model):
    """Labelled tokens per loss chunk for ``model`` under ``causal_lm.loss_chunk_tokens``
    (``recipe`` None: ``auto``), or None for the plain loss (:func:`lm_family.chunk_tokens`)."""
    setting = recipe["causal_lm"].loss_chunk_tokens if recipe is not None else "auto"
    return lm_family.chunk_tokens(setting, model)


class CausalLMSection(Section):
    exact_match: bool = Field(True, description="score exact match of the generated answers "
                              "(false drops it from metrics)")
    metrics: list[Literal[generation_metrics.METRICS]] | None = Field(
        None, description="scores of greedy answers against held-out references: exact_match, "
        "bleu, chrf (sacrebleu), rouge (rouge1/rouge2/rougeL); default [exact_match]")
    max_new_tokens: int = Field(32, gt=0, description="longest generated answer")
    generate_limit: int = Field(100, gt=0, description="held-out records to generate for")
    loss_chunk_tokens: PositiveInt | Literal["auto"] | None = Field(
        "auto", description="run the output layer and the loss this many labelled tokens at "
        "a time, recomputing each chunk in backward, so a micro-batch's float32 logits are "
        "never held whole (same loss and gradients); auto: chunks of at most 128 MiB of "
        f"float32 logits for vocabularies of {CHUNK_VOCAB:,} tokens or more; null: off")
    roles: list[str] = Field(list(ROLES), min_length=1, description="the roles a messages "
                             "record may use (those the model's chat template knows); "
                             "assistant turns are learnt")


@hookimpl
def plugtune_recipe_sections(register):
    register("causal_lm", CausalLMSection)


#: Model types whose attention keeps packed examples apart by their restarting
#: ``position_ids`` alone (transformers builds a block-diagonal mask from them), each verified
#: with a tiny model by tests/test_packing.py. Others are refused with ``train.packing``:
#: OPT, BLOOM, MPT, XGLM and BioGPT build their masks without ``position_ids``, and the
#: state-space and hybrid models (Mamba, Bamba, Jamba, RecurrentGemma, Falcon-H1) carry a
#: recurrent state from one example into the next.
PACKABLE = frozenset({
    "cohere", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_bigcode", "gpt_neox",
    "granite", "llama", "mistral", "mixtral", "olmo", "olmo2", "phi", "phi3", "qwen2",
    "qwen2_moe", "qwen3", "smollm3", "stablelm", "starcoder2"})


def packing_problems(recipe):
    """``train.packing`` on a model type not known to keep packed examples apart, read from the
    model's config (a directory's config.json, a GGUF header, the catalog or the hub) before
    any weight loads. A config that cannot be read is the loader's to report."""
    from plugtune.sources import resolve_source

    if not recipe.train.packing:
        return []
    try:
        kind = read_config(resolve_source(recipe.model.name),
                           trust_remote_code=recipe.model.trust_remote_code).model_type
    except Exception:  # noqa: BLE001 - model.name's own check says what is wrong with it
        return []
    if kind in PACKABLE:
        return []
    return [f"train.packing: {kind} models would let packed examples attend to each other "
            "(their attention ignores the restarting positions, or they carry a recurrent "
            "state from one example into the next); set train.packing: false "
            "(train.group_by_length cuts padding instead)"]


@hookimpl
def plugtune_check_recipe(recipe):
    """Whether the model can be trained on packed rows; the roles ``data.roles_to_train`` and
    ``data.roles`` name are roles of ``causal_lm.roles``."""
    return packing_problems(recipe) + role_problems(recipe)


def role_problems(recipe):
    known, problems = recipe["causal_lm"].roles, []
    tags = formats.tags("sharegpt", recipe.data.roles)
    for role in recipe.data.roles_to_train:
        if role not in known:
            hint = (f"the data's tag {role!r} is the role {tags[role]!r}" if role in tags else
                    "map the data's tags to them with data.roles")
            problems.append(f"data.roles_to_train: {role!r} is not a role; roles are "
                            f"{', '.join(known)} ({hint})")
    for role, names in recipe.data.roles.items():
        if role not in known:
            tag = next(iter([names] if isinstance(names, str) else names), None)
            flip = f"; did you mean {{{tag}: {role}}}?" if tag in known else ""
            problems.append(f"data.roles: {role!r} is not a role; data.roles maps a role to the "
                            f"tag(s) the data uses for it ({{assistant: gpt}}){flip}")
    return problems


@hookimpl
def plugtune_check_records(recipe, records):
    """What ``validate`` can tell of the records without a tokenizer: text fields are strings,
    conversations use known roles, string contents and have an assistant turn."""
    roles, train = recipe["causal_lm"].roles, recipe.data.roles_to_train
    template = recipe.data.chat_template
    template = chat.text_of(template) if template is not None else None

    def check(record):
        check_fields(record.data, record.where)
        check_strings(record.data, record.where)
        if "messages" in record.data:
            check_messages(record.data["messages"], record.where, roles, train)
            if template is not None:
                render_check(template, record.data["messages"], record.where)

    return check_each(records, check)


def render_check(template, messages, where):
    """A DataError naming ``where`` when ``template`` cannot render ``messages`` (e.g. a
    template that wants user and assistant turns to alternate): what ``validate`` can tell of a
    recipe's ``data.chat_template`` before the tokenizer loads."""
    from transformers.utils.chat_template_utils import render_jinja_template

    with _rendering(where):
        render_jinja_template([messages], chat_template=template, bos_token="<s>",
                              eos_token="</s>")


def check_fields(data, where):
    """A DataError unless the record has what a causal-LM example is made of."""
    if not ("text" in data or "messages" in data or {"prompt", "completion"} <= set(data)):
        raise DataError(f"{where}: a causal_lm record needs \"text\", \"prompt\" and "
                        f"\"completion\", or \"messages\"; this one has {sorted(data)} (map "
                        "other column names with data.columns; data.format reads ShareGPT and "
                        "Alpaca records)")


def check_strings(data, where):
    """A DataError unless the text fields of a record are strings (not null, numbers, lists)."""
    for key in ("text", "prompt", "completion"):
        if key in data and not isinstance(data[key], str):
            raise DataError(f"{where}: \"{key}\" must be a string, got {_json_kind(data[key])}")


def encode(record, tokenizer, prefix=(), roles=ROLES, **turns):
    """``(input_ids, labels, prompt_ids or None, reference or None)`` for one record;
    ``prefix`` (see :func:`special_prefix`) starts text and prompt/completion records;
    ``turns``: :func:`encode_messages`' ``train``, ``eos`` and ``ends``."""
    data, eos, prefix = record.data, [tokenizer.eos_token_id], list(prefix)
    check_fields(data, record.where)
    check_strings(data, record.where)
    if "messages" in data:
        ids, labels = encode_messages(tokenizer, data["messages"], record.where, roles, **turns)
        last = data["messages"][-1]
        if last["role"] != "assistant":
            return ids, labels, None, None
        prompt = _ids(tokenizer, _render(tokenizer, data["messages"][:-1], True, record.where))
        return ids, labels, prompt, last["content"]
    if "prompt" in data and "completion" in data:
        prompt = prefix + _ids(tokenizer, str(data["prompt"]))
        answer = _ids(tokenizer, str(data["completion"])) + eos
        return prompt + answer, [IGNORE] * len(prompt) + answer, prompt, str(data["completion"])
    if "text" in data:
        ids = _ids(tokenizer, str(data["text"])) + eos
        return prefix + ids, [IGNORE] * len(prefix) + ids, None, None


def collator(pad_id):
    def collate(examples):
        ids = [e["input_ids"] for e in examples]
        return {"input_ids": pad(ids, pad_id), "labels": pad([e["labels"] for e in examples],
                                                              IGNORE),
                "attention_mask": pad([[1] * len(i) for i in ids], 0)}
    return collate


def rows(lengths, width):
    """Example indices packed into rows of at most ``width`` tokens: first fit, longest first
    (the bin-packing heuristic axolotl's multipack and torchtune use), so rows come out nearly
    full. Each example fits a row alone: tokenization truncates at ``train.max_length``."""
    packed, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r in range(len(packed)) if room[r] >= lengths[i]), None)
        if row is None:
            packed.append([]), room.append(width)
            row = len(packed) - 1
        packed[row].append(i)
        room[row] -= lengths[i]
    return packed


def packed_collator(pad_id, width, one_row=True):
    """Padding-free batches: the micro-batch's examples laid end to end, ``position_ids``
    restarting at each example and no attention mask, which is how transformers is told to keep
    attention inside each example (SDPA gets a block-diagonal causal mask, which the model's
    :data:`~plugtune.plugins.lm_family.PACKED_SDPA` attention replaces by one SDPA per example;
    flash attention its variable-length kernel). The first label of every example is ignored, so
    no token learns to predict its neighbour's start. ``one_row``: every example in one row, no
    position wasted; else (eager attention, whose cost is the row's width squared) rows of at
    most ``width`` tokens, first fit, longest first, those shorter than the longest ending in
    one filler segment (its own positions from 0, ignored labels). ``num_real_tokens``
    (``plugtune.data.REAL_TOKENS``) counts the real tokens."""
    def collate(examples):
        lengths = [len(e["input_ids"]) for e in examples]
        layout = [list(range(len(examples)))] if one_row else rows(lengths, width)
        wide = max(sum(lengths[i] for i in row) for row in layout)
        ids, labels, positions = [], [], []
        for row in layout:
            r_ids, r_labels, r_pos = [], [], []
            for i in row:
                r_ids += examples[i]["input_ids"]
                r_labels += [IGNORE] + list(examples[i]["labels"][1:])
                r_pos += range(lengths[i])
            filler = wide - len(r_ids)
            ids.append(r_ids + [pad_id] * filler)
            labels.append(r_labels + [IGNORE] * filler)
            positions.append(r_pos + list(range(filler)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions),
                REAL_TOKENS: torch.tensor(sum(lengths))}
    return collate


@hookimpl
def plugtune_tokenize(records, tokenizer, recipe):
    max_len, truncated, examples = recipe.train.max_length, 0, []
    prefix, d = special_prefix(tokenizer), recipe.data
    turns = {"train": d.roles_to_train, "eos": d.train_on_eos, "ends": end_tokens(tokenizer)}
    for record in records:
        ids, labels, prompt, reference = encode(record, tokenizer, prefix,
                                                recipe["causal_lm"].roles, **turns)
        if len(ids) > max_len:
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE for label in labels):
            raise DataError(f"{record.where}: nothing left to learn after truncation at "
                            f"train.max_length={max_len}; raise it or shorten the prompt")
        examples.append({"input_ids": ids, "labels": labels, "prompt_ids": prompt,
                         "reference": reference, "reference_tokens": None if reference is None
                         else len(_ids(tokenizer, reference))})
    check_targets(examples, records)
    collate = (packed_collator(tokenizer.pad_token_id, max_len,
                               one_row=recipe.model.attn_implementation != "eager")
               if recipe.train.packing else collator(tokenizer.pad_token_id))
    return Tokenized(examples, collate, truncated, records)


def check_targets(examples, records):
    """A DataError naming the files when no example has a token to predict (a label after
    its first token: ``{"text": ""}`` records with a tokenizer that adds no BOS token are a
    lone end-of-sequence token each). Such data would train nothing, step after step. A few
    such records among others are harmless: their micro-batches add nothing to a step."""
    if examples and not any(label != IGNORE for e in examples for label in e["labels"][1:]):
        files = ", ".join(sorted({r.file for r in records}))
        raise DataError(f"{files}: no record has a token to learn (empty texts or completions "
                        "are a lone end-of-sequence token with nothing before it); give the "
                        "records text to learn")


@hookimpl
def plugtune_prepare_model(model, recipe):
    """With packing, a model on SDPA attends one packed example at a time
    (:data:`lm_family.PACKED_SDPA`): each example costs its own length squared, not the row's."""
    attention = lm_family.packed_attention(model) if recipe.train.packing else None
    if attention and model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)


@hookimpl
def plugtune_compute_loss(model, batch, recipe):
    """Next-token cross-entropy summed over the labelled tokens, and their count. Logits of
    positions an adapter prepends (prompt tuning's virtual tokens) have no label: dropped.
    Packed batches run without a key/value cache: transformers reads packed ``position_ids``
    only without one."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:
        inputs["use_cache"] = False
    labels = batch["labels"]
    chunk = chunk_tokens(recipe, model)
    if not chunk:
        logits = model(**inputs).logits[:, -labels.shape[1]:]
        return cross_entropy(logits, labels, shift=True)
    with final_hidden_states(model) as hidden:
        model(**inputs)
    softcap = (extract_model_from_parallel(model).config.final_logit_softcapping
               if logit_transform(model) == "softcap" else None)
    return chunked_cross_entropy(hidden[0][:, -labels.shape[1]:], output_layer(model), labels,
                                 chunk, shift=True, softcap=softcap)


@hookimpl
def plugtune_count_targets(batch):
    """The labelled tokens :func:`plugtune_compute_loss` will count (next-token: shifted)."""
    return count_labels(batch["labels"], shift=True)


@hookimpl
def plugtune_estimate_memory(plan, recipe):
    """The chunked loss's chunk, and the attention mask the implementation is given: eager
    attention always gets a float mask of the model's dtype (batch x T^2), SDPA a boolean one
    with packing (without, it runs causal with no mask); flash attention needs none, and flex
    attention a block mask of (T/128)^2 blocks (nothing next to the rest). Sequences are planned
    at ``train.max_length`` either way: a packed row holds at most that many tokens."""
    plan.loss_chunk_tokens = chunk_tokens(recipe, plan.model)
    kind = recipe.model.attn_implementation or "sdpa"
    shape = f"{plan.batch_size} x {plan.seq_len}^2"
    if "eager" in kind:
        size = getattr(torch, recipe.model.dtype).itemsize
        plan.add("attention mask", plan.batch_size * plan.seq_len ** 2 * size,
                 f"{shape} {recipe.model.dtype} (eager attention's additive mask)")
    elif kind == "sdpa" and recipe.train.packing:
        wide = plan.batch_size * plan.seq_len  # one row holds the micro-batch
        plan.add("packed attention mask", wide ** 2,
                 f"1 x {wide}^2 booleans (SDPA's block-diagonal mask over the packed row, "
                 "built by transformers; none with flash attention)")


def generate(model, tokenizer, prompts, max_new_tokens, batch_size, device, sharded=None,
             spare=None):
    """Greedy answers for token-id prompts (left padded, batched). ``sharded``: the run's
    accelerator under FSDP, where every process decodes until all are done and, after its own
    batches, makes as many more with the prompt ``spare`` (answers dropped) as the busiest
    process makes in all (each forward gathers weights from every process)."""
    answers = []
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    real, synced = len(batches), sharded is not None
    if synced:
        batches += [[spare]] * same_count(sharded, real)
    for n, chunk in enumerate(batches):
        ids = pad(chunk, tokenizer.pad_token_id, left=True).to(device)
        mask = pad([[1] * len(p) for p in chunk], 0, left=True).to(device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=chat.stop_ids(model, tokenizer), synced_gpus=synced)
        if n < real:
            answers += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return answers


@hookimpl
def plugtune_evaluate(run, model, step, eval_loss, split):
    """Perplexity, and scores of greedy answers: batched, left padded, under the run's
    autocast, each process generating for its share of the held-out references."""
    metrics = {"perplexity": math.exp(min(eval_loss, 700.0))}
    section = run.recipe["causal_lm"]
    checkable = [e for e in run.data[split].examples if e["reference"] is not None]
    checkable = checkable[:section.generate_limit]
    names = generation_metrics.chosen(section.metrics, section.exact_match)
    if not names or not checkable:
        return metrics
    tokenizer = run.tokenizer
    longest = max(e["reference_tokens"] for e in checkable)
    acc = run.accelerator
    with acc.autocast():
        answers = generate(acc.unwrap_model(model), tokenizer,
                           [e["prompt_ids"] for e in run.share(checkable)],
                           min(section.max_new_tokens, longest + 4),
                           eval_batch_size(run.recipe), acc.device,
                           acc if is_sharded(acc) else None, checkable[0]["prompt_ids"])
    answers = run.gather(answers)
    return {**metrics, **generation_metrics.score(names, answers,
                                                  [e["reference"] for e in checkable])}
