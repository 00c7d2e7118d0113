"""The loss contract: what ``plugtune_compute_loss`` returns, and the cross-entropy that most
task plugins compute with it.

A task plugin returns a :class:`Loss`: the *sum* of the per-target losses of a micro-batch and
the number of targets they were summed over. The core, not the plugin, divides: an optimizer
step minimises ``sum of every sum / sum of every count`` over all its micro-batches and all
processes, so ``batch_size``, ``grad_accum`` and the number of processes change speed and
memory, never the objective; an evaluation divides the whole split's sum by its whole count,
so it does not move with ``eval_batch_size``. (HF Trainer reaches the same with
``num_items_in_batch``, torchtune by scaling gradients by ``1 / tokens`` after backward; the
core does the latter, see ``plugtune.loop``.)
"""
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.utils.checkpoint

#: The label the loss ignores (prompt tokens, padding, sub-words after the first): the one
#: definition every task plugin imports, equal to torch's ``cross_entropy`` default.
IGNORE = -100


@dataclass
class Loss:
    """A micro-batch's loss as a sum over its targets and their count.

    :param sum: scalar tensor, the summed loss (it carries the graph for backward).
    :param count: how many targets ``sum`` adds up: tokens with a label for a language model,
        labelled sequences for a classifier, or the summed class weights of a weighted loss. An
        int or a scalar tensor (a tensor avoids a host sync on a GPU).
    :param metrics: more figures of the same micro-batch to report (API 1.2), each as a sum the
        core adds up like the loss: a scalar tensor summed over the same targets as ``count``
        (reported as its mean over the step's, or the evaluated split's, ``count``), or a
        ``(sum, count)`` pair with a count of its own (a mean over some of the targets, e.g. a
        preference objective's desirable examples only). Summed over every micro-batch and
        process before dividing, so a reported figure, like the loss, does not depend on how
        batches are split. Return the same keys for every batch of a run. Keys are reported as
        given in the step's record (``plugtune_step_end``, ``plugtune_log``) and in evaluation
        records (a test split's prefixed ``test_``).
    """

    sum: torch.Tensor
    count: torch.Tensor | int
    metrics: dict[str, "Metric"] = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        """The micro-batch's own mean loss (what a plain ``reduction="mean"`` gives)."""
        return self.sum / self.count


#: A :attr:`Loss.metrics` value: a sum over the loss's targets, or a ``(sum, count)`` pair.
Metric = Union[torch.Tensor, tuple[Any, Any]]


class Tally:
    """The sums and counts of a :class:`Loss`'s metrics over several micro-batches (and,
    after :meth:`flat` / :meth:`means`, processes): what a step or an evaluation reports."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, loss: Loss, weight: float = 1.0) -> None:
        """Add ``loss``'s metrics (``weight`` 0: a micro-batch that only keeps processes in
        step, whose figures do not count)."""
        for key, value in loss.metrics.items():
            total, count = value if isinstance(value, tuple) else (value, loss.count)
            pair = torch.stack([torch.as_tensor(total).detach().double().reshape(()),
                                torch.as_tensor(count).detach().double().reshape(()).to(
                                    torch.as_tensor(total).device)]) * weight
            old = self.sums.get(key)
            self.sums[key] = (pair[0], pair[1]) if old is None else (old[0] + pair[0],
                                                                     old[1] + pair[1])

    def flat(self, device: Any) -> torch.Tensor:
        """Every key's sum and count in one vector (sorted keys), to all-reduce with the rest."""
        keys = sorted(self.sums)
        if not keys:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.stack([x.to(device) for k in keys for x in self.sums[k]])

    def means(self, flat: torch.Tensor | None = None) -> dict[str, float | None]:
        """Each metric's sum over its count (None where nothing was counted), from ``flat``
        (the all-reduced :meth:`flat`) when given."""
        keys = sorted(self.sums)
        values = (flat if flat is not None else self.flat("cpu")).tolist()
        return {k: values[2 * i] / values[2 * i + 1] if values[2 * i + 1] else None
                for i, k in enumerate(keys)}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  weight: torch.Tensor | None = None, shift: bool = False) -> Loss:
    """:class:`Loss` of ``logits`` against ``labels`` (``-100`` ignored), in float32.

    :param weight: per-class weights; the count is then the summed weight of the labelled
        targets, so the weighted mean is the one ``torch.nn.functional.cross_entropy`` gives.
    :param shift: predict ``labels[..., 1:]`` from ``logits[..., :-1, :]`` (a causal LM's
        next-token loss with unshifted labels, as transformers models take them).
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    logits, labels = logits.flatten(0, -2).float(), labels.flatten().to(logits.device)
    if weight is not None:
        weight = weight.to(logits.device, torch.float32)
    total = torch.nn.functional.cross_entropy(logits, labels, weight=weight,
                                              ignore_index=IGNORE, reduction="sum")
    return Loss(total, count_labels(labels, weight))


def count_labels(labels: torch.Tensor, weight: torch.Tensor | None = None,
                 shift: bool = False) -> torch.Tensor:
    """The count :func:`cross_entropy` (and :func:`chunked_cross_entropy`) gives for
    ``labels``, from the labels alone: what a task's ``plugtune_count_targets`` returns
    before the forward pass (``weight`` and ``shift`` as there)."""
    if shift:
        labels = labels[..., 1:]
    valid = labels != IGNORE
    if weight is None:
        return valid.sum()
    return weight.to(labels.device, torch.float32)[labels[valid]].sum()


def chunked_cross_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          labels: torch.Tensor, chunk_tokens: int, shift: bool = False,
                          softcap: float | None = None, select: bool | None = None) -> Loss:
    """:class:`Loss` of ``head(hidden)`` against ``labels``, equal to :func:`cross_entropy` of
    the full logits, without ever holding them: only labelled positions go through ``head``
    (the output layer, on a CPU; a GPU runs every position rather than wait to select them),
    ``chunk_tokens`` at a time, each chunk's float32 logits recomputed in
    backward rather than kept (activation checkpointing per chunk) or, for an output layer
    with nothing to train, its gradient taken at once and the logits dropped. What torchtune's chunked
    cross-entropy and Liger's fused linear cross-entropy save, with any output layer module
    (an adapter on it included).

    :param hidden: ``(..., positions, hidden size)`` final hidden states.
    :param head: the module that turns hidden states into logits.
    :param softcap: Gemma 2's final logit soft-capping, ``tanh(logits / c) * c``.
    :param select: run only labelled positions through ``head`` (default: on a CPU).
    """
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    labels = labels.to(hidden.device)
    valid = labels != IGNORE
    if select is None:
        select = hidden.device.type == "cpu"
    if select:  # only what is scored: prompts skip the output layer
        states, targets = hidden[valid], labels[valid]
    else:  # selecting would wait for the device (a host sync per micro-batch): chunk every
        # position and let the loss ignore the unlabelled ones (the planner's meta tensors too)
        states, targets = hidden.flatten(0, -2), labels.flatten()

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(_logits(head, h, softcap)[1], t,
                                                 ignore_index=IGNORE, reduction="sum")

    # starts as the loss of no target: a zero on the graph through the output layer and the
    # hidden states, so a micro-batch without targets backpropagates too (zero gradients)
    total = piece(states[:0], targets[:0])
    # (not under FSDP2 or ZeRO-3, whose hooks on the layer expect one backward pass of it,
    # after the forward: their parameters are DTensors or carry a DeepSpeed id)
    frozen = isinstance(head, torch.nn.Module) and not any(
        p.requires_grad or hasattr(p, "device_mesh") or hasattr(p, "ds_id")
        for p in head.parameters())
    for i in range(0, len(targets), chunk_tokens):
        h, t = states[i:i + chunk_tokens], targets[i:i + chunk_tokens]
        if not (torch.is_grad_enabled() and h.requires_grad):
            total = total + piece(h, t)
        elif frozen:  # the chunk's gradient now, its logits gone before the next chunk
            value, grad = _loss_and_gradient(head, h, t, softcap, masked=not select)
            total = total + _Precomputed.apply(h, value, grad)
        else:
            total = total + torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False)
    return Loss(total, valid.sum())


def _logits(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor,
            softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output layer's result for ``h`` and the float32 logits made of it (soft-capped)."""
    out = head(h)
    logits = out.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return out, logits


def _loss_and_gradient(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor,
                       t: torch.Tensor, softcap: float | None,
                       masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's summed cross-entropy through an output layer with nothing to train, and its
    gradient with respect to ``h``, holding one buffer of logits on a CPU (two elsewhere)
    where torch's ``cross_entropy`` and its backward hold four (logits, log-probabilities, the
    loss's gradient, the log-softmax's gradient): the log-probabilities are written over the
    logits, then turned into the gradient in place (softmax minus one-hot), which goes back
    through the layer. Written by hand because torch has no cross-entropy that returns its own
    gradient; 1.2x torch's loss and backward on a CPU (``benchmarks/chunked_loss.py``).

    ``masked``: the chunk may hold ignored targets (every position chunked), whose rows get
    no loss and no gradient."""
    with torch.enable_grad():
        detached = h.detach().requires_grad_()
        out, logits = _logits(head, detached, softcap)
    buffer = logits.detach()
    if logits is out and not isinstance(head, torch.nn.Linear):
        # the layer's own output: some module may keep it for its backward
        buffer = buffer.clone()
    valid = t != IGNORE
    index = t.clamp(min=0).unsqueeze(1)
    if buffer.device.type == "cpu":  # torch's CPU log-softmax reads each row before it writes it
        logp = torch.log_softmax(buffer, -1, out=buffer)
    else:  # not run on other devices yet: a second buffer
        logp = torch.log_softmax(buffer, -1)
    value = -torch.where(valid, logp.gather(1, index).squeeze(1), 0).sum()
    grad = logp.exp_()
    grad.scatter_add_(1, index, -valid.to(grad.dtype).unsqueeze(1))
    if masked:
        grad.masked_fill_(~valid.unsqueeze(1), 0)
    (hidden_grad,) = torch.autograd.grad(logits, detached, grad)
    return value, hidden_grad


class _Precomputed(torch.autograd.Function):
    """A loss whose gradient with respect to its input was computed with it. For an output
    layer that does not train (LoRA, QLoRA, a frozen head) the chunk's backward is then one
    scaling of the stored gradient instead of the output layer run again (the recomputation
    checkpointing costs, about a tenth of a LoRA step on completion-heavy data): the "gradient
    in the forward pass" of Liger's fused linear cross-entropy, through any head module."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, value: torch.Tensor,
                grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx: Any, out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * out.to(grad.dtype), None, None


def as_loss(result: Any) -> Loss:
    """A :class:`Loss` from a compute-loss result. A bare scalar tensor is the contract before
    plugtune 0.2: it is taken as the micro-batch's mean with weight 1 (every micro-batch then
    counts the same, whatever its number of targets) and a warning says how to migrate."""
    if isinstance(result, Loss):
        return result
    if isinstance(result, torch.Tensor) and result.ndim == 0:
        warnings.warn("plugtune_compute_loss returned a bare tensor; return "
                      "plugtune.Loss(sum, count) so the objective is exact over "
                      "micro-batches and processes (docs/hooks.md, 'Migrating')",
                      FutureWarning, stacklevel=2)
        return Loss(result, 1)
    raise TypeError("plugtune_compute_loss must return plugtune.Loss(sum, count), "
                    f"got {type(result).__name__}")
