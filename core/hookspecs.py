"""Every hook plugtune calls, grouped by the phase of a run in which it is called.

The core calls the phases in the order of this file, top to bottom. Order that matters is
expressed as separate phases, never as ``tryfirst``/``trylast`` tricks: k-bit preparation
(:func:`plugtune_prepare_base`) runs before task heads and gradient checkpointing
(:func:`plugtune_prepare_model`), which run before adapters wrap the model
(:func:`plugtune_wrap_model`), which runs before trainable parameters are chosen
(:func:`plugtune_select_trainable`).

Hooks are called with keyword arguments; an implementation may accept any subset of them.
"Collect" hooks use every implementation's result; "firstresult" hooks stop at the first
non-None result, and one plugin answers each (roles and ``PLUGTUNE_REPLACES``: docs/plugins.md).

The ``recipe`` argument is a :class:`plugtune.recipe.Recipe`: ``recipe.train.lr``,
``recipe.model.name``, ``recipe.plugins`` (active plugin names) and ``recipe["freeze"]`` for the
validated section a plugin registered. The ``run`` argument is a :class:`plugtune.loop.Run`:
the recipe, the run directory, the accelerator, the model and tokenizer, and the step.
"""
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
import torch

if TYPE_CHECKING:
    from .data import Record, Splits, Tokenized
    from .loop import Run
    from .loss import Loss
    from .plan import Plan, Variant
    from .recipe import Recipe

hookspec = pluggy.HookspecMarker("plugtune")

# ---------------------------------------------------------------------------------------------
# Recipe phase: no model is loaded; `plugtune validate` runs only this phase.


@hookspec
def plugtune_recipe_sections(register: Callable[[str, type], None]) -> None:
    """Claim a top-level recipe section and give its schema.

    :param register: call ``register(name, schema)`` where ``schema`` is a pydantic model
        class; the section ``name:`` of the recipe is validated against it (unknown keys and
        wrong types are reported with the section name) and the validated object is then
        available to every hook as ``recipe[name]`` (defaults when the section is absent).
    """


@hookspec
def plugtune_check_recipe(recipe: "Recipe") -> Iterable[str] | None:
    """Return problems with the recipe as a whole, e.g. plugins that conflict.

    :param recipe: the validated :class:`~plugtune.recipe.Recipe`.
    :return: an iterable of messages, each naming the key at fault and saying what to use
        instead; the core reports the problems of every plugin at once (exit status 2).
    """


# ---------------------------------------------------------------------------------------------
# Data phase: before the model is loaded, so that bad data fails fast.


@hookspec(firstresult=True)
def plugtune_load_tokenizer(recipe: "Recipe") -> Any:
    """Load and return the tokenizer for ``recipe.model``. Stops at first non-None result."""


@hookspec(firstresult=True)
def plugtune_read_data(recipe: "Recipe") -> "Splits | None":
    """Read the recipe's data files into a :class:`plugtune.data.Splits` of ``Record`` lists (each
    remembers its file and line for error messages). Stops at first non-None result."""


@hookspec
def plugtune_check_records(recipe: "Recipe", split: str,
                           records: "list[Record]") -> "Iterable[str] | None":
    """Return problems with the records the data plugin read (each split of its
    :class:`plugtune.data.Splits`), at ``validate``, before any model loads: what a task needs
    of a record, checked on the records, so no task opens a data file.

    :param split: ``"train"``, ``"validation"`` or ``"test"``.
    :param records: a list of :class:`plugtune.data.Record`.
    :return: messages, each starting with the ``record.where`` at fault (the core prefixes
        the recipe key: ``data.train: ``); :func:`plugtune.data.check_each` makes them.
    """


@hookspec(firstresult=True)
def plugtune_tokenize(records: "list[Record]", tokenizer: Any, recipe: "Recipe",
                      split: str) -> "Tokenized | None":
    """Turn records into model inputs. Stops at first non-None result (the task plugin).

    :param records: a list of :class:`plugtune.data.Record`.
    :param split: ``"train"``, ``"validation"`` or ``"test"`` (``data.test``); the training
        split is tokenized first, so a task may take from it what the data decides (a
        classifier's label set) and keep it in its own recipe section, which the run's
        ``recipe.yaml`` then records (``plugtune eval`` tokenizes only ``"validation"``).
    :return: a :class:`plugtune.data.Tokenized`: the examples, a collate function and how
        many records were truncated. Raise :class:`plugtune.errors.DataError` naming
        ``record.where`` for an unusable record.
    """


# ---------------------------------------------------------------------------------------------
# Model phase: load the model, then change the model in a fixed order.


@hookspec
def plugtune_model_kwargs(recipe: "Recipe", tokenizer: Any) -> dict[str, Any] | None:
    """Return keyword arguments for ``from_pretrained`` (e.g. ``quantization_config``, or a task
    head's ``num_labels``/``id2label``/``label2id`` and the tokenizer's ``pad_token_id``).

    :param tokenizer: the run's tokenizer (None where a saved run is reloaded without one).
    :return: a dict; all plugins' dicts are merged (a key two plugins give is an error).
    """


@hookspec(firstresult=True)
def plugtune_model_class(recipe: "Recipe") -> type | None:
    """Return the transformers class to load the model as (``AutoModelForSequenceClassification``
    for a task head). Stops at first non-None result; None: the loader's default, a causal LM."""


@hookspec(firstresult=True)
def plugtune_load_model(recipe: "Recipe", model_kwargs: dict[str, Any],
                        model_class: type | None) -> torch.nn.Module | None:
    """Load and return the model for ``recipe.model``. Stops at first non-None result.

    :param model_kwargs: the merged result of :func:`plugtune_model_kwargs`.
    :param model_class: the result of :func:`plugtune_model_class` (None: a causal LM).
    """


@hookspec
def plugtune_prepare_base(model: torch.nn.Module, recipe: "Recipe") -> None:
    """Prepare a freshly loaded (possibly quantized) base model for training, in place,
    before any head, gradient checkpointing or adapter: the phase for k-bit preparation."""


@hookspec
def plugtune_prepare_model(model: torch.nn.Module, recipe: "Recipe") -> None:
    """Change the base model in place before adapters wrap it: task heads, gradient
    checkpointing (enabled here it keeps the inputs of trainable layers requiring grad)."""


@hookspec(firstresult=True)
def plugtune_wrap_model(model: torch.nn.Module, recipe: "Recipe") -> torch.nn.Module | None:
    """Return a new model that wraps ``model`` (e.g. a PEFT adapter model), or None: the
    plugin in the role ``adapter``. Stops at first non-None result; the returned model
    replaces ``model`` from here on."""


@hookspec
def plugtune_select_trainable(model: torch.nn.Module, recipe: "Recipe") -> None:
    """Set ``requires_grad`` on the parameters that should (or should not) train, in place;
    then the core checks that one parameter trains and logs trainable vs total counts."""


# ---------------------------------------------------------------------------------------------
# Optimization phase.


@hookspec(firstresult=True)
def plugtune_build_optimizer(
        params: list[torch.nn.Parameter], recipe: "Recipe",
        named_params: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer | None:
    """Return the optimizer for ``params`` (the trainable parameters). Stops at first
    non-None result; the built-in ``adamw`` plugin is the default.

    :param named_params: ``(name, parameter)`` of the same parameters, in the same order, named
        as ``model.named_parameters()`` names them (for layer-wise rates or decay).

    The rate logged as ``lr`` is that of the group ``train.lr`` names: a group with
    ``"plugtune_base": True``, else the first whose initial rate is ``train.lr``, else the
    first; every group's rate is logged as ``lrs`` where they differ.
    """


@hookspec(firstresult=True)
def plugtune_build_scheduler(optimizer: torch.optim.Optimizer, recipe: "Recipe",
                             total_steps: int) -> Any:
    """Return the scheduler for ``total_steps`` optimizer steps. Stops at first non-None result."""


# ---------------------------------------------------------------------------------------------
# Training phase: train_start, then per optimizer step compute_loss (once per micro-batch),
# step_end and log; evaluate (before the first step, every ``train.eval_every`` steps and
# after the last: compute_loss per batch, evaluate, log, eval_end); save_checkpoint every
# ``train.save_every`` steps; then steps_done, the final evaluation, the test split's (with
# ``data.test``: compute_loss per batch, evaluate, log), save_model, train_end and teardown.
# ``plugtune resume`` calls load_checkpoint before train_start.
# ``plugtune export``, ``generate`` and ``eval`` call load_artifact (``export --merge`` then
# merge_artifact) on a finished run's adapter; ``export --format`` asks export_formats first.


@hookspec
def plugtune_load_checkpoint(run: "Run", path: Path) -> None:
    """Restore this plugin's state from the checkpoint directory ``path`` (what
    :func:`plugtune_save_checkpoint` wrote; absent files mean a checkpoint from before the
    plugin was active). Called by ``plugtune resume`` before :func:`plugtune_train_start`."""


@hookspec
def plugtune_train_start(run: "Run") -> None:
    """Called once the run directory exists and before the first step (open files, bars)."""


@hookspec(firstresult=True)
def plugtune_compute_loss(model: torch.nn.Module, batch: dict[str, Any],
                          recipe: "Recipe") -> "Loss | None":
    """Return the loss of ``model`` on ``batch`` as a :class:`plugtune.Loss`: the *sum* of the
    per-target losses and the *count* of targets summed (tokens with a label, labelled
    sequences, or the summed class weights). Stops at first non-None result (the task plugin).
    Also used for the evaluation loss.

    The core divides, never the plugin: a training step minimises the sum over all its
    micro-batches and processes divided by their total count, and the evaluation loss is the
    split's total sum over its total count, so neither depends on how batches are split.
    ``plugtune.loss.cross_entropy(logits, labels, weight=None, shift=False)`` returns one (a
    bare tensor, the mean before plugtune 0.2, still works with a warning: docs/hooks.md).

    :param batch: the task's collated batch, on the model's device (``input_ids``,
        ``attention_mask``, ``labels``, ...; see docs/hooks.md for each task's batch).
    """


@hookspec(firstresult=True)
def plugtune_count_targets(batch: dict[str, Any], recipe: "Recipe") -> "int | torch.Tensor | None":
    """Return the count :func:`plugtune_compute_loss` will give for ``batch``, from the batch
    alone, before any forward (HF Trainer's ``num_items_in_batch``). Stops at first non-None
    result (the task plugin). Called under DeepSpeed only, whose engine needs a step's count
    before its backward passes; a task without it is refused there (docs/distributed.md)."""


@hookspec
def plugtune_step_end(run: "Run", step: int, metrics: dict[str, Any]) -> None:
    """Called after every optimizer step.

    :param step: the number of optimizer steps taken so far (1-based).
    :param metrics: what happened in this step: ``loss`` (the mean over its targets; None
        when not finite), ``lr`` (the rate the step was taken at), ``grad_norm`` (before
        clipping), ``tokens_per_s`` (this step's own time) and ``epoch``; ``skipped`` when a
        non-finite loss or gradient kept the step from being applied.
    """


@hookspec
def plugtune_evaluate(run: "Run", model: torch.nn.Module, step: int, eval_loss: float,
                      split: str) -> dict[str, Any] | None:
    """Return extra evaluation metrics as a dict (e.g. exact match of generations); the core
    adds ``eval_loss`` itself. Called on the validation split before training (step 0), every
    ``train.eval_every`` steps, and after the last step; on the test split (``data.test``) once,
    after the final validation evaluation.

    :param eval_loss: the mean loss of the split the core has just computed (for perplexity).
    :param split: the split evaluated, ``"validation"`` or ``"test"``: score
        ``run.data[split]``. The core prefixes the keys of a test evaluation (``test_loss``,
        ``test_accuracy``); return them unprefixed.
    """


@hookspec
def plugtune_eval_end(run: "Run", step: int, metrics: dict[str, Any]) -> None:
    """Called after each evaluation of the validation split (not the test split's, which is
    reported and never acted on), with every metric of it (``eval_loss`` and what
    :func:`plugtune_evaluate` added): the place to act on a score (``early_stopping`` calls
    ``run.stop(reason)`` here and keeps the best checkpoint)."""


@hookspec
def plugtune_log(run: "Run", record: dict[str, Any]) -> None:
    """Record a logged entry: a train record every ``train.log_every`` steps (``step``,
    ``loss``, ``lr``, ``tokens_per_s``, ...) or an eval record (``step``, ``eval_loss``, ...)."""


@hookspec
def plugtune_save_checkpoint(run: "Run", path: Path) -> None:
    """Add this plugin's state to a checkpoint being written: write files into the directory
    ``path`` (a temporary directory, renamed into place when complete). Called every
    ``train.save_every`` steps, on an interrupt, and wherever ``run.save_checkpoint`` is
    called; on the main process only."""


@hookspec
def plugtune_steps_done(run: "Run") -> None:
    """Called once after the last optimizer step (or an early stop), before the final
    evaluation and the save: the place to change the model that is evaluated and saved
    (``early_stopping`` loads the best weights here)."""


@hookspec(firstresult=True)
def plugtune_save_model(run: "Run", model: torch.nn.Module, tokenizer: Any, path: Path,
                        state_dict: dict[str, torch.Tensor] | None) -> str | None:
    """Save the final model into the empty directory ``path`` (a temporary one the core renames
    into place). Stops at first non-None result. ``state_dict``: under FSDP or DeepSpeed the
    whole model's, gathered, to save in place of ``model``'s shards (``save_pretrained(path,
    state_dict=...)``); else None.

    :return: the name of the directory inside the run directory to rename it to, e.g.
        ``"model"`` or ``"adapter"``.
    """


@hookspec(firstresult=True)
def plugtune_load_artifact(path: Path, base: torch.nn.Module,
                           recipe: "Recipe") -> torch.nn.Module | None:
    """Load the saved model in the directory ``path`` (what this plugin's
    :func:`plugtune_save_model` wrote, e.g. ``RUN/adapter``) onto ``base``, the run's base
    model loaded and prepared through the model-phase hooks as in training, and return the
    model to use (``plugtune export``, ``generate``, ``eval``). Stops at first non-None result
    (the adapter method; a whole ``RUN/model`` loads without a hook).
    """


@hookspec(firstresult=True)
def plugtune_merge_artifact(model: torch.nn.Module, path: Path,
                            recipe: "Recipe") -> torch.nn.Module | None:
    """Fold the adapter of ``model`` (from :func:`plugtune_load_artifact`; ``path``: the
    directory it was loaded from, for messages) into its base weights and return a plain
    transformers model (``plugtune export --merge``); raise
    :class:`plugtune.PlugtuneError` saying why where the method cannot be merged. Stops at
    first non-None result.
    """


@hookspec
def plugtune_export_formats() -> "dict[str, Callable[..., list[str]]] | None":
    """Name the formats this plugin writes for ``plugtune export RUN OUT --format NAME[:OPTION]``
    (``--gguf TYPE`` is ``gguf:TYPE``): ``{NAME: write}``, a format two plugins name is refused.
    The core calls ``write(option=..., out=..., name=..., load=...)``: ``out`` a new empty
    directory (renamed to ``name`` after), ``load()`` the run's merged model (``.model``,
    ``.tokenizer``, ``.recipe``, ``.notes``; check the option first); it returns lines to print."""


@hookspec
def plugtune_train_end(run: "Run", summary: dict[str, Any]) -> None:
    """Called after the model is saved.

    :param summary: ``steps``, ``seconds``, ``eval_before``, ``eval_after``, ``test`` (the
        test split's ``test_*`` figures, or None), ``truncated``, ``trainable``, ``total`` and
        ``artifact`` (the saved model's directory).
    """


@hookspec
def plugtune_teardown(run: "Run", error: BaseException | None) -> None:
    """Called last, whether training succeeded or not (close files and progress bars). Paired
    with :func:`plugtune_train_start`: a run that stops earlier (bad data, a model that does
    not load, an optimizer that cannot be built) calls neither.

    :param error: the exception that stopped the run, or None.
    """


# ---------------------------------------------------------------------------------------------
# Planning: `plugtune plan`, and `plugtune run` before it loads anything; not part of a run's
# sequence. The planner runs the model phases on a meta-device model (so they must not read
# tensor values: docs/hooks.md, "Model-phase hooks on the meta device"), then estimate_memory and
# one compute_loss on a meta batch; `plan --fit` asks every plugin for its fit_variants.


@hookspec(firstresult=True)
def plugtune_model_config(recipe: "Recipe") -> Any:
    """Return the transformers config of ``recipe.model`` without loading weights (a local
    directory's config.json, a GGUF header, the shipped catalog by hub id, or the hub). Stops at
    first non-None result; the ``hf`` loader answers by default."""


@hookspec
def plugtune_estimate_memory(plan: "Plan", recipe: "Recipe") -> None:
    """Report this plugin's memory by adjusting ``plan``, a :class:`plugtune.plan.Plan`.

    Every active plugin is called, in no particular order, after the model phases ran on the
    meta model: ``plan.params`` already says which parameters exist (adapters and heads
    included) and which train, so an implementation sets only what the model's shapes cannot
    show. The core then counts gradients (trainable parameters, in their dtype), activations
    (one forward pass on meta tensors), logits and loss buffers, and the framework overhead,
    and takes the peak over the moments of a training step.

    What an implementation may set (``plan.quantize``, ``plan.optimizer``,
    ``plan.checkpointed``, ``plan.add``, ``plan.make_batch``, ``plan.loss_chunk_tokens``,
    ``plan.notes``) and what it may read: docs/hooks.md, "Planning".
    """


@hookspec
def plugtune_fit_variants(recipe: "Recipe", blocks: int) -> "Sequence[Variant] | None":
    """Offer the ways this plugin can make a recipe need less memory, for ``plugtune plan
    --fit``: return a list of :class:`plugtune.plan.Variant` (or ``None``).

    Called with every installed plugin registered, active or not (fitting may add a plugin).
    The core orders the variants of all plugins by ``rank`` (quality cost: 0 for "every weight
    trains", larger for what changes the result more) and tries them from the recipe's own
    method on: each first as it is, then with every ``saver`` variant (gradient checkpointing)
    added, then with smaller micro-batches; the first that fits is written.

    :param recipe: the validated recipe being fitted (``recipe.raw`` is its YAML tree).
    :param blocks: the number of transformer blocks of its model.
    """
