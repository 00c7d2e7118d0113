"""Activations: one forward pass on meta tensors records every tensor autograd keeps for
backward, per transformer block and per token (attention counted as the fused kernels keep it)."""
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from ..errors import PluginError
from ..models import transformer_blocks
from .api import Plan


@dataclass
class Activations:
    """Bytes per token of the micro-batch that one forward pass keeps for backward."""

    blocks: list[float]  # kept by each transformer block (without checkpointing)
    inputs: list[float]  # each block's input (what a checkpointed block keeps)
    largest: list[float]  # the largest single kept tensor of each block
    before: float  # kept before the first block (embeddings)
    after: float  # kept after the last block (final norm, output layer, loss)
    logits: float  # the output layer's result, per token it covers
    logits_fp32: float  # the same in float32 (the loss upcasts it)


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention: keeps what the fused kernels keep."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dim() == 4:  # the kernels write (batch, seq, heads, dim): transposing back is free
            b, h, s, _ = q.shape
            out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)
        else:
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # pragma: no cover - never on meta
        raise NotImplementedError


class _AttentionAsFused(torch.overrides.TorchFunctionMode):
    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            # With dropout on a CPU torch falls back to the math kernel, which the meta pass counts
            dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if not dropout or self.device == "cuda":
                return _FusedAttention.apply(*args[:3])
        return func(*args, **kwargs)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@contextmanager
def _checkpointing_off(model: torch.nn.Module) -> Iterator[None]:
    """Trace blocks without checkpointing (the planner counts checkpointing itself)."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in switched:
        m.gradient_checkpointing = False  # type: ignore[assignment]  # torch types module
        # attributes as tensors or modules only
    try:
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True  # type: ignore[assignment]  # (see above)


def trace(plan: Plan, pm: pluggy.PluginManager) -> Activations:
    """Run one forward pass of the planned model on meta tensors and return its
    :class:`Activations` per token."""
    model, n = plan.model, plan.seq_len
    if plan.mixed_precision != "no":  # autocast runs the matrix products in 16 bits
        model = model.to(torch.bfloat16 if plan.mixed_precision == "bf16" else torch.float16)
    model.train()
    params = {_key(p) for p in model.parameters()}
    blocks = transformer_blocks(model)
    L = len(blocks)
    kept: dict[int, tuple[int, int]] = {}  # storage -> (region, bytes); region: block
    # index, -1 before, L after
    inputs, state = [0] * L, {"region": -1}

    # a freed storage's address could be reused and then miscounted as kept
    alive: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = _key(t)
        if k not in params and k not in kept:
            kept[k] = (state["region"], t.untyped_storage().nbytes())
            alive.append(t)
        return t

    def enter(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            state["region"] = i
            seen = set()
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and _key(t) not in seen:
                    seen.add(_key(t))
                    inputs[i] += t.untyped_storage().nbytes()
        return hook

    def leave(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            state["region"] = L if i == L - 1 else i
        return hook

    def keep_input(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.requires_grad:
            pack(x)

    logits: dict[str, float] = {}

    # per token of its largest call (a chunked loss calls it a chunk at a time)
    def output_layer(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.numel() > logits.get("numel", 0):
            tokens = output.shape[:-1].numel()
            logits.update(numel=output.numel(), bytes=output.untyped_storage().nbytes() / tokens,
                          fp32=output.numel() * 4 / tokens)

    handles = [b.register_forward_pre_hook(enter(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave(i)) for i, b in enumerate(blocks)]
    keeping = {id(p.tensor) for p in plan.params if p.keeps_input}
    for m in model.modules():
        if any(id(p) in keeping for p in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(keep_input))
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        handles.append(out.register_forward_hook(output_layer))
    try:
        assert plan.make_batch is not None, "Plan.make_batch unset"  # build() sets it
        batch = plan.make_batch(1, n)
        with _checkpointing_off(model), _AttentionAsFused(plan.device), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm.hook.plugtune_compute_loss(model=model, batch=batch, recipe=plan.recipe)
        if loss is None:
            raise PluginError("no active plugin computes the loss; add a task plugin to "
                              "plugins: (`plugtune plugins` lists them)")
    finally:
        for handle in handles:
            handle.remove()
    per_block, largest = [0] * L, [0] * L
    before = after = 0
    for region, nbytes in kept.values():
        if region < 0:
            before += nbytes
        elif region >= L:
            after += nbytes
        else:
            per_block[region] += nbytes
            largest[region] = max(largest[region], nbytes)
    return Activations([b / n for b in per_block], [i / n for i in inputs],
                       [x / n for x in largest], before / n, after / n,
                       logits.get("bytes", 0), logits.get("fp32", 0))
