"""The memory planner: what a recipe's training run will hold in memory, component by component,
worked out from the model's config alone (no weights are downloaded or loaded), and the plugins
and settings that make a recipe fit a budget. ``plugtune plan`` is this module.

How a plan is made:

1. The loader plugin reads the model's config (``plugtune_model_config``): a local directory, a
   GGUF header, the shipped catalog of common models by hub id, or the hub when reachable.
2. The model is built on the meta device (shapes without memory) and the run's own model phases
   run on it (k-bit preparation, heads, gradient checkpointing, adapters, trainable parameters),
   so whatever plugins add, wrap or freeze is counted exactly.
3. Every active plugin adjusts the plan (``plugtune_estimate_memory``): how it stores weights,
   its optimizer's state, memory it holds besides.
4. One forward pass on meta tensors records every tensor autograd keeps for backward, per
   transformer block and per token. Attention is counted as the fused kernels that transformers
   uses by default (SDPA: flash, memory-efficient, CPU flash) keep it: q, k, v, the output and a
   log-sum-exp per row, never the sequence-by-sequence matrix.
5. The peak is the largest of the moments a training step passes through: the end of the forward
   pass, the start of backward (the loss and logits gradients), each block's backward (activations
   of the blocks below still kept, gradients of the blocks above already made) and the optimizer
   step. Gradients stay between micro-batches when ``train.grad_accum`` > 1.

Sequences are planned at ``train.max_length`` tokens, with no padding: the longest batch a run
can meet.
"""
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path

import torch

from .errors import PlugtuneError, PluginError, RecipeError

KiB, MiB, GiB = 2**10, 2**20, 2**30

# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------

#: GPU names ``--gpu`` accepts: (description, total memory as nvidia-smi reports it, in MiB).
GPUS = {
    "t4": ("NVIDIA T4 16 GB", 15360),
    "v100-16g": ("NVIDIA V100 16 GB", 16384),
    "v100-32g": ("NVIDIA V100 32 GB", 32768),
    "rtx3060": ("NVIDIA GeForce RTX 3060 12 GB", 12288),
    "rtx3090": ("NVIDIA GeForce RTX 3090 24 GB", 24576),
    "rtx4080": ("NVIDIA GeForce RTX 4080 16 GB", 16376),
    "rtx4090": ("NVIDIA GeForce RTX 4090 24 GB", 24564),
    "a10g": ("NVIDIA A10G 24 GB", 23028),
    "l4": ("NVIDIA L4 24 GB", 23034),
    "a6000": ("NVIDIA RTX A6000 48 GB", 49140),
    "l40s": ("NVIDIA L40S 48 GB", 46068),
    "a100-40g": ("NVIDIA A100 40 GB", 40960),
    "a100-80g": ("NVIDIA A100 80 GB", 81920),
    "h100-80g": ("NVIDIA H100 80 GB", 81559),
    "h200": ("NVIDIA H200 141 GB", 143771),
}
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
         "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 2**40}


def parse_budget(text):
    """``(bytes, label)`` for ``24GiB``, ``24GB`` (decimal), ``16000MiB`` or a GPU name."""
    key = text.strip().lower().replace("_", "-")
    if key in GPUS:
        name, mib = GPUS[key]
        return mib * MiB, f"{key}: {name}, {mib * MiB / GiB:.1f} GiB"
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", key)
    if not match or match.group(2) not in UNITS:
        raise RecipeError([f"--gpu {text}: give a size such as 24GiB or 16GB, or a GPU name: "
                           + ", ".join(GPUS)])
    return int(float(match.group(1)) * UNITS[match.group(2)]), text.strip()


def size(n):
    """Bytes for people: ``1.5 GiB``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if abs(n) < 10 * scale else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def count(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------
# Model configs: local directory, GGUF header, catalog, hub
# ---------------------------------------------------------------------------------------------


def catalog():
    """``{hub id: config.json path}`` of the configs that ship with plugtune."""
    root = files("plugtune.catalog")
    index = json.loads((root / "index.json").read_text())
    return {hub_id: root / name for hub_id, name in index.items()}


def read_config(source, trust_remote_code=False):
    """The transformers config of ``source`` without loading weights: a ``save_pretrained``
    directory, a ``.gguf`` file (its header only), a hub id of the catalog (offline), or any hub
    id when the hub is reachable."""
    from transformers import AutoConfig

    path = Path(str(source))
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir():
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    known = catalog()
    if str(source) in known:
        data = json.loads(known[str(source)].read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise RecipeError([f"model.name: cannot read the config of {source!r} ({exc}); it is not "
                           "a local directory or .gguf file, the hub is unreachable, and the "
                           "offline catalog has: " + ", ".join(sorted(known))]) from exc


# ---------------------------------------------------------------------------------------------
# The plan that plugins adjust
# ---------------------------------------------------------------------------------------------


@dataclass
class Param:
    """One parameter tensor as the planner counts it."""

    name: str  # its name in the model as loaded (adapters: their name after wrapping)
    shape: tuple
    dtype: torch.dtype  # after the model phases (k-bit preparation casts 16-bit weights to fp32)
    trainable: bool
    block: int | None  # index of the transformer block that holds it; None outside the blocks
    module: str  # class name of the module that owns it: "Linear", "Embedding", ...
    module_name: str  # that module's name in the model as loaded (before adapters wrapped it)
    added: bool  # a model phase added it (adapter, head): not part of the loaded checkpoint
    storage: str = ""  # how it is stored when not as a dense tensor of `dtype` ("int8", "nf4")
    nbytes: int | None = None  # its bytes when `storage` is set
    keeps_input: bool = False  # its kernel keeps the layer input for backward although frozen
    tensor: object = field(default=None, repr=False, compare=False)  # the meta parameter

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def bytes(self):
        return self.nbytes if self.nbytes is not None else self.numel * self.dtype.itemsize

    @property
    def kind(self):
        return self.storage or str(self.dtype).removeprefix("torch.")


@dataclass
class Optimizer:
    """The optimizer's memory, as the optimizer plugin reports it."""

    name: str  # what the table shows, e.g. "AdamW (torch): 2 states of the parameter dtype"
    state: int  # bytes of state for all trainable parameters
    step: int = 0  # bytes allocated only while optimizer.step() runs
    paged: bool = False  # state in CUDA unified memory: pages out to CPU RAM when short


@dataclass
class Memory:
    """Memory a plugin holds for the whole run (a reference model, an EMA copy, ...)."""

    name: str
    bytes: int
    detail: str = ""


@dataclass
class Plan:
    """What plugins see and adjust in ``plugtune_estimate_memory``."""

    recipe: object
    model: object  # the model on the meta device, after the run's model phases
    params: list  # of Param
    device: str  # "cuda" or "cpu"
    batch_size: int
    seq_len: int
    grad_accum: int
    mixed_precision: str = "no"
    checkpointed: set = field(default_factory=set)  # blocks that keep only their input and
    # recompute the rest in backward (read off the model after the phases)
    offloaded: bool = False  # checkpointed blocks keep their input in host memory instead
    optimizer: Optimizer | None = None
    extra: list = field(default_factory=list)  # of Memory
    notes: list = field(default_factory=list)  # shown under the table
    make_batch: object = None  # (batch_size, seq_len) -> dict of meta tensors for the loss hook
    keep_unquantized: list = field(default_factory=list)  # modules quantizers skip by default
    architecture: str = ""  # the loaded model's class, before adapters wrap it

    def trainable(self):
        return [p for p in self.params if p.trainable]

    def add(self, name, nbytes, detail=""):
        """Count memory this plugin holds for the whole run."""
        self.extra.append(Memory(name, int(nbytes), detail))

    def quantize(self, params, storage, nbytes, keeps_input=False):
        """Count ``params`` as stored quantized, ``nbytes(param)`` bytes each (the quantizing
        plugins' helper). On a CPU the checkpoint file stays memory-mapped after loading, and
        the pages read to quantize these weights stay resident (clean pages the system may
        drop under pressure): counted as their own component."""
        read, itemsize = 0, getattr(torch, self.recipe.model.dtype).itemsize
        for p in params:
            p.storage, p.nbytes, p.keeps_input = storage, nbytes(p), keeps_input
            read += p.numel * itemsize
        if self.device == "cpu" and read:
            self.add("checkpoint pages read to quantize", read, "CPU only: the safetensors "
                     "file stays mapped; clean pages the system can drop")

    def base_linear_weights(self, skip=()):
        """Weights of the loaded model's ``nn.Linear`` layers (the ones bitsandbytes quantizes),
        except modules whose name or last name part is in ``skip``."""
        skip = set(skip)
        return [p for p in self.params if p.module == "Linear" and not p.added
                and p.name.endswith("weight") and p.module_name not in skip
                and p.module_name.rsplit(".", 1)[-1] not in skip]


def causal_batch(batch_size, seq_len):
    """A causal-LM batch on the meta device: every sequence ``seq_len`` tokens, no padding."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids}


# ---------------------------------------------------------------------------------------------
# Building a plan
# ---------------------------------------------------------------------------------------------


def transformer_blocks(model):
    """The model's repeated blocks: the largest ``nn.ModuleList`` (``model.layers``,
    ``transformer.h``, ...), or an empty list."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def meta_model(h, recipe):
    """The recipe's model on the meta device, as the loader would load it (class, dtype,
    config-level loading arguments such as a head's ``num_labels``)."""
    from transformers import AutoModelForCausalLM

    from .loop import model_kwargs

    config = h.plugtune_model_config(recipe=recipe)
    if config is None:
        raise PluginError("no active plugin implements plugtune_model_config (read the model's "
                          "config without loading it), so the planner cannot see the model")
    for key, value in model_kwargs(h, recipe).items():
        if hasattr(config, key) and not key.startswith("quantization"):
            setattr(config, key, value)
    model_class = h.plugtune_model_class(recipe=recipe) or AutoModelForCausalLM
    with torch.device("meta"):
        model = model_class.from_config(config, dtype=getattr(torch, recipe.model.dtype),
                                        trust_remote_code=recipe.model.trust_remote_code)
    model.tie_weights()
    return model


def build(recipe, pm, device="cuda"):
    """The plan of ``recipe`` before plugins adjust it: the meta model through the model phases
    and its parameters."""
    from .loop import adapt, prepare

    h = pm.hook
    model = meta_model(h, recipe)
    loaded = {id(p): n for n, p in model.named_parameters()}
    architecture = type(model).__name__
    keep = _not_quantized_by_default(model)
    owners = {}
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), (module_name, type(module).__name__))
    blocks = {id(p): i for i, block in enumerate(transformer_blocks(model))
              for p in block.parameters()}
    with torch.device("meta"):
        model = adapt(h, recipe, prepare(h, recipe, model))
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), (module_name, type(module).__name__))
    blocks.update({id(p): i for i, block in enumerate(transformer_blocks(model))
                   for p in block.parameters() if id(p) not in blocks})
    checkpointed = {i for i, block in enumerate(transformer_blocks(model))
                    if getattr(block, "gradient_checkpointing", False) is True}
    params = []
    for name, p in model.named_parameters():
        module_name, module = owners[id(p)]
        base = id(p) in loaded
        params.append(Param(loaded[id(p)] if base else name, tuple(p.shape), p.dtype,
                            p.requires_grad, blocks.get(id(p)), module,
                            loaded[id(p)].rpartition(".")[0] if base else module_name, not base,
                            tensor=p))
    t = recipe.train
    return Plan(recipe, model, params, device, t.batch_size, t.max_length, t.grad_accum,
                t.mixed_precision, checkpointed=checkpointed, make_batch=causal_batch,
                keep_unquantized=keep, architecture=architecture)


def _not_quantized_by_default(model):
    """The modules transformers' quantizers leave in full precision unless told otherwise (the
    output layer, tied weights)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # pragma: no cover - older transformers
        return ["lm_head"]
    return list(get_keys_to_not_convert(model))


# ---------------------------------------------------------------------------------------------
# Activations: one forward pass on meta tensors
# ---------------------------------------------------------------------------------------------


@dataclass
class Activations:
    """Bytes per token of the micro-batch that one forward pass keeps for backward."""

    blocks: list  # kept by each transformer block (without checkpointing)
    inputs: list  # each block's input (what a checkpointed block keeps)
    largest: list  # the largest single kept tensor of each block
    before: float  # kept before the first block (embeddings)
    after: float  # kept after the last block (final norm, output layer, loss)
    logits: float  # the output layer's result
    logits_fp32: float  # the same in float32 (the loss upcasts it)


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention: keeps what the fused kernels keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        if q.dim() == 4:  # the kernels write (batch, seq, heads, dim): transposing back is free
            b, h, s, _ = q.shape
            out = q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)
        else:
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never runs on meta tensors
        raise NotImplementedError


class _AttentionAsFused(torch.overrides.TorchFunctionMode):
    def __init__(self, device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            # With dropout on a CPU torch falls back to the math kernel, which the meta pass counts
            dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if not dropout or self.device == "cuda":
                return _FusedAttention.apply(*args[:3])
        return func(*args, **kwargs)


def _key(t):
    return t.untyped_storage()._cdata


@contextmanager
def _checkpointing_off(model):
    """Trace blocks without checkpointing (the planner counts checkpointing itself)."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in switched:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True


def trace(plan, pm):
    """Run one forward pass of the planned model on meta tensors and return its
    :class:`Activations` per token."""
    model, n = plan.model, plan.seq_len
    if plan.mixed_precision != "no":  # autocast runs the matrix products in 16 bits
        model = model.to(torch.bfloat16 if plan.mixed_precision == "bf16" else torch.float16)
    model.train()
    params = {_key(p) for p in model.parameters()}
    blocks = transformer_blocks(model)
    L = len(blocks)
    kept = {}  # storage -> (region, bytes); region: block index, -1 before, L after
    inputs, state = [0] * L, {"region": -1}

    alive = []  # a freed storage's address could be reused and then miscounted as kept

    def pack(t):
        k = _key(t)
        if k not in params and k not in kept:
            kept[k] = (state["region"], t.untyped_storage().nbytes())
            alive.append(t)
        return t

    def enter(i):
        def hook(module, args, kwargs):
            state["region"] = i
            seen = set()
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and _key(t) not in seen:
                    seen.add(_key(t))
                    inputs[i] += t.untyped_storage().nbytes()
        return hook

    def leave(i):
        def hook(module, args, output):
            state["region"] = L if i == L - 1 else i
        return hook

    def keep_input(module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.requires_grad:
            pack(x)

    logits = {}

    def output_layer(module, args, output):
        if isinstance(output, torch.Tensor):
            logits["bytes"] = output.untyped_storage().nbytes()
            logits["fp32"] = output.numel() * 4

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
        batch = plan.make_batch(1, n)
        with _checkpointing_off(model), _AttentionAsFused(plan.device), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm.hook.plugtune_compute_loss(model=model, batch=batch, recipe=plan.recipe)
        if loss is None:
            raise PluginError("no active plugin computes the loss; add a task plugin such as "
                              "causal_lm")
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
                       logits.get("bytes", 0) / n, logits.get("fp32", 0) / n)


# ---------------------------------------------------------------------------------------------
# The estimate: moments of a training step and the peak
# ---------------------------------------------------------------------------------------------

#: Memory the framework needs beyond the tensors: CUDA context, kernels and the caching
#: allocator's rounding and fragmentation on a GPU; the allocator's arenas and library buffers
#: on a CPU (calibrated on this project's CPU measurements, see docs/memory.md).
OVERHEAD = {"cuda": (512 * MiB, 0.05), "cpu": (48 * MiB, 0.03)}


@dataclass
class Moment:
    name: str
    parts: dict  # component -> bytes at this moment

    @property
    def total(self):
        return sum(self.parts.values())


@dataclass
class Estimate:
    """A plan with its activations: the peak at any micro-batch size."""

    plan: Plan
    acts: Activations

    @property
    def weights(self):
        return sum(p.bytes for p in self.plan.params)

    def grads(self):
        """``(all, outside the blocks, per block)`` gradient bytes."""
        blocks = [0] * len(self.acts.blocks)
        outside = 0
        for p in self.plan.trainable():
            nbytes = p.numel * p.dtype.itemsize
            if p.block is None or p.block >= len(blocks):
                outside += nbytes
            else:
                blocks[p.block] += nbytes
        return outside + sum(blocks), outside, blocks

    def with_batch(self, batch_size, grad_accum):
        """The same plan at another micro-batch size and accumulation (activations scale with
        the tokens of a micro-batch; gradients stay between micro-batches when accumulating)."""
        plan = replace(self.plan, batch_size=batch_size, grad_accum=grad_accum)
        return Estimate(plan, self.acts)

    def moments(self):
        """The moments of a training step, each with the bytes of every component."""
        plan, a = self.plan, self.acts
        n = plan.batch_size * plan.seq_len
        ckpt = plan.checkpointed
        opt = plan.optimizer or Optimizer("none", 0)
        resident = {"weights": self.weights,
                    "optimizer state": 0 if opt.paged and plan.device == "cuda" else opt.state}
        for m in plan.extra:
            resident[m.name] = m.bytes
        g_all, g_out, g_blocks = self.grads()
        kept = [(0 if plan.offloaded and plan.device == "cuda" else i) * n if k in ckpt
                else b * n for k, (i, b) in enumerate(zip(a.inputs, a.blocks))]
        before, after = a.before * n, a.after * n
        logits, l32 = a.logits * n, a.logits_fp32 * n
        upcast = l32 if logits != l32 else 0
        held = g_all if plan.grad_accum > 1 else 0  # gradients kept between micro-batches

        def moment(name, grads, acts, buffers, step=0):
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

    def peak(self):
        return max(self.moments(), key=lambda m: m.total)

    def overhead(self, tensors):
        fixed, share = OVERHEAD[self.plan.device]
        return int(fixed + share * tensors)

    def total(self):
        """Bytes the run needs at its peak, the framework overhead included."""
        tensors = self.peak().total
        return tensors + self.overhead(tensors)


def estimate(recipe, pm, device="cuda"):
    """The :class:`Estimate` of a validated recipe (``plugtune plan`` and ``plugtune run``)."""
    plan = build(recipe, pm, device)
    pm.hook.plugtune_estimate_memory(plan=plan, recipe=recipe)
    return Estimate(plan, trace(plan, pm))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def describe(est, budget=None, label=None):
    """The plan as a table of components, the peak and the verdict (lines of text)."""
    plan, a = est.plan, est.acts
    peak = est.peak()
    n = plan.batch_size * plan.seq_len
    total_params = sum(p.numel for p in plan.params)
    trainable = sum(p.numel for p in plan.trainable())
    r = plan.recipe
    lines = [f"model: {r.model.name} ({plan.architecture}, {count(total_params)} "
             f"parameters, dtype {r.model.dtype})",
             f"plugins: {', '.join(r.plugins)}; micro-batch {plan.batch_size} x {plan.seq_len} "
             f"tokens, grad_accum {plan.grad_accum}, mixed_precision {plan.mixed_precision}; "
             f"device {plan.device}", ""]
    rows = []

    def row(name, nbytes, detail=""):
        rows.append((name, "" if nbytes is None else size(nbytes), detail))

    row("weights", est.weights)
    kinds = {}
    for p in plan.params:
        key = (p.kind, p.added)
        c, b = kinds.get(key, (0, 0))
        kinds[key] = (c + p.numel, b + p.bytes)
    for (kind, added), (c, b) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        what = "added by plugins (adapters, heads)" if added else "of the model"
        row(f"  {kind}", b, f"{count(c)} params {what}, {b / c:.3g} B/param")
    row("trainable parameters", None, f"{count(trainable)} of {count(total_params)} "
        f"({100 * trainable / max(total_params, 1):.2f}%)")
    g_all = est.grads()[0]
    at = peak.parts["gradients"]
    row("gradients", at, f"of the trainable parameters{'' if at == g_all else f'; {size(g_all)} once all are made'}")
    opt = plan.optimizer
    if opt is not None:
        paged = " (paged: can spill to CPU RAM, not counted)" if opt.paged and plan.device == "cuda" else ""
        row("optimizer state", opt.state, opt.name + paged)
    for m in plan.extra:
        row(m.name, m.bytes, m.detail)
    per_layer = sum(a.blocks) / max(len(a.blocks), 1)
    per_input = sum(a.inputs) / max(len(a.inputs), 1)
    row("activations", peak.parts["activations"], "kept for backward at the peak")
    row("  per block and token", None, f"{size(per_layer)} without gradient checkpointing, "
        f"{size(per_input)} with it; {len(a.blocks)} blocks x {n:,} tokens")
    ckpt = (f"gradient checkpointing on {len(plan.checkpointed)} of {len(a.blocks)} blocks"
            if plan.checkpointed else "no gradient checkpointing")
    kept = sum(i if k in plan.checkpointed else b for k, (i, b) in enumerate(zip(a.inputs, a.blocks)))
    row("  all blocks", n * kept, f"{ckpt}; outside the blocks {size((a.before + a.after) * n)}")
    row("logits and loss buffers", peak.parts["logits and loss buffers"],
        f"logits {size(a.logits * n)} ({size(a.logits)} per token), upcast and gradients")
    if peak.parts["optimizer step"]:
        row("optimizer step buffers", peak.parts["optimizer step"], "only during the step")
    tensors = peak.total
    overhead = est.overhead(tensors)
    fixed, share = OVERHEAD[plan.device]
    row("framework overhead", overhead, f"{size(fixed)} + {share:.0%} "
        + ("(CUDA context, allocator)" if plan.device == "cuda" else "(allocator, libraries)"))
    total = tensors + overhead
    width = max(len(x[0]) for x in rows) + 2
    lines += [f"{'component':<{width}}{'bytes':>11}  detail"]
    lines += [f"{name:<{width}}{value:>11}  {detail}".rstrip() for name, value, detail in rows]
    lines += ["-" * (width + 11), f"{'peak total':<{width}}{size(total):>11}  at the {peak.name}"]
    if budget is not None:
        head = budget - total
        verdict = (f"fits, headroom {size(head)}" if head >= 0
                   else f"does NOT fit: {size(-head)} over")
        lines.append(f"{'budget':<{width}}{size(budget):>11}  {label}: {verdict}")
    lines += [f"note: {note}" for note in plan.notes]
    return lines


# ---------------------------------------------------------------------------------------------
# --fit: the first combination that fits, in order of least quality cost
# ---------------------------------------------------------------------------------------------

#: The plugins --fit chooses among (their sections are dropped when the plugin is).
METHODS = ("full", "freeze", "lora", "int8", "nf4")
CHECKPOINTING = "gradient_checkpointing"


@dataclass
class Candidate:
    label: str
    tree: dict
    estimate: Estimate
    batch_size: int
    grad_accum: int

    @property
    def total(self):
        return self.estimate.total()


def adapter_of(plugins, discovered):
    """The recipe's adapter plugin (one that wraps the model: lora, ia3, ...); lora if none."""
    return next((p for p in plugins if p in discovered
                 and hasattr(discovered[p].obj, "plugtune_wrap_model")), "lora")


def rungs(tree, blocks, adapter="lora"):
    """``(label, plugins, sections)`` from the least quality cost to the most: every weight
    trains, then the last half/quarter/eighth of the blocks, then adapters (the recipe's own
    method, else lora) on a 16/32-bit, an 8-bit and a 4-bit base."""
    out = [("full", ["full"], {})]
    for n in dict.fromkeys(max(1, blocks // d) for d in (2, 4, 8)):
        out.append((f"freeze (train the last {n} of {blocks} blocks)", ["freeze"],
                    {"freeze": {"last_n_blocks": n}}))
    section = {adapter: tree.get(adapter) or {}}
    out += [(adapter, [adapter], section), (f"int8 + {adapter}", ["int8", adapter], section),
            (f"nf4 + {adapter}", ["nf4", adapter], section)]
    return out


def start_rung(plugins, ladder, adapter="lora"):
    """Where the search starts: the recipe's own method (it is never 'upgraded' past it)."""
    chosen = [p for p in plugins if p in METHODS or p == adapter]
    for i, (_, names, _) in enumerate(ladder):
        if set(names) == set(chosen) or (chosen == ["freeze"] and names == ["freeze"]):
            return i
    return 0


def variant(tree, names, sections, checkpointing, adapter="lora"):
    """``tree`` with its method plugins replaced by ``names`` (and their sections)."""
    import copy

    methods = METHODS + (adapter,)
    out = copy.deepcopy(tree)
    plugins = [p for p in out.get("plugins") or [] if p not in methods and p != CHECKPOINTING]
    out["plugins"] = plugins + names + ([CHECKPOINTING] if checkpointing else [])
    for name in methods:
        if name not in names:
            out.pop(name, None)
    for name, section in sections.items():
        if name not in tree or name == "freeze":  # the recipe's own settings win
            out[name] = section
    return out


def micro_batches(batch, accum):
    """``(micro-batch, grad_accum)`` pairs with the same effective batch, largest first."""
    effective = batch * accum
    return [(b, effective // b) for b in range(batch, 0, -1) if effective % b == 0]


def search(recipe, blocks, budget, device, discovered, echo=print):
    """``(the first Candidate that fits budget or None, the least demanding one tried)``;
    ``echo`` reports each combination tried."""
    from . import recipe as recipes

    tree, own_ckpt = recipe.raw, CHECKPOINTING in recipe.plugins
    adapter = adapter_of(recipe.plugins, discovered)
    ladder = rungs(tree, blocks, adapter)
    if "freeze" in recipe.plugins:  # the recipe's own freeze settings come first
        ladder.insert(1, ("freeze (as the recipe says)", ["freeze"], {}))
    smallest = None
    with tempfile_dir() as tmp:
        for label, names, sections in ladder[start_rung(recipe.plugins, ladder, adapter):]:
            # the recipe's micro-batch as it is, then with gradient checkpointing, then
            # checkpointing with smaller micro-batches (the effective batch kept)
            batches = micro_batches(recipe.train.batch_size, recipe.train.grad_accum)
            steps = [(False, batches[:1])] if not own_ckpt else []
            steps.append((True, batches))
            for ckpt, sizes in steps:
                if not all(n in discovered for n in names + [CHECKPOINTING] * ckpt):
                    continue
                t = variant(tree, names, sections, ckpt, adapter)
                path = Path(tmp) / "candidate.yaml"
                path.write_text(yaml_dump(t))
                name = label + (" + gradient checkpointing" if ckpt else "")
                try:
                    est = estimate(*recipes.load_recipe(path, discovered=discovered), device)
                except RecipeError as exc:  # a combination the plugins refuse (loha + nf4)
                    echo(f"  {name}: not allowed: {'; '.join(exc.problems)}")
                    continue
                for b, accum in sizes:
                    train = {**(t.get("train") or {}), "batch_size": b, "grad_accum": accum}
                    c = Candidate(name, {**t, "train": train}, est.with_batch(b, accum), b, accum)
                    if smallest is None or c.total < smallest.total:
                        smallest = c
                    fits = c.total <= budget
                    echo(f"  {name}, micro-batch {b} x {accum} accumulated: {size(c.total)}"
                         + (": fits" if fits else ""))
                    if fits:
                        return c, smallest
    return None, smallest


@contextmanager
def tempfile_dir():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="plugtune-plan-") as tmp:
        yield tmp


def yaml_dump(tree, header=""):
    import yaml

    return header + yaml.safe_dump(tree, sort_keys=False)


def changes(recipe, chosen, adapter="lora"):
    """What --fit changed, in words."""
    out = []
    t, old = chosen.tree, recipe.raw
    methods = METHODS + (adapter, CHECKPOINTING)
    before = [p for p in old.get("plugins") or [] if p in methods]
    after = [p for p in t["plugins"] if p in methods]
    if before != after:
        out.append(f"plugins: {' + '.join(before) or '(none)'} -> {' + '.join(after)}")
    for name in dict.fromkeys(METHODS + (adapter,)):
        if name in t and t.get(name) != old.get(name):
            out.append(f"{name}: {t[name] or 'defaults'}")
    tr = recipe.train
    if (chosen.batch_size, chosen.grad_accum) != (tr.batch_size, tr.grad_accum):
        out.append(f"train.batch_size {tr.batch_size} -> {chosen.batch_size}, train.grad_accum "
                   f"{tr.grad_accum} -> {chosen.grad_accum} (effective batch "
                   f"{chosen.batch_size * chosen.grad_accum} kept)")
    return out


# ---------------------------------------------------------------------------------------------
# `plugtune plan` and the check before `plugtune run`
# ---------------------------------------------------------------------------------------------


def default_budget(device):
    """``(bytes, label)`` of the memory this machine has, or ``(None, None)``."""
    if device == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return total, f"this GPU ({torch.cuda.get_device_name()})"
    meminfo = Path("/proc/meminfo")
    if device == "cpu" and meminfo.exists():
        kib = int(re.search(r"MemAvailable:\s+(\d+)", meminfo.read_text()).group(1))
        return kib * KiB, "this machine's available RAM"
    return None, None


def command(args, echo=print):
    """``plugtune plan``: 0 when the recipe fits (or no budget is known), 1 when it does not."""
    from . import manager, recipe as recipes

    discovered = manager.discover()
    recipe, pm = recipes.load_recipe(args.recipe, args.overrides, discovered=discovered)
    budget, label = parse_budget(args.gpu) if args.gpu else default_budget(args.device)
    if args.fit and budget is None:
        raise RecipeError(["--fit needs a budget: --gpu 24GiB, or a GPU name such as rtx4090"])
    est = estimate(recipe, pm, args.device)
    for line in describe(est, budget, label):
        echo(line)
    if budget is None:
        echo("no budget known: add --gpu 24GiB (or a GPU name) to check the fit")
        return 0
    if est.total() <= budget:
        if args.fit:
            echo("fits as it is: nothing to change")
        return 0
    if not args.fit:
        echo(f"hint: `plugtune plan {args.recipe} --gpu {args.gpu or '...'} --fit` finds the "
             "plugins and settings that fit")
        return 1
    echo("")
    echo(f"searching for a combination that fits {size(budget)}:")
    chosen, least = search(recipe, len(est.acts.blocks), budget, args.device, discovered, echo)
    if chosen is None:
        weights = least.estimate.weights
        echo(f"does NOT fit {size(budget)} with any combination: the least it needs is "
             f"{size(least.total)} ({least.label}, micro-batch {least.batch_size} x "
             f"{least.grad_accum}), of which the weights alone are {size(weights)}. "
             "Use a GPU with more memory, a smaller model, or a shorter train.max_length "
             "(activations grow with it).")
        return 1
    out = Path(args.out) if args.out else Path(recipe.path).with_suffix(".fit.yaml")
    if not args.out and not os.access(out.parent, os.W_OK):  # a shipped recipe
        out = Path.cwd() / out.name
    what = changes(recipe, chosen, adapter_of(recipe.plugins, discovered))
    header = (f"# Written by `plugtune plan {args.recipe} --gpu {args.gpu} --fit`: {chosen.label}"
              f" needs {size(chosen.total)} of {size(budget)}.\n"
              + "".join(f"# changed: {c}\n" for c in what)
              + f"# Run it with: plugtune run {out}\n")
    out.write_text(yaml_dump(chosen.tree, header))
    echo("")
    echo(f"the plan of {out}:")
    for line in describe(chosen.estimate, budget, label):
        echo(line)
    echo("")
    echo(f"wrote {out}; changed:")
    for c in what:
        echo(f"  - {c}")
    echo(f"why: as written the recipe needs {size(est.total())} and the budget is "
         f"{size(budget)}; the combinations above were tried in order of least quality cost "
         "(full, freeze, lora, int8 + lora, nf4 + lora; each first as is, then with gradient "
         "checkpointing, then smaller micro-batches) and this is the first that fits")
    return 0


def preflight(recipe, pm, echo=print):
    """Before ``plugtune run`` loads anything: print the plan's peak, and warn when it will not
    fit the GPU this process sees. Never stops a run: a planner failure is only reported."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        est = estimate(recipe, pm, device)
    except Exception as exc:  # the planner must never stop a run
        echo(f"memory plan: unavailable ({type(exc).__name__}: {exc})")
        return None
    total = est.total()
    if device == "cpu":
        echo(f"memory plan: {size(total)} at peak ({est.peak().name}); no CUDA GPU here, so "
             "no fit check (`plugtune plan` shows the breakdown)")
        return est
    free, capacity = torch.cuda.mem_get_info()
    echo(f"memory plan: {size(total)} at peak; the GPU has {size(free)} free of "
         f"{size(capacity)}")
    if total > free:
        echo(f"warning: this recipe will likely run out of GPU memory: it needs {size(total)} "
             f"and {size(free)} is free; `plugtune plan {recipe.path} --fit` finds plugins and "
             "settings that fit")
    return est
