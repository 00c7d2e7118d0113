"""Reward model: a one-output head learns to score the chosen answer of a pair above the rejected.

Records are preference pairs ``{"prompt", "chosen", "rejected"}`` (strings, or message lists
rendered with the chat template; see :mod:`plugtune.plugins.preference_family`); the loss is
TRL's ``RewardTrainer``'s::

    -log sigmoid(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected) ** 2

``margin`` is a record's optional ``"margin"`` field (0 without one) and ``c`` the section's
``center_rewards_coefficient`` (off by default), which keeps rewards centred on zero. The
objective is the mean over the optimizer step's pairs. Evaluation reports the pairwise
accuracy (the share of held-out pairs whose chosen answer gets the higher reward), the mean
margin ``r_chosen - r_rejected`` and the mean reward of each side.

The saved model is an ``AutoModelForSequenceClassification`` with one label (``reward``):
``plugtune export RUN OUT --merge`` writes one that plain transformers loads. Composes with
``full``, ``freeze`` (the head always trains) and the adapter plugins (the head trains in full
and is saved with the adapter, as peft's ``modules_to_save``).
"""
import torch
from pydantic import Field

from plugtune import Loss, Section, hookimpl
from plugtune.data import Tokenized, check_each, eval_batches, pad
from plugtune.errors import DataError
from plugtune.plugins import head_family as heads

NAME = "reward_model"
PLUGTUNE_ROLES = {"task"}

# the hook implementations every head shares, as this plugin's own
HEAD = heads.Head(NAME, "AutoModelForSequenceClassification")
plugtune_check_recipe = HEAD.plugtune_check_recipe
plugtune_model_class = HEAD.plugtune_model_class
plugtune_select_trainable = HEAD.plugtune_select_trainable

#: The one output's label name, in the saved model's ``id2label``.
LABEL = "reward"


class RewardModelSection(Section):
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="add c * (r_chosen + r_rejected)^2 per pair to the loss, so "
        "rewards stay centred on zero (TRL's center_rewards_coefficient; 0.01 is usual); "
        "null: off")


@hookimpl
def plugtune_recipe_sections(register):
    register(NAME, RewardModelSection)


@hookimpl
def plugtune_model_kwargs(tokenizer):
    """One output named ``reward``, and the tokenizer's padding token, by which a decoder's
    head finds the last token of each sequence."""
    kwargs = {"num_labels": 1, "id2label": {0: LABEL}, "label2id": {LABEL: 0}}
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return kwargs


def check_margin(record):
    """A DataError unless the record's optional ``margin`` is a number."""
    margin = record.data.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(f"{record.where}: \"margin\" must be a number (how much higher the "
                        f"chosen answer's reward should be), got {margin!r}")


@hookimpl
def plugtune_check_records(recipe, records):
    """Each record is a pair the loss can use: prompt, chosen and rejected of the right kinds,
    chosen and rejected different, the margin a number."""
    def check(record):
        check_pair(record, recipe)
        check_margin(record)

    return check_each(records, check)


@hookimpl
def plugtune_tokenize(records, tokenizer, recipe):
    examples, truncated = [], 0
    for record in records:
        check_margin(record)
        chosen, rejected, cut = encode_pair(record, tokenizer, recipe)
        truncated += cut
        examples.append({"input_ids": chosen, "rejected_ids": rejected,
                         "margin": float(record.data.get("margin", 0.0))})
    return Tokenized(examples, collator(tokenizer), truncated, records)


def collator(tokenizer):
    """A batch of ``n`` pairs: ``input_ids`` of ``2n`` rows, the chosen sequences first, then
    the rejected ones, each on its own (the head reads each row's last real token), padded on
    the right; ``margin`` of ``n``."""
    def collate(examples):
        rows = [e["input_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        return {"input_ids": pad(rows, tokenizer.pad_token_id),
                "attention_mask": pad([[1] * len(r) for r in rows], 0),
                "margin": torch.tensor([e["margin"] for e in examples], dtype=torch.float32)}
    return collate


def rewards(model, batch):
    """``(r_chosen, r_rejected)``, float32, one reward per pair each."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.float().squeeze(-1).chunk(2)


def pair_losses(chosen, rejected, margin=None, center=None):
    """The loss of each pair: ``-log sigmoid(chosen - rejected - margin)``, plus
    ``center * (chosen + rejected) ** 2`` where ``center`` is given (TRL's ``RewardTrainer``
    adds ``center * mean((chosen + rejected) ** 2)`` to the batch mean: the same mean)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    losses = -torch.nn.functional.logsigmoid(diff)
    if center:
        losses = losses + center * (chosen + rejected) ** 2
    return losses


@hookimpl
def plugtune_compute_loss(model, batch, recipe):
    """The pairwise loss summed over the micro-batch's pairs, and their count; the pairs the
    chosen answer wins and the margins as metrics (the core averages them over the step)."""
    chosen, rejected = rewards(model, batch)
    losses = pair_losses(chosen, rejected, batch.get("margin"),
                         recipe[NAME].center_rewards_coefficient)
    return Loss(losses.sum(), len(chosen))


def scores(run, model, split):
    """``(r_chosen, r_rejected)`` of every pair of a held-out split (each process scores its
    share; every process gets them all)."""
    pairs = []
    with torch.no_grad():
        for _, batch in eval_batches(run, split):
            with run.accelerator.autocast():
                chosen, rejected = rewards(model, batch)
            pairs += list(zip(chosen.tolist(), rejected.tolist()))
    return run.gather(pairs)


def pair_metrics(pairs):
    """Pairwise accuracy (ties count as wrong), mean margin and mean reward of each side."""
    n = len(pairs)
    if not n:
        return {}
    return {"accuracy": sum(c > r for c, r in pairs) / n,
            "margin": sum(c - r for c, r in pairs) / n,
            "rewards/chosen": sum(c for c, _ in pairs) / n,
            "rewards/rejected": sum(r for _, r in pairs) / n}


@hookimpl
def plugtune_evaluate(run, model, split):
    return pair_metrics(scores(run, model, split))


@hookimpl
def plugtune_estimate_memory(plan):
    """The planner's batch: a pair is two sequences."""
    def batch(batch_size, seq_len):
        ids = torch.zeros(2 * batch_size, seq_len, dtype=torch.long, device="meta")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "margin": torch.zeros(batch_size, device="meta")}
    plan.make_batch = batch


# --- temporary: until the preference family's pair checks and tokenization land -------------


def check_pair(record, recipe):
    data = record.data
    for key in ("prompt", "chosen", "rejected"):
        if key not in data:
            raise DataError(f"{record.where}: no {key!r} field; a preference record needs "
                            f"\"prompt\", \"chosen\" and \"rejected\"; this one has {sorted(data)}")
        if not isinstance(data[key], str):
            raise DataError(f"{record.where}: {key!r} must be a string")
    if data["chosen"] == data["rejected"]:
        raise DataError(f"{record.where}: \"chosen\" and \"rejected\" are the same, so the pair "
                        "says nothing; drop the record or fix one answer")


def encode_pair(record, tokenizer, recipe):
    from plugtune.plugins.causal_lm import special_prefix

    check_pair(record, recipe)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = special_prefix(tokenizer) + ids(record.data["prompt"])
    limit, cut = recipe.train.max_length, False
    out = []
    for key in ("chosen", "rejected"):
        seq = prompt + ids(record.data[key]) + [tokenizer.eos_token_id]
        if len(seq) > limit:
            seq, cut = seq[:limit], True
        out.append(seq)
    return out[0], out[1], cut
