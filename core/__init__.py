"""plugtune: fine-tune GPT-class models with a small loop, pluggy hooks and YAML recipes.

**The plugin API** (version :data:`API_VERSION`) is what this module exports, listed in
``__all__`` and in docs/plugins.md ("The plugin API"): a plugin may import these names from
``plugtune``, and the modules in :data:`PUBLIC_MODULES` as a whole. Anything else (other
modules, names starting with ``_``, attributes of ``Run`` not documented in docs/hooks.md) is
private and may change in any release. A plugin declares the API range it was written for with
``PLUGTUNE_API = ">=1.0,<2"`` on its module (or its class); plugtune refuses a plugin whose
range excludes :data:`API_VERSION`, naming it.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import pluggy

from .loss import Loss

# What the lazy names below are, for type checkers (tests/test_types.py keeps the two in step).
# The loop's names are left out (Any to mypy) until Run's fields are annotated.
if TYPE_CHECKING:
    from .data import Record, Splits, Tokenized
    from .errors import DataError, InputError, PluginError, PlugtuneError, RecipeError
    from .loss import cross_entropy
    from .manager import EXCLUSIVE_ROLES, active_roles
    from .models import read_config, transformer_blocks
    from .plan import Optimizer, Param, Plan, Variant
    from .recipe import Recipe, Section, float16_training_problem, is_file
    from .rundir import atomic_write, sha256
    from .signals import Terminated, terminate_raises

try:
    __version__ = version("plugtune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

#: The version of the plugin API: the minor part grows when names are added, the major part
#: when a name is removed or its contract changes. A plugin's ``PLUGTUNE_API`` range is checked
#: against it. 1.1 added roles (``PLUGTUNE_ROLES``, ``PLUGTUNE_REPLACES``, :func:`active_roles`),
#: the names built-in plugins used from private modules, and the modules plugin families share
#: (``plugtune.plugins.peft_family``, ``head_family``, ``kbit_family``, ``generation_metrics``,
#: ``optimizer_family``), the ``plugtune_check_records`` hook and the batch's
#: ``num_real_tokens`` (``plugtune.data.REAL_TOKENS``). 1.2 added ``Loss.metrics`` (figures a
#: task reports with its loss, averaged by the core like the loss). 1.3 added
#: ``plugtune.sharding`` (runs whose weights FSDP shards across processes) and the
#: ``state_dict`` argument of ``plugtune_save_model``. 1.4 added the ``plugtune_count_targets``
#: hook and ``plugtune.loss.count_labels`` (a task's target count before the forward, which
#: DeepSpeed needs), ``plugtune.plugins.preference_family.count_pairs``, and for packing
#: ``plugtune.data.span_lengths`` and ``lm_family.PACKED_SDPA`` / ``packed_attention``.
API_VERSION = "1.4"

#: Decorator for hook implementations: ``@hookimpl def plugtune_check_recipe(recipe): ...``
hookimpl = pluggy.HookimplMarker("plugtune")

#: Names importable from ``plugtune`` lazily (so that ``import plugtune`` stays light):
#: ``name -> module``.
_LAZY = {
    "Run": "loop",                 # what training-phase hooks receive as ``run``
    "loss_of": "loop",             # the task's Loss of a model on a batch
    "evaluate": "loop",            # one evaluation of run.model (logged, eval_end called)
    "cross_entropy": "loss",
    "Record": "data", "Splits": "data", "Tokenized": "data",
    "Section": "recipe", "Recipe": "recipe",
    "is_file": "recipe",                     # Path.is_file that never raises (1.1)
    "float16_training_problem": "recipe",    # the check_recipe line for float16 training (1.1)
    "atomic_write": "rundir", "sha256": "rundir",                       # (1.1)
    "terminate_raises": "signals", "Terminated": "signals",             # (1.1)
    "active_roles": "manager", "EXCLUSIVE_ROLES": "manager",            # (1.1)
    "Variant": "plan",                                                  # (1.1)
    "PlugtuneError": "errors", "RecipeError": "errors", "DataError": "errors",
    "InputError": "errors", "PluginError": "errors",
    "Plan": "plan", "Param": "plan", "Optimizer": "plan",
    "transformer_blocks": "models", "read_config": "models",
}

#: Modules a plugin may import as a whole; their public names (no leading ``_``) are the API.
PUBLIC_MODULES = ("plugtune.hookspecs", "plugtune.testing", "plugtune.errors", "plugtune.data",
                  "plugtune.loss", "plugtune.models", "plugtune.sources",
                  "plugtune.sharding",  # (1.3)
                  # what a family of plugins shares (1.1), so a stranger's method or head can
                  # be written as the built-in ones are
                  "plugtune.plugins.peft_family", "plugtune.plugins.head_family",
                  "plugtune.plugins.kbit_family", "plugtune.plugins.generation_metrics",
                  "plugtune.plugins.optimizer_family",
                  # preference objectives (1.2), and what causal-LM objectives share (1.3)
                  "plugtune.plugins.preference_family", "plugtune.plugins.lm_family",
                  # chat templates and record formats
                  "plugtune.chat", "plugtune.plugins.formats",
                  # streamed data (1.2)
                  "plugtune.plugins.data_stream")

__all__ = ["__version__", "API_VERSION", "hookimpl", "Loss", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'plugtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
