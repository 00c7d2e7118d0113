"""ORPO: the chosen answer's NLL plus an odds-ratio penalty, no reference model.

Odds-ratio preference optimization (Hong et al. 2024): supervised learning of the chosen
answer plus a penalty on the odds of the rejected one, with no reference model, on
``{"prompt", "chosen", "rejected"}`` records (:mod:`plugtune.plugins.preference_family`).

Per pair, with ``c`` and ``r`` the mean per-token log-probabilities of the chosen and the
rejected answer (TRL's ``average_log_prob``)::

    loss = -c - lambda * log σ(log odds(c) - log odds(r)),   log odds(x) = x - log(1 - e^x)

The objective is the mean over the optimizer step's pairs. The NLL term is each pair's mean
over its chosen answer's tokens (TRL averages it over the batch's chosen tokens instead: the
same when the chosen answers have the same length), so the objective does not depend on how
pairs are split into micro-batches."""
import torch
import torch.nn.functional as F
from pydantic import Field

from plugtune import hookimpl
from plugtune.plugins import preference_family as pref

PLUGTUNE_ROLES = {"task"}


class ORPOSection(pref.PairSection):
    beta: float = Field(0.1, gt=0, description="lambda: the weight of the odds-ratio term "
                        "beside the chosen answer's NLL (TRL's beta)")


@hookimpl
def plugtune_recipe_sections(register):
    register("orpo", ORPOSection)


@hookimpl
def plugtune_check_recipe(recipe):
    return (pref.reference_problems(recipe, "orpo", "none", reference_free=True)
            + pref.prompt_length_problems(recipe, "orpo"))


@hookimpl
def plugtune_check_records(recipe, records):
    return pref.check_records(records, recipe["orpo"].roles)


@hookimpl
def plugtune_tokenize(records, tokenizer, recipe, split):
    s = recipe["orpo"]
    return pref.tokenize(records, tokenizer, recipe, split, s.max_prompt_length, s.roles)


def log1mexp(x):
    """``log(1 - e^x)`` for ``x < 0``, accurate near 0 and far below it (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def orpo_losses(beta, chosen, rejected):
    """``(losses, nll, log_odds)`` per pair from the mean per-token log-probabilities of the
    chosen and rejected answers (the formula in this module's docstring)."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -chosen - beta * F.logsigmoid(log_odds), -chosen, log_odds


@hookimpl
def plugtune_count_targets(batch):
    return pref.count_pairs(batch)


@hookimpl
def plugtune_compute_loss(model, batch, recipe):
    """The summed per-pair loss over the micro-batch's pairs, their count, TRL's reward
    metrics (rewards: ``beta`` x the mean log-probabilities), ``nll_loss`` and
    ``log_odds_ratio``."""
    beta = recipe["orpo"].beta
    logps, counts = pref.sequence_logps(model, batch)
    mean = logps / counts.clamp(min=1)
    chosen, rejected = pref.split_rows(mean)
    losses, nll, log_odds = orpo_losses(beta, chosen, rejected)
    metrics = pref.reward_metrics(beta * chosen, beta * rejected, *pref.split_rows(logps))
    metrics.update({"nll_loss": nll.detach().sum(), "log_odds_ratio": log_odds.detach().sum()})
    return pref.pair_loss(losses.sum(), len(chosen), metrics)


@hookimpl
def plugtune_train_start(run):
    pref.disable_dropout(run.model)


@hookimpl
def plugtune_estimate_memory(plan, recipe):
    pref.plan_memory(plan, recipe, "none")
