"""Plugins a stranger wrote from docs/plugins.md alone, each filling a role a built-in fills.

- ``layernorm``: an adapter method (peft's LayerNorm tuning: only the norms train), built on
  the public ``plugtune.plugins.peft_family`` as the built-in methods are.
- ``echo_task``: a task plugin (it would replace ``causal_lm``, and says so by its role).
- ``focal_loss``: a focal loss that replaces ``causal_lm``'s cross-entropy, and declares it.
- ``rival_loss``: the same loss without the declaration.
"""
from plugtune import Loss, hookimpl
from plugtune.plugins import peft_family

#: how many times each loss was asked for: what the tests read
CALLS = {"focal_loss": 0}


class LayerNormTuning:
    """LayerNorm tuning (peft): only the normalization layers train, on a frozen base."""

    PLUGTUNE_ROLES = {"adapter"}
    PLUGTUNE_API = ">=1.1,<2"

    @hookimpl
    def plugtune_wrap_model(self, model):
        from peft import LNTuningConfig

        return peft_family.wrap(model, LNTuningConfig)

    plugtune_save_model = staticmethod(peft_family.plugtune_save_model)  # PEFT format


class EchoTask:
    """A task of its own: repeat the input."""

    PLUGTUNE_ROLES = {"task"}

    @hookimpl
    def plugtune_compute_loss(self, model, batch):
        return None


def focal(model, batch, gamma=2.0):
    """Focal loss (Lin et al. 2017) of next-token prediction: ``(1 - p)^gamma`` times the
    cross-entropy of each labelled token, summed, and the count of labelled tokens."""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits[keep], -1).gather(-1, labels[keep][:, None])[:, 0]
    return Loss((-(1 - logp.exp()) ** gamma * logp).sum(), keep.sum())


class FocalLoss:
    """Focal loss in place of causal_lm's cross-entropy (declared: PLUGTUNE_REPLACES)."""

    PLUGTUNE_REPLACES = {"causal_lm": "compute_loss"}

    @hookimpl
    def plugtune_compute_loss(self, model, batch):
        CALLS["focal_loss"] += 1
        return focal(model, batch)


class RivalLoss:
    """The same loss, without saying whose answer it replaces."""

    @hookimpl
    def plugtune_compute_loss(self, model, batch):
        return focal(model, batch)


class Twin:
    """A plugin whose name another distribution registers too."""
