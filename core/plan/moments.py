"""The estimate: the moments a training step passes through (end of forward, start of backward,
each block's backward, the optimizer step), the peak, and the framework overhead."""
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pluggy

from .api import Optimizer, Plan
from .budget import MiB
from .build import build
from .trace import Activations, trace

if TYPE_CHECKING:
    from ..recipe import Recipe


OVERHEAD = {"cuda": (512 * MiB, 0.05), "cpu": (48 * MiB, 0.03)}
#: ``--shard`` values whose processes divide the weights too (FSDP's FULL_SHARD is ZeRO-3)
FULL_SHARD = ("fsdp", "zero3")
#: every ``--shard`` value: ZeRO-2 (FSDP's SHARD_GRAD_OP) divides gradients and optimizer state
SHARDS = (*FULL_SHARD, "zero2")
#: DeepSpeed's stages, which keep float32 master weights (:meth:`Estimate.masters`)
ZERO = ("zero2", "zero3")
MASTERS = "master weights (ZeRO)"


@dataclass
class Moment:
    name: str
    parts: dict[str, float]  # component -> bytes at this moment

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Estimate:
    """A plan with its activations: the peak at any micro-batch size."""

    plan: Plan
    acts: Activations

    @property
    def weights(self) -> int:
        """Weight bytes one process holds: all of them, or under FSDP / ZeRO-3 its shard of
        each shardable weight plus what is gathered whole to compute (:meth:`gathered`)."""
        whole = sum(p.bytes for p in self.plan.params)
        if self.plan.shard not in FULL_SHARD:
            return whole
        shardable = sum(p.bytes for p in self.plan.params if p.shardable)
        return whole - shardable + math.ceil(shardable / self.plan.processes) + self.gathered()

    def gathered(self) -> int:
        """Weight bytes gathered whole at once under FSDP / ZeRO-3 (shard bytes a process
        holds anyway not subtracted), as accelerate wraps a model: a unit per transformer
        block, the input embeddings one of their own (gathered only at the start of forward and
        the end of backward, when no block is), and the final norm with the output layer
        (and tied embeddings) one that stays gathered from the end of forward into backward;
        at the peak that one and two blocks (the one computing, the next prefetched)."""
        if self.plan.shard not in FULL_SHARD or self.plan.processes == 1:
            return 0
        model = self.plan.model
        embed = getattr(model.get_input_embeddings(), "weight", None)
        output = getattr(model.get_output_embeddings(), "weight", None)
        blocks = [0] * len(self.acts.blocks)
        tail = 0
        for p in self.plan.params:
            if not p.shardable or (p.tensor is embed and embed is not output):
                continue
            if p.block is None or p.block >= len(blocks):
                tail += p.bytes
            else:
                blocks[p.block] += p.bytes
        return tail + sum(sorted(blocks)[-2:])

    def masters(self) -> float:
        """DeepSpeed ZeRO's float32 copy of the trained parameters (its optimizer steps that
        copy, whatever the model's dtype), this process's partition."""
        return self.divided(4 * sum(p.numel for p in self.plan.trainable()))

    def divided(self, nbytes: float) -> float:
        """``nbytes`` of gradients or optimizer state, as one process holds them (divided among
        the processes by FSDP and ZeRO-2/3)."""
        return nbytes / self.plan.processes if self.plan.shard else nbytes

    def grads(self) -> tuple[int, int, list[int]]:
        """``(all, outside the blocks, per block)`` gradient bytes."""
        blocks = [0] * len(self.acts.blocks)
        outside = 0
        for p in self.plan.trainable():
            nbytes = p.numel * p.dtype.itemsize
            if p.block is None or p.block >= len(blocks):
                outside += nbytes
            else:
                blocks[p.block] += nbytes
        outside, blocks = int(self.divided(outside)), [int(self.divided(b)) for b in blocks]
        return outside + sum(blocks), outside, blocks

    def with_batch(self, batch_size: int, grad_accum: int) -> "Estimate":
        """The same plan at another micro-batch size and accumulation (activations scale with
        the tokens of a micro-batch; gradients stay between micro-batches when accumulating)."""
        plan = replace(self.plan, batch_size=batch_size, grad_accum=grad_accum)
        return Estimate(plan, self.acts)

    def moments(self) -> list[Moment]:
        """The moments of a training step, each with the bytes of every component."""
        plan, a = self.plan, self.acts
        n = plan.batch_size * plan.seq_len
        ckpt = plan.checkpointed
        opt = plan.optimizer or Optimizer("none", 0)
        resident: dict[str, float] = {"weights": self.weights, "optimizer state": 0
                                      if opt.paged and plan.device == "cuda"
                                      else self.divided(opt.state)}
        if plan.shard in ZERO:
            resident[MASTERS] = self.masters()
        for m in plan.extra:
            resident[m.name] = m.bytes
        g_all, g_out, g_blocks = self.grads()
        kept = [(0 if plan.offloaded and plan.device == "cuda" else i) * n if k in ckpt
                else b * n for k, (i, b) in enumerate(zip(a.inputs, a.blocks))]
        before, after = a.before * n, a.after * n
        scored = min(n, plan.loss_chunk_tokens or n)  # tokens whose logits exist at once
        logits, l32 = a.logits * scored, a.logits_fp32 * scored
        upcast = l32 if logits != l32 else 0
        held = g_all if plan.grad_accum > 1 else 0  # gradients kept between micro-batches

        def moment(name: str, grads: float, acts: float, buffers: float,
                   step: float = 0) -> Moment:
            parts = dict(resident, gradients=grads, activations=acts)
            parts["logits and loss buffers"] = buffers
            parts["optimizer step"] = step
            return Moment(name, parts)

        # Under autocast accelerate converts the outputs to float32 once the loss's own float32
        # copy of the logits is gone; the loss keeps its float32 log-probabilities (in `after`).
        mixed = l32 if plan.mixed_precision != "no" else 0
        acts, lsm = sum(kept) + before + after, min(l32, after)
        out = [moment("end of forward", held, acts, logits + max(upcast, mixed)),
               moment("start of backward", held, acts, 2 * l32 + (logits if upcast else 0)),
               moment("backward of the output layer", max(held, g_out), acts - lsm,
                      l32 + (logits if upcast else 0))]
        for k in reversed(range(len(kept))):
            grads = g_all if held else g_out + sum(g_blocks[k:])
            block = a.blocks[k] * n
            transient = (2 * a.largest[k] + a.inputs[k]) * n
            below = sum(kept[:k]) + before
            acts = below + (kept[k] + block if k in ckpt else block) + transient
            out.append(moment(f"backward of block {k}", grads, acts, 0))
        out.append(moment("optimizer step", g_all, 0, 0, opt.step))
        return out

    def peak(self) -> Moment:
        return max(self.moments(), key=lambda m: m.total)

    def overhead(self, tensors: float) -> int:
        fixed, share = OVERHEAD[self.plan.device]
        return int(fixed + share * tensors)

    def total(self) -> float:
        """Bytes the run needs at its peak, the framework overhead included."""
        tensors = self.peak().total
        return tensors + self.overhead(tensors)


def estimate(recipe: "Recipe", pm: pluggy.PluginManager, device: str = "cuda",
             processes: int = 1, shard: str | None = None) -> Estimate:
    """The :class:`Estimate` of a validated recipe (``plugtune plan`` and ``plugtune run``),
    for one of ``processes`` data-parallel processes dividing the state as ``shard`` says
    (:data:`SHARDS`; None: each holds it all)."""
    plan = build(recipe, pm, device)
    plan.processes, plan.shard = processes, shard
    pm.hook.plugtune_estimate_memory(plan=plan, recipe=recipe)
    return Estimate(plan, trace(plan, pm))
