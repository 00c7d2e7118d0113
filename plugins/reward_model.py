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
from plugtune.data import check_each
from plugtune.errors import DataError
from plugtune.plugins import head_family as heads
from plugtune.plugins import preference_family as preference

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
    """Each record is a pair (:func:`plugtune.plugins.preference_family.check_pair`) with a
    margin that is a number where it has one."""
    def check(record):
        preference.check_pair(record.data, record.where)
        check_margin(record)

    return check_each(records, check)


@hookimpl
def plugtune_tokenize(records, tokenizer, recipe, split):
    """The preference family's pairs, with each record's margin."""
    for record in records:
        check_margin(record)
    data = preference.tokenize(records, tokenizer, recipe, split, keep=("margin",))
    pairs = data.collate

    def collate(examples):
        batch = pairs(examples)
        batch.pop("labels")  # a reward is one number per row, not a token's
        batch["margin"] = torch.tensor([float(e.get("margin", 0.0)) for e in examples])
        return batch

    data.collate = collate
    return data


def rewards(model, batch):
    """``(r_chosen, r_rejected)``, float32, one reward per pair each."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
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
def plugtune_count_targets(batch):
    return preference.count_pairs(batch)


@hookimpl
def plugtune_compute_loss(model, batch, recipe):
    """The pairwise loss summed over the micro-batch's pairs, and their count; with it, as
    figures the core averages over the step's (or the evaluated split's) pairs: ``accuracy``
    (the chosen answer's reward is the higher), ``margin`` (``r_chosen - r_rejected``) and
    the mean reward of each side."""
    chosen, rejected = rewards(model, batch)
    losses = pair_losses(chosen, rejected, batch.get("margin"),
                         recipe[NAME].center_rewards_coefficient)
    diff = (chosen - rejected).detach()
    return Loss(losses.sum(), len(chosen), metrics={
        "accuracy": (diff > 0).float().sum(), "margin": diff.sum(),
        "rewards/chosen": chosen.detach().sum(), "rewards/rejected": rejected.detach().sum()})


@hookimpl
def plugtune_estimate_memory(plan):
    """The planner's batch: a pair is two sequences (the preference family's, without labels:
    a reward is one number per sequence)."""
    def batch(batch_size, seq_len):
        rows = preference.pair_batch(batch_size, seq_len)
        return {"input_ids": rows["input_ids"],
                "margin": torch.zeros(batch_size, device="meta")}
    plan.make_batch = batch

