"""What ``plugtune_estimate_memory`` and ``plugtune_fit_variants`` work with: the plan a plugin
adjusts (:class:`Plan` of :class:`Param` entries, :class:`Optimizer`, :class:`Memory`) and the
``--fit`` :class:`Variant` a plugin offers. Part of the plugin API."""
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class Param:
    """One parameter tensor as the planner counts it."""

    name: str  # its name in the model as loaded (adapters: their name after wrapping)
    shape: tuple[int, ...]
    dtype: torch.dtype  # after the model phases (k-bit preparation casts 16-bit weights to fp32)
    trainable: bool
    block: int | None  # index of the transformer block that holds it; None outside the blocks
    module: str  # class name of the module that owns it: "Linear", "Embedding", ...
    module_name: str  # that module's name in the model as loaded (before adapters wrapped it)
    added: bool  # a model phase added it (adapter, head): not part of the loaded checkpoint
    storage: str = ""  # how it is stored when not as a dense tensor of `dtype` ("int8", "nf4")
    nbytes: int | None = None  # its bytes when `storage` is set
    keeps_input: bool = False  # its kernel keeps the layer input for backward although frozen
    shardable: bool = True  # FSDP can shard it (a 4-bit weight packed in uint8 stays whole)
    tensor: Any = field(default=None, repr=False, compare=False)  # the meta parameter

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.nbytes if self.nbytes is not None else self.numel * self.dtype.itemsize

    @property
    def kind(self) -> str:
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

    recipe: "Recipe"
    model: Any  # the model on the meta device, after the run's model phases
    params: list[Param]
    device: str  # "cuda" or "cpu"
    batch_size: int
    seq_len: int
    grad_accum: int
    mixed_precision: str = "no"
    checkpointed: set[int] = field(default_factory=set)  # blocks that keep only their input and
    # recompute the rest in backward (read off the model after the phases)
    offloaded: bool = False  # checkpointed blocks keep their input in host memory instead
    optimizer: Optimizer | None = None
    extra: list[Memory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # shown under the table
    #: (batch_size, seq_len) -> dict of meta tensors for the loss hook
    make_batch: Callable[[int, int], dict[str, Any]] | None = None
    keep_unquantized: list[str] = field(default_factory=list)  # modules quantizers skip by default
    architecture: str = ""  # the loaded model's class, before adapters wrap it
    loss_chunk_tokens: int | None = None  # the task's loss runs the output layer this many
    # tokens at a time (chunked cross-entropy): logits buffers stop growing with the batch
    packed: bool = False  # train.packing: sequences laid end to end, attention masked per example
    processes: int = 1  # data-parallel processes (GPUs) the run is planned for, one of them shown
    shard: str | None = None  # how they divide the state: "fsdp"/"zero3" (weights, gradients,
    # optimizer state), "zero2" (gradients, optimizer state), None (each holds it all: DDP)

    def trainable(self) -> list[Param]:
        return [p for p in self.params if p.trainable]

    def add(self, name: str, nbytes: float, detail: str = "") -> None:
        """Count memory this plugin holds for the whole run."""
        self.extra.append(Memory(name, int(nbytes), detail))

    def quantize(self, params: Iterable[Param], storage: str, nbytes: Callable[[Param], int],
                 keeps_input: bool = False, shardable: bool = False) -> None:
        """Count ``params`` as stored quantized, ``nbytes(param)`` bytes each (the quantizing
        plugins' helper); ``shardable``: FSDP shards them (4-bit weights packed in a float
        dtype: ``nf4.quant_storage``). On a CPU the checkpoint file stays memory-mapped after loading, and
        the pages read to quantize these weights stay resident (clean pages the system may
        drop under pressure): counted as their own component."""
        read, itemsize = 0, getattr(torch, self.recipe.model.dtype).itemsize
        for p in params:
            p.storage, p.nbytes, p.keeps_input = storage, nbytes(p), keeps_input
            p.shardable = shardable
            read += p.numel * itemsize
        if self.device == "cpu" and read:
            self.add("checkpoint pages read to quantize", read, "CPU only: the safetensors "
                     "file stays mapped; clean pages the system can drop")

    def base_linear_weights(self, skip: Iterable[str] = ()) -> list[Param]:
        """Weights of the loaded model's ``nn.Linear`` layers (the ones bitsandbytes quantizes),
        except modules whose name or last name part is in ``skip``."""
        skipped = set(skip)
        return [p for p in self.params if p.module == "Linear" and not p.added
                and p.name.endswith("weight") and p.module_name not in skipped
                and p.module_name.rsplit(".", 1)[-1] not in skipped]


def causal_batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A causal-LM batch on the meta device: every sequence ``seq_len`` tokens, no padding."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": ids}


@dataclass
class Variant:
    """One way a plugin offers to make a recipe fit (``plugtune_fit_variants``).

    :param label: what ``--fit`` prints, e.g. ``"int8 + lora"``.
    :param rank: quality cost: 0 when every weight trains as in full fine-tuning; the larger,
        the more the result may differ. ``--fit`` tries variants from the lowest rank up. The
        built-in variants use the named ranks below; a stranger's method places itself
        between them (an adapter on a 6-bit base: ``Variant.ADAPTER_8BIT + 5``).
    :param plugins: the plugins that make this variant; the core removes from the recipe every
        plugin any variant names and adds these.
    :param sections: recipe sections the variant sets, ``{name: {key: value}}``; the recipe's
        own section wins unless ``override``.
    :param override: these sections replace the recipe's own (``freeze``'s block counts).
    :param saver: a memory saver tried on top of every other variant (gradient checkpointing),
        not a variant of its own.
    """

    #: The rank scale, by how far the trained model may drift from full fine-tuning. Steps of
    #: 10 leave room between the built-ins for others. Every weight trains (``full``):
    FULL: ClassVar[float] = 0
    #: The last blocks train in full, the rest frozen (``freeze``): 10 for half the blocks,
    #: one more per halving (fewer weights train, so the result is further off):
    FREEZE: ClassVar[float] = 10
    #: Adapters on the 16/32-bit base (``lora``, ``ia3``, ...): only the adapters train:
    ADAPTER: ClassVar[float] = 20
    #: Adapters on a base quantized to 8 bits (``int8``): the forward pass itself is
    #: approximated too:
    ADAPTER_8BIT: ClassVar[float] = 30
    #: Adapters on a 4-bit base (``nf4``, QLoRA): the coarsest approximation of the base:
    ADAPTER_4BIT: ClassVar[float] = 40
    #: A saver's rank, which nothing reads: a saver is tried on top of each method, never
    #: ranked among them (gradient checkpointing changes memory and speed, not the result).
    SAVER: ClassVar[float] = 0

    label: str
    rank: float
    plugins: list[str]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    override: bool = False
    saver: bool = False
