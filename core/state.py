"""What a run is while it trains: :class:`Run` (what the training-phase hooks see as ``run``)
and :class:`Progress` (the loop's counters, which a checkpoint saves field by field into its
``state.json``)."""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from safetensors.torch import load_file

from . import checkpoint, sharding, zero
from .errors import PluginError, PlugtuneError


@dataclass
class Progress:
    """The loop's counters that a checkpoint keeps (``state.json`` holds them beside ``step``,
    one key per field, as plain JSON), so a resumed run goes on as if never stopped."""

    bad_steps: int = 0  # optimizer steps in a row not applied (non-finite loss or gradient)
    empty_steps: int = 0  # ... in a row without a target token
    dead_steps: int = 0  # ... in a row whose gradient was exactly 0 at a non-zero loss
    skipped_steps: int = 0  # steps not applied in all
    evaluated: bool = True  # whether the evaluation due at this step has run
    eval_before: dict[str, Any] | None = None  # the evaluation before the first step
    last_eval: dict[str, Any] | None = None  # the latest evaluation during training
    stop_reason: str | None = None  # set by :meth:`Run.stop`: resume stops too
    #: keys of ``state.json`` that no field names (a newer plugtune's): kept, written back
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The fields as ``state.json`` keys (the ``stop_reason`` key only once stopped, as
        before this was a dataclass)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra"}
        if out["stop_reason"] is None:
            del out["stop_reason"]
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Progress:
        """The progress a ``state.json`` holds (without its ``step``); a key it lacks (an older
        checkpoint) keeps its default, a key no field names is kept in :attr:`extra`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in state.items() if k in names}
        return cls(**known, extra={k: v for k, v in state.items()
                                   if k not in names and k != "step"})

    def tally(self, applied: bool, count: float, norm: float, loss: float) -> None:
        """Count an optimizer step: ``applied`` or not, its ``count`` of targets, its gradient
        ``norm`` and ``loss``."""
        self.bad_steps = 0 if applied else self.bad_steps + 1
        self.empty_steps = 0 if count else self.empty_steps + 1
        dead = applied and norm == 0 and loss > 0  # nothing can change any more
        self.dead_steps = self.dead_steps + 1 if dead else 0
        if not applied:
            self.skipped_steps += 1

    # Deprecated: ``run.state`` was a dict before plugin API 1.1; read the attributes instead.
    def __getitem__(self, key: str) -> Any:
        warnings.warn("run.state[KEY] is deprecated: read run.state.KEY", DeprecationWarning,
                      stacklevel=2)
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated, as ``run.state[KEY]``."""
        return self.to_json().get(key, default)


@dataclass
class Run:
    """What the training-phase hooks see of a run.

    ``recipe``, ``pm`` (the plugin manager), ``accelerator``, ``model``, ``tokenizer``,
    ``data`` (``"train"``/``"validation"``, and ``"test"`` when the recipe has ``data.test``
    -> :class:`plugtune.data.Tokenized`), ``dir`` (the
    run directory; None on processes other than the main one), ``step`` (optimizer steps
    taken), ``total_steps``, ``optimizer`` and ``scheduler`` once training starts, ``state``
    (the loop's :class:`Progress`).
    """

    recipe: Any
    pm: Any
    accelerator: Accelerator
    model: Any = None
    tokenizer: Any = None
    data: dict[str, Any] = field(default_factory=dict)
    dir: Path | None = None
    step: int = 0
    total_steps: int = 0
    optimizer: Any = None
    scheduler: Any = None
    sources: dict[str, Any] = field(default_factory=dict)  # non-file data's hashes (manifest)
    signum: int | None = None
    state: Progress = field(default_factory=Progress)  # the loop's counters a checkpoint keeps
    flops: Any = None  # the model's :class:`plugtune.flops.FlopModel` once training starts
    #: what this process's steps computed: real tokens, positions (padding and filler
    #: included), model FLOPs (:mod:`plugtune.flops`) and seconds, summed over processes
    work: dict[str, float] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def stop_reason(self) -> str | None:
        """Why :meth:`stop` was called, or None; kept in :attr:`state`, so a checkpoint keeps
        it and a resumed run stops too."""
        return self.state.stop_reason

    def stop(self, reason: object) -> None:
        """End training before the next optimizer step: the final evaluation and save still
        run, and where this cut training short the manifest says ``stopped early: REASON``.
        Any plugin may call it."""
        self.state.stop_reason = self.state.stop_reason or str(reason)

    def save_checkpoint(self, path: str | Path, rng: list[Any] | None = None) -> Path | None:
        """Write a checkpoint of the run as it is now (trainable weights, optimizer, scheduler,
        random states, position) into the directory ``path``, atomically; the main process
        writes (under FSDP every process must call it: the state is gathered from their
        shards). ``RUN/checkpoints/step-K`` are written by the loop; a plugin may keep others
        (``early_stopping`` keeps ``RUN/best``)."""
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        gathered: dict[str, Any] = {}
        staged = None  # under DeepSpeed: the engine's state, to move into the checkpoint
        if zero.is_deepspeed(acc):
            staged = zero.save_engine(acc, self.model, path)
            gathered = {"weights": zero.trainable(acc, model),
                        "optimizer_state": {zero.FOLDER: zero.FOLDER}}
        elif sharding.is_sharded(acc):
            gathered = {"weights": sharding.trainable(acc, model),
                        "optimizer_state": sharding.optimizer_state(model, self.optimizer)}
        if not self.is_main:
            return None
        return checkpoint.save(
            path, model=model, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=acc.scaler,
            state={"step": self.step, **self.state.to_json()}, rng=rng,
            plugin_hook=lambda p: self._plugins_save(p, staged), **gathered)

    def _plugins_save(self, path: Path, staged: Path | None) -> None:
        if staged is not None:
            shutil.move(staged, path / zero.FOLDER)
            shutil.rmtree(staged.parent, ignore_errors=True)
        self.pm.hook.plugtune_save_checkpoint(run=self, path=path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load the checkpoint directory ``path`` into the run: weights, optimizer, scheduler,
        gradient scaler, random states, ``step`` and :attr:`state`, then the plugins' own
        (every process calls it)."""
        acc = self.accelerator
        saved = checkpoint.load(
            path, model=acc.unwrap_model(self.model), optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=acc.scaler,
            plugin_hook=lambda p: self.pm.hook.plugtune_load_checkpoint(run=self, path=p),
            restore=lambda weights, optim: self._restore(weights, optim, path))
        self.step = saved.pop("step")
        self.state = Progress.from_json(saved)  # a stop asked before is kept (stop_reason)

    def _restore(self, weights: dict[str, Any], optim: dict[str, Any] | None,
                 path: str | Path | None = None) -> None:
        """Saved trainable ``weights`` and optimizer state (None: weights alone) into the
        model and optimizer: copied in place, or under FSDP (and for a checkpoint FSDP wrote,
        whose optimizer state is keyed by name) loaded into every process's shards."""
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        by_name = optim is not None and sharding.is_by_name(optim)
        if zero.is_deepspeed(acc):
            if optim is None:  # the weights alone (early_stopping's best)
                zero.load_weights(acc, model, weights if self.is_main else {})
            else:
                zero.load_engine(self.model, path or "")
            return
        if optim is not None and zero.FOLDER in optim:
            raise PlugtuneError("this checkpoint was written under DeepSpeed: resume it under "
                                "DeepSpeed, with as many processes as it ran on (see "
                                f"{sharding.DOCS})")
        if not sharding.is_sharded(acc) and not by_name:
            checkpoint.copy_trainable(model, weights)
            if optim is not None:
                self.optimizer.load_state_dict(optim)
            return
        if optim is not None and not by_name:
            raise PlugtuneError("this checkpoint was written without FSDP: resume it as it ran "
                                f"(DDP or one process), not under FSDP (see {sharding.DOCS})")
        main = self.is_main
        sharding.load(acc, model, self.optimizer, weights if main else {},
                      (optim if main else {}) if optim is not None else None)

    def load_weights(self, path: str | Path | None) -> None:
        """Copy the trainable weights of the checkpoint directory ``path`` into the model
        (under FSDP every process calls it; the main process's ``path`` is read)."""
        if sharding.is_sharded(self.accelerator):
            weights = load_file(Path(path) / checkpoint.WEIGHTS) \
                if self.is_main and path is not None else {}
            self._restore(weights, None)
        elif path is not None:
            checkpoint.load_trainable(self.accelerator.unwrap_model(self.model),
                                      Path(path) / checkpoint.WEIGHTS)

    def rng_states(self) -> list[Any]:
        """Every process's random states, a list by rank, on every process (under several
        processes a collective: each must call it)."""
        state = checkpoint.rng_state()
        return [state] if self.accelerator.num_processes == 1 else self.gather([state])

    def share(self, items: Any) -> Any:
        """This process's contiguous share of ``items``, so that evaluation work (batches,
        generations) is split across processes; one process gets everything."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return items[len(items) * rank // world:len(items) * (rank + 1) // world]

    def gather(self, values: Any) -> list[Any]:
        """Every process's results for its :meth:`share`, concatenated in the order of the
        shared items, on every process (each must call it)."""
        if self.accelerator.num_processes == 1:
            return list(values)
        from accelerate.utils import gather_object

        return list(gather_object(list(values)))

    def add_work(self, work: dict[str, float]) -> None:
        """Add a step's work (``{"tokens", "positions", "flops", "seconds"}``) to :attr:`work`."""
        for key, value in work.items():
            self.work[key] = self.work.get(key, 0.0) + value


def first(hook: Callable[..., Any], what: str, **kwargs: Any) -> Any:
    """Call a firstresult hook and insist that some plugin answered."""
    result = hook(**kwargs)
    if result is None:
        raise PluginError(f"no active plugin implements {getattr(hook, 'name', hook)} "
                          f"({what}); check plugins: in the recipe and `plugtune plugins`")
    return result
