"""DPO and its variants (sigmoid, ipo, hinge, robust, simpo) on prompt/chosen/rejected pairs.

On ``{"prompt", "chosen", "rejected"}`` records (:mod:`plugtune.plugins.preference_family`),
the policy learns to give the chosen answer more probability than the rejected one, relative to
a reference model (SimPO: without one). The objective is the mean of the per-pair loss over the
optimizer step's pairs. docs/preference.md has the formulas and the reference modes."""
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from plugtune import hookimpl
from plugtune.plugins import preference_family as pref

PLUGTUNE_ROLES = {"task"}

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
#: ``beta`` by loss type when the recipe gives none: TRL's 0.1, and SimPO's paper's 2.0.
BETA = {"simpo": 2.0}
#: The loss types that length-normalize the log-probabilities (as TRL does for IPO and SimPO).
NORMALIZED = ("ipo", "simpo")


class DPOSection(pref.ReferenceSection):
    loss_type: Literal[LOSS_TYPES] = Field("sigmoid", description="sigmoid (DPO), ipo, hinge, "
                                           "robust (DPO with label noise), simpo (SimPO: "
                                           "reference-free, length-normalized, margin)")
    beta: float | None = Field(None, gt=0, description="the inverse temperature: how far the "
                               "policy may move from the reference; default 0.1 (simpo: 2.0)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid and robust: the "
                                   "assumed share of pairs whose preference is flipped")
    simpo_gamma: float | None = Field(None, ge=0, description="simpo: the target reward "
                                      "margin gamma; default 0.5")
    reference: Literal[pref.REFERENCES] = Field(
        "auto", description="the reference model: adapter (the model with its adapter "
        "disabled, or the starting adapter model.adapter frozen), copy (a frozen copy of the "
        "model), precompute (log-probabilities computed once before training, kept in the "
        "run directory), none (simpo); auto: none for simpo, adapter with an adapter method, "
        "else copy")

    @property
    def the_beta(self) -> float:
        return self.beta if self.beta is not None else BETA.get(self.loss_type, 0.1)

    @property
    def gamma(self) -> float:
        return self.simpo_gamma if self.simpo_gamma is not None else 0.5


@hookimpl
def plugtune_recipe_sections(register):
    register("dpo", DPOSection)


def _mode(recipe):
    s = recipe["dpo"]
    return pref.resolve_reference(recipe, s.reference, s.loss_type == "simpo")


@hookimpl
def plugtune_check_recipe(recipe):
    s = recipe["dpo"]
    problems = pref.reference_problems(recipe, "dpo.reference", s.reference,
                                       s.loss_type == "simpo")
    # the saved recipe of a run spells out every key, so a default value is no conflict
    if s.label_smoothing and s.loss_type not in ("sigmoid", "robust"):
        problems.append(f"dpo.label_smoothing: is for loss_type sigmoid or robust, not "
                        f"{s.loss_type}; remove it")
    if s.simpo_gamma is not None and s.loss_type != "simpo":
        problems.append(f"dpo.simpo_gamma: is for loss_type simpo, not {s.loss_type}; "
                        "remove it")
    return problems + pref.prompt_length_problems(recipe, "dpo")


@hookimpl
def plugtune_check_records(recipe, records):
    return pref.check_records(records, recipe["dpo"].roles)


@hookimpl
def plugtune_tokenize(records, tokenizer, recipe, split):
    s = recipe["dpo"]
    return pref.tokenize(records, tokenizer, recipe, split, s.max_prompt_length, s.roles)


@hookimpl
def plugtune_prepare_model(model, recipe):
    """The frozen copy of the model as loaded, in ``copy`` mode."""
    if _mode(recipe) == "copy":
        pref.freeze_copy(model, recipe)


@hookimpl
def plugtune_train_start(run):
    s = run.recipe["dpo"]
    if s.disable_dropout:
        pref.disable_dropout(run.model)
    if _mode(run.recipe) == "precompute":
        pref.precompute(run)


def dpo_losses(loss_type, beta, chosen, rejected, ref_chosen=None, ref_rejected=None,
               label_smoothing=0.0, gamma=0.5):
    """Per-pair losses of ``loss_type`` from the policy's answer log-probabilities ``chosen``
    and ``rejected`` (length-normalized for ipo and simpo) and the reference's (none for
    simpo), as the papers (and TRL) write them, with ``h = (chosen - rejected) -
    (ref_chosen - ref_rejected)``:

    - sigmoid (DPO, Rafailov et al. 2023; label smoothing from cDPO):
      ``-(1 - ls) log σ(β h) - ls log σ(-β h)``
    - robust (Chowdhury et al. 2024): ``(-(1 - ls) log σ(β h) + ls log σ(-β h)) / (1 - 2 ls)``
    - hinge (SLiC, Zhao et al. 2023): ``max(0, 1 - β h)``
    - ipo (Azar et al. 2023): ``(h - 1 / (2 β))²``
    - simpo (Meng et al. 2024): ``-log σ(β (chosen - rejected) - γ)``
    """
    logits = chosen - rejected
    if loss_type != "simpo":
        logits = logits - (ref_chosen - ref_rejected)
    ls = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - ls) * F.logsigmoid(beta * logits) - ls * F.logsigmoid(-beta * logits)
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * logits)
                + ls * F.logsigmoid(-beta * logits)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "simpo":
        return -F.logsigmoid(beta * logits - gamma)
    raise ValueError(f"unknown loss type {loss_type!r}")


@hookimpl
def plugtune_count_targets(batch):
    return pref.count_pairs(batch)


@hookimpl
def plugtune_compute_loss(model, batch, recipe):
    """The summed per-pair loss over the micro-batch's pairs, their count, and TRL's reward
    metrics (summed too: the core averages them over the step's pairs)."""
    s = recipe["dpo"]
    beta = s.the_beta
    logps, counts = pref.sequence_logps(model, batch)
    chosen, rejected = pref.split_rows(logps)
    if s.loss_type == "simpo":
        n_c, n_r = pref.split_rows(counts.clamp(min=1))
        losses = dpo_losses("simpo", beta, chosen / n_c, rejected / n_r, gamma=s.gamma)
        c_rewards, r_rewards = beta * chosen / n_c, beta * rejected / n_r
    else:
        ref = pref.reference_logps(model, batch, recipe).to(logps.device, logps.dtype)
        ref_c, ref_r = pref.split_rows(ref)
        if s.loss_type in NORMALIZED:
            n_c, n_r = pref.split_rows(counts.clamp(min=1))
            losses = dpo_losses(s.loss_type, beta, chosen / n_c, rejected / n_r, ref_c / n_c,
                                ref_r / n_r)
        else:
            losses = dpo_losses(s.loss_type, beta, chosen, rejected, ref_c, ref_r,
                                s.label_smoothing)
        c_rewards, r_rewards = beta * (chosen - ref_c), beta * (rejected - ref_r)
    metrics = pref.reward_metrics(c_rewards, r_rewards, chosen, rejected)
    return pref.pair_loss(losses.sum(), len(chosen), metrics)


@hookimpl
def plugtune_estimate_memory(plan, recipe):
    pref.plan_memory(plan, recipe, _mode(recipe))


@hookimpl
def plugtune_fit_variants(recipe):
    """``plan --fit`` asks every installed plugin: only a recipe using dpo is answered."""
    return pref.fit_variants(recipe, "dpo", _mode(recipe)) if "dpo" in recipe.plugins else []
