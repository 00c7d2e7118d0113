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

The package, one concern per module: ``api`` (what plugins see: :class:`Plan`, :class:`Param`,
:class:`Optimizer`, :class:`Variant`), ``build`` (the meta model through the model phases),
``trace`` (activations), ``moments`` (the step's moments and the peak), ``render`` (the table),
``fit`` (the ``--fit`` search), ``budget`` (sizes, GPU names, this machine), ``command``
(``plugtune plan``), ``preflight`` (the check before ``plugtune run``). Model utilities live in
``plugtune.models``.
"""
from ..models import catalog, read_config, transformer_blocks  # noqa: F401 (kept importable here)
from .api import Memory, Optimizer, Param, Plan, Variant, causal_batch  # noqa: F401
from .budget import GPUS, GiB, KiB, MiB, count, default_budget, parse_budget, size  # noqa: F401
from .build import build, meta_model  # noqa: F401
from .command import command  # noqa: F401
from .fit import Candidate, changes, micro_batches, search  # noqa: F401
from .moments import OVERHEAD, Estimate, Moment, estimate  # noqa: F401
from .preflight import preflight  # noqa: F401
from .render import describe  # noqa: F401
from .trace import Activations, trace  # noqa: F401
