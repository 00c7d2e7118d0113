"""KTO, Kahneman-Tversky optimization (Ethayarajh et al. 2024): the policy learns from unpaired
answers, each marked desirable or not, ``{"prompt", "completion", "label": true|false}``,
relative to a reference model and a reference point, the KL estimate ``z0``.

Per example, with ``r = log p(completion) - log p_ref(completion)`` (summed over the
completion's tokens) and TRL's defaults (``beta`` 0.1, both weights 1)::

    desirable:    desirable_weight   * (1 - σ(beta * (r - z0)))
    undesirable:  undesirable_weight * (1 - σ(beta * (z0 - r)))

The objective is the mean over the optimizer step's examples. ``z0`` is a detached estimate of
KL(policy || reference) from mismatched pairs: each example's prompt with the completion of
another example. Two choices keep the objective independent of how a step is split into
micro-batches and processes (TRL pairs completions within each micro-batch and averages per
micro-batch, so its objective changes with the split):

- each example's mismatched completion is fixed when the data is tokenized: the completion of
  the next record of the split (in file order, wrapping around) whose prompt and completion
  both differ from its own;
- ``z0`` of a step is the estimate of the *previous* optimizer step (its mean over all that
  step's examples, clamped at 0; 0 at the first step), so it is known before the step's first
  micro-batch. It is kept in checkpoints (``kto.json``), so a resumed run continues exactly.
  Evaluations take ``z0 = 0`` (so ``plugtune eval`` on a finished run reports the same
  figures as the run did) and report the held-out split's own estimate as ``kl``.

Logged, each a mean over the step (or the evaluated split): ``rewards/chosen`` (``beta * r``
of the desirable examples), ``rewards/rejected`` (of the undesirable ones), ``kl`` (the KL
estimate, before clamping), ``logps/chosen`` and ``logps/rejected``. The reference is the
preference family's (:func:`plugtune.plugins.preference_family.reference_logps`): the model
with its adapter disabled, the starting adapter frozen, a frozen copy, or log-probabilities
computed once (``reference: precompute``). docs/reward_and_kto.md has the details.
"""
import json
import math
from typing import Literal

import torch
from pydantic import Field

from plugtune import Loss, hookimpl
from plugtune.data import Record, check_each
from plugtune.errors import DataError
from plugtune.plugins import lm_family
from plugtune.plugins import preference_family as pref

NAME = "kto"
#: The batch entry holding each example's label (True: desirable).
LABEL = "kto_label"
#: The checkpoint file holding the reference point.
STATE = "kto.json"
FIELDS = ("prompt", "completion", "label")


class KTOSection(pref.ReferenceSection):
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the "
                        "reference (TRL's beta)")
    desirable_weight: float = Field(1.0, gt=0, description="the weight of a desirable "
                                    "example's loss")
    undesirable_weight: float = Field(1.0, gt=0, description="the weight of an undesirable "
                                      "example's loss (raise the smaller class's weight where "
                                      "the labels are unbalanced)")
    reference: Literal["auto", "adapter", "copy", "precompute"] = Field(
        "auto", description="the reference model: adapter (the model with its adapter "
        "disabled, or the starting adapter model.adapter frozen), copy (a frozen copy of the "
        "model), precompute (log-probabilities computed once before training, kept in the run "
        "directory); auto: adapter with an adapter method, else copy")


def check_record(data, where, roles=lm_family.ROLES):
    """A one-line DataError naming ``where`` unless ``data`` is a KTO record: ``prompt`` and
    ``completion`` as a preference pair's prompt and answer (strings, or a conversation), and
    ``label`` true or false."""
    missing = [k for k in FIELDS if k not in data]
    if missing:
        raise DataError(f"{where}: a kto record needs \"prompt\", \"completion\" and \"label\"; "
                        f"this one has no {', '.join(map(repr, missing))} (it has "
                        f"{sorted(data)}; map other column names with data.columns)")
    if not isinstance(data["label"], bool):
        raise DataError(f"{where}: \"label\" must be true (a desirable completion) or false "
                        f"(an undesirable one), got {json.dumps(data['label'])[:40]}")
    completion = data["completion"]
    other = "" if completion != "" else "-"  # any answer unlike it: checks the two as a pair
    try:
        pref.check_pair({"prompt": data["prompt"], "chosen": completion, "rejected": other},
                        where, roles)
    except DataError as exc:
        raise DataError(str(exc).replace('"chosen"', '"completion"')) from None


def mismatched(records):
    """For each record, the index of the record whose completion is its mismatched one: the
    next (wrapping around) whose prompt and completion differ from its own and are of the
    same kinds (strings or messages); failing that, the next whose completion differs."""
    n = len(records)

    def kind(d):
        return isinstance(d["prompt"], str), isinstance(d["completion"], str)

    partners = []
    for i, record in enumerate(records):
        mine, fallback, partner = record.data, None, None
        for k in range(1, n):  # the first fit is usually a few records on
            j = (i + k) % n
            other = records[j].data
            if other["completion"] == mine["completion"] or kind(other) != kind(mine):
                continue
            if other["prompt"] != mine["prompt"]:
                partner = j
                break
            fallback = j if fallback is None else fallback
        partner = partner if partner is not None else fallback
        if partner is None:
            raise DataError(f"{record.where}: no other record of this split has a different "
                            "completion of the same kind, so the KL reference point cannot be "
                            "estimated; add records with other completions")
        partners.append(partner)
    return partners


def unpaired(records):
    """The records as the preference family's pairs: the completion as ``chosen``, the
    mismatched completion (:func:`mismatched`) as ``rejected``; the label kept."""
    partners = mismatched(records)
    return [Record({"prompt": r.data["prompt"], "chosen": r.data["completion"],
                    "rejected": records[j].data["completion"], "label": r.data["label"]},
                   r.file, r.line, r.row) for r, j in zip(records, partners)]


def kto_losses(beta, logratios, desirable, z0, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example losses (Eqn. 7 of the KTO paper, as TRL writes it) from the log-ratios
    ``r`` (policy minus reference log-probability of the completion), the labels and the
    reference point ``z0``."""
    return torch.where(desirable,
                       desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))


def _rows(batch, part):
    """The completion rows (``part`` 0) or the mismatched rows (1) of a batch."""
    n = batch["input_ids"].shape[0] // 2
    rows = slice(0, n) if part == 0 else slice(n, 2 * n)
    return {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels") if k in batch}


class KTO:
    """KTO: the policy learns from unpaired answers marked desirable or not, relative to a
    reference model (Kahneman-Tversky optimization; the plugin is a class because its
    reference point ``z0`` is per-run state)."""

    PLUGTUNE_ROLES = {"task"}

    def __init__(self):
        self.z0 = 0.0

    @hookimpl
    def plugtune_recipe_sections(self, register):
        register(NAME, KTOSection)

    def mode(self, recipe):
        return pref.resolve_reference(recipe, recipe[NAME].reference)

    @hookimpl
    def plugtune_check_recipe(self, recipe):
        s = recipe[NAME]
        return (pref.reference_problems(recipe, "kto.reference", s.reference)
                + pref.prompt_length_problems(recipe, NAME))

    @hookimpl
    def plugtune_check_records(self, recipe, records):
        return check_each(records, lambda r: check_record(r.data, r.where, recipe[NAME].roles))

    @hookimpl
    def plugtune_tokenize(self, records, tokenizer, recipe, split):
        s = recipe[NAME]
        for record in records:
            check_record(record.data, record.where, s.roles)
        data = pref.tokenize(unpaired(records), tokenizer, recipe, split, s.max_prompt_length,
                             s.roles, keep=("label",))
        pairs = data.collate

        def collate(examples):
            return {**pairs(examples), LABEL: torch.tensor([e["label"] for e in examples])}

        data.collate = collate
        return data

    @hookimpl
    def plugtune_prepare_model(self, model, recipe):
        """The frozen copy of the model as loaded, in ``copy`` mode."""
        if self.mode(recipe) == "copy":
            pref.freeze_copy(model, recipe)

    @hookimpl
    def plugtune_train_start(self, run):
        if run.recipe[NAME].disable_dropout:
            pref.disable_dropout(run.model)
        if self.mode(run.recipe) == "precompute":
            pref.precompute(run)

    @hookimpl
    def plugtune_count_targets(self, batch):
        """The examples: the batch's first half of rows (the second: mismatched, for KL)."""
        return pref.count_pairs(batch)

    @hookimpl
    def plugtune_compute_loss(self, model, batch, recipe):
        """The summed per-example loss over the micro-batch, the number of examples, and the
        rewards and the KL estimate as figures the core averages (module docstring)."""
        s = recipe[NAME]
        logps, _ = pref.sequence_logps(model, _rows(batch, 0))
        with torch.no_grad():
            kl_logps, _ = pref.sequence_logps(model, _rows(batch, 1))
        reference = pref.reference_logps(model, batch, recipe).to(logps.device, logps.dtype)
        ref, ref_kl = pref.split_rows(reference)
        desirable = batch.get(LABEL)
        desirable = (torch.ones_like(logps, dtype=torch.bool) if desirable is None
                     else desirable.to(logps.device).bool())  # the planner's batch has none
        z0 = self.z0 if model.training else 0.0
        logratios = logps - ref
        losses = kto_losses(s.beta, logratios, desirable, z0, s.desirable_weight,
                            s.undesirable_weight)
        rewards = s.beta * logratios.detach()
        good, bad = desirable.float(), (~desirable).float()
        return Loss(losses.sum(), len(losses), metrics={
            "rewards/chosen": ((rewards * good).sum(), good.sum()),
            "rewards/rejected": ((rewards * bad).sum(), bad.sum()),
            "logps/chosen": ((logps.detach() * good).sum(), good.sum()),
            "logps/rejected": ((logps.detach() * bad).sum(), bad.sum()),
            "kl": (kl_logps - ref_kl).detach().sum()})

    @hookimpl
    def plugtune_step_end(self, metrics):
        """The next step's reference point: this step's KL estimate, clamped at 0."""
        kl = metrics.get("kl")
        if kl is not None and math.isfinite(kl):
            self.z0 = max(float(kl), 0.0)

    @hookimpl
    def plugtune_save_checkpoint(self, path):
        (path / STATE).write_text(json.dumps({"z0": self.z0}) + "\n")

    @hookimpl
    def plugtune_load_checkpoint(self, path):
        state = path / STATE
        if state.is_file():
            self.z0 = float(json.loads(state.read_text())["z0"])

    @hookimpl
    def plugtune_estimate_memory(self, plan, recipe):
        pref.plan_memory(plan, recipe, self.mode(recipe))

    @hookimpl
    def plugtune_fit_variants(self, recipe):
        if NAME not in recipe.plugins:  # called with every installed plugin
            return None
        return pref.fit_variants(recipe, NAME, self.mode(recipe))
