"""How much arithmetic a training step is: the model's FLOPs per position, from its shape and
what trains, so a run can say how close it gets to the hardware (achieved TFLOP/s, and the
model FLOPs utilization, MFU, where the device's peak is known).

The count (PaLM's MFU appendix, Chowdhery et al. 2022, app. B, and nanoGPT's ``estimate_mfu``,
extended to frozen weights). Per position of a micro-batch whose rows are ``T`` wide:

- every matrix-multiply weight (linear layers, the output layer, an adapter's matrices; not
  the embedding lookup, not norms) costs 2 FLOPs in the forward pass;
- backward costs 2 more per weight for the gradient of the layer's input, for every layer from
  the first trainable weight on (module order; before it nothing needs a gradient), and 2 more
  for the gradient of the weight itself, for trainable weights only. A full fine-tune is 6N;
  LoRA is about 4N of the frozen base plus 6 per adapter weight (the frozen weights still cost
  the forward and the input-gradient backward);
- attention's two products (scores and the weighted sum) cost ``4 x T x heads x head_dim``
  per layer in the forward pass and twice that in backward (where gradients flow through it):
  PaLM's ``12 L H Q T``, the full ``T x T`` square as the dense kernels compute it, not halved
  for causality; in a packed row ``T`` is each example's own length (the attention kept
  inside each example, :func:`squared_spans`).

These are model FLOPs: recomputation by gradient checkpointing is not counted (it costs a
forward pass more, 2N, which the hardware does but the model does not need), and the output
layer counts for every position although on a CPU plugtune's chunked loss runs it on labelled
positions only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import span_lengths
from .models import transformer_blocks

__all__ = ["FlopModel", "flop_model", "peak_tflops", "report", "squared_spans", "PEAK_TFLOPS"]

#: Dense 16-bit (bf16/fp16 with float32 accumulation) tensor-core peaks in TFLOP/s, from the
#: vendors' data sheets, by a part of the name ``torch.cuda.get_device_name`` gives; the
#: first that matches counts, so the specific names come first.
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2),
    ("RTX 3090", 71.0), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0), ("T4", 65.0),
)


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one training position: ``dense`` (independent of the row width) plus
    ``per_context`` times the width of its row (attention)."""

    dense: float
    per_context: float
    matmul_params: int  # weights of the matrix multiplies (N of "6N")
    trainable_matmul_params: int

    def micro_batch(self, rows: int, width: int, spans: float | None = None) -> float:
        """FLOPs of a forward and backward pass over ``rows`` rows of ``width`` positions.
        ``spans``: the sum of each attention span's length squared where rows hold packed
        examples (:func:`squared_spans`); by default every row is one span of ``width``."""
        spans = rows * width * width if spans is None else spans
        return rows * width * self.dense + self.per_context * spans


def squared_spans(position_ids: torch.Tensor) -> float:
    """The sum over a batch's examples of their length squared (:func:`plugtune.data.span_lengths`):
    the attention a kernel that keeps packed examples apart computes."""
    return float((span_lengths(position_ids).double() ** 2).sum())


def _matmul_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The weight of a matrix-multiply module (``nn.Linear``, GPT-2's ``Conv1D``, quantized
    linear layers), or None (embeddings, norms, containers)."""
    if isinstance(module, torch.nn.Embedding):
        return None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _numel(p: torch.Tensor) -> int:
    """Weights a tensor stands for (bitsandbytes' packed 4-bit ones carry their shape)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return shape.numel() if isinstance(shape, torch.Size) else p.numel()


def _attention_width(config: Any) -> int:
    """``heads x head_dim`` of a config (0 when it says neither)."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        return 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(heads * head_dim)


def flop_model(model: torch.nn.Module) -> FlopModel:
    """The :class:`FlopModel` of ``model`` as it trains now (its ``requires_grad`` flags),
    through any wrapper (peft, DDP)."""
    seen: set[int] = set()
    forward = inputs = trainable = 0
    grad_from = False  # a trainable weight came before: inputs need gradients from here on
    blocks = {id(b): i for i, b in enumerate(transformer_blocks(model))}
    attention_backward = [False] * len(blocks)
    for module in model.modules():  # pre-order: a block before its layers, in forward order
        own = list(module.parameters(recurse=False))
        if id(module) in blocks:  # gradients flow through its attention
            attention_backward[blocks[id(module)]] = grad_from or any(
                p.requires_grad for p in module.parameters())
        weight = _matmul_weight(module)
        if weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            n = _numel(weight)
            forward += n
            inputs += n if grad_from else 0
            trainable += n if weight.requires_grad else 0
        grad_from = grad_from or any(p.requires_grad for p in own)
    config = getattr(model, "config", None)
    width = _attention_width(config) if config is not None and not isinstance(config, dict) \
        else 0
    # 4 T d forward per layer, 8 T d more in backward where gradients flow through it
    attention = sum(4 * width * (3 if back else 1) for back in attention_backward)
    return FlopModel(dense=2.0 * (forward + inputs + trainable), per_context=float(attention),
                     matmul_params=forward, trainable_matmul_params=trainable)


def peak_tflops(device: Any, given: float | None = None) -> float | None:
    """The device's dense 16-bit peak in TFLOP/s: ``given`` (``train.peak_tflops``) where the
    recipe says, else the table's for a known CUDA GPU, else None (a CPU, an unknown GPU)."""
    if given is not None:
        return given
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for part, peak in PEAK_TFLOPS if part in name), None)


def report(work: dict[str, float], peak: float | None, prefix: str = "") -> dict[str, float]:
    """What ``work`` (``{"tokens", "positions", "flops", "seconds"}`` of a step, or of a run)
    says of the hardware, as ``metrics.jsonl`` keys: ``positions_per_token`` (positions the
    model computed per real token: 1 without padding or filler), ``tflops`` (achieved model
    TFLOP/s) and, where ``peak`` (TFLOP/s of all processes) is known, ``mfu`` (their ratio);
    with ``prefix="mean_"`` also ``mean_tokens_per_s``."""
    tokens, seconds = work.get("tokens", 0.0), work.get("seconds", 0.0)
    if not tokens or not seconds or not work.get("positions"):
        return {}
    tflops = work.get("flops", 0.0) / seconds / 1e12
    out = {f"{prefix}positions_per_token": work.get("positions", 0.0) / tokens,
           f"{prefix}tflops": tflops}
    if prefix:
        out[f"{prefix}tokens_per_s"] = tokens / seconds
    if peak:
        out[f"{prefix}mfu"] = tflops / peak
    return out
