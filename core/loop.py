"""The training loop: set up through hooks, then for each optimizer step micro-batches ->
loss (hook) -> backward -> optimizer step, evaluating, checkpointing and saving through hooks.
Accelerate does device placement, mixed precision and (under ``accelerate launch``/``torchrun``)
distribution; the loop does its own accumulation so that a step's objective is exact
(:mod:`plugtune.step`). Which examples a step sees follows from the seed and the epoch
(:func:`plugtune.order.epoch_plan`); ``train.group_by_length`` and ``data.mix`` change it;
``data.streaming`` reads the data a step at a time (:class:`plugtune.stream.Feed`).

The parts, each in its module: the run and its progress (:mod:`plugtune.state`), the model
(:mod:`plugtune.build`), the data order (:mod:`plugtune.order`, :mod:`plugtune.stream`), the
step (:mod:`plugtune.step`), evaluations (:mod:`plugtune.scoring`), the guards against
divergence (:mod:`plugtune.guards`), signals and rescue checkpoints (:mod:`plugtune.stopping`)
and the final phase (:mod:`plugtune.finish`). Their names stay importable from here.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator
from accelerate.utils import set_seed

from . import attention, chat, flops, manager, rundir, sharding, zero
from .build import adapt, count_parameters, load_base, model_kwargs, prepare, setup_model
from .errors import PlugtuneError
from .finish import finish, save
from .guards import Diverged, check_divergence, check_stalled
from .order import epoch_plan, epoch_seed, grouped_by_length, mixture, steps_per_epoch
from .scoring import due, eval_due, evaluate, evaluate_kept, evaluating, weights
from .state import Progress, Run, first
from .stream import Feed, Stream
from .step import (base_group, finite, loss_of, optimizer_step, rates, real_tokens,
                   to_device, train_step)
from .stopping import (FinalInterrupt, Interrupted, agree, checkpoint_step, interrupt,
                       log_anyway, rescue, signals, status)

#: The names importable from here before the loop was split (``plugtune.loop.X`` keeps working).
__all__ = ["Interrupted", "Diverged", "Run", "Progress", "first", "setup", "model_kwargs",
           "load_base", "prepare", "adapt", "setup_model", "count_parameters", "to_device",
           "loss_of", "real_tokens", "evaluate", "epoch_plan", "epoch_seed",
           "grouped_by_length", "steps_per_epoch", "train_step", "optimizer_step",
           "FinalInterrupt", "signals", "evaluating", "train", "optimization", "finish",
           "base_group", "rates", "save"]

Echo = Callable[[str], object]


def setup(recipe: Any, pm: Any, echo: Echo = print) -> Run:
    """Everything that can fail on bad input, before the run directory exists. A plugin's
    hook that raises here is named (:class:`plugtune.manager.PluginFault`)."""
    with manager.blamed(pm):
        return _setup(recipe, pm, echo)


def _setup(recipe: Any, pm: Any, echo: Echo) -> Run:
    h, t = pm.hook, recipe.train
    set_seed(t.seed)
    acc = Accelerator(mixed_precision=t.mixed_precision)  # the engine: accelerate's config
    warning = sharding.check_engine(acc)
    if warning and acc.is_main_process:
        echo(warning)
    sharding.check_savers(acc, pm)
    run = Run(recipe, pm, acc)
    run.tokenizer = chat.load_tokenizer(h, recipe)
    splits = first(h.plugtune_read_data, "read the data", recipe=recipe)
    run.sources = getattr(splits, "sources", None) or {}
    test = ("test",) if getattr(splits, "test", None) is not None else ()
    for split in ("train", "validation", *test):
        if isinstance(getattr(splits, split), Stream):  # read a step at a time (training)
            run.data[split] = getattr(splits, split)
            mixed = "" if recipe.data.mix == "concat" else f", mixed {recipe.data.mix}"
            echo(f"data: {split} streamed from {run.data[split].name}{mixed}, "
                 f"{recipe.data.buffer_size} records shuffled at a time")
            continue
        run.data[split] = first(h.plugtune_tokenize, "tokenize records", recipe=recipe,
                                records=getattr(splits, split), tokenizer=run.tokenizer,
                                split=split)
        d = run.data[split]
        echo(f"data: {split} {len(d.examples)} records, {d.tokens():,} tokens, "
             f"{d.truncated} truncated at {t.max_length} tokens")
    with zero.whole_at_load(acc):  # ZeRO-3 partitions it at prepare, as FSDP does
        run.model = setup_model(h, recipe, echo, tokenizer=run.tokenizer)
    return run


def train(run: Run, echo: Echo = print, resume: tuple[Any, Any] | None = None,
          stop_after: int | None = None,
          on_resume: Callable[[], object] | None = None) -> dict[str, Any]:
    """Train ``run`` (from :func:`setup`) to the end; return the summary.

    :param resume: ``(run_dir, checkpoint_dir)`` to continue a run from its checkpoint.
    :param stop_after: stop (as :meth:`Run.stop` does) after this many steps in all.
    :param on_resume: called once the checkpoint has loaded, before ``plugtune_train_start``
        (``plugtune resume`` records the resume in the manifest there, so a resume that fails
        before changes nothing).
    """
    h, t, acc = run.pm.hook, run.recipe.train, run.accelerator
    data = run.data["train"]
    trainable, total = count_parameters(run.model)
    world, rank = acc.num_processes, acc.process_index
    streamed = isinstance(data, Stream)
    mix = None if streamed else mixture(run.recipe, data)  # None: every example once an epoch
    if mix:
        echo(f"data: mixture {run.recipe.data.mix}: {' + '.join(map(str, mix.counts))} "
             "examples an epoch")
    per_epoch = (t.max_steps or 1) if streamed else steps_per_epoch(
        mix.size if mix else len(data.examples), t, world)
    run.total_steps = t.max_steps or per_epoch * t.epochs
    base = optimization(run)
    run.flops = flops.flop_model(run.model)
    peak = flops.peak_tflops(acc.device, t.peak_tflops)
    processes = f" x {world} processes" if world > 1 else ""
    echo(f"training: {run.total_steps} steps of {t.batch_size} x {t.grad_accum} sequences"
         f"{processes} ({per_epoch} steps per epoch) on {acc.device}")
    run.state = Progress()
    if resume is not None:
        _resume(run, *resume, on_resume, echo)
    else:
        run.dir = rundir.create(run.recipe, run.sources) if run.is_main else None
        if run.dir is not None:  # what transformers chose where the recipe did not say
            chat.save(run.dir, run.tokenizer, run.recipe.data.chat_template)
            rundir.update_manifest(run.dir, attn_implementation=attention.in_use(run.model))
    error: BaseException | None = None
    early: str | None = None
    start = time.perf_counter()
    rng, updating, stepping = run.rng_states(), False, False
    unlogged: dict[str, Any] | None = None
    phase = {"final": False, "saved": False}
    try:
        with signals(run, echo, phase):
            h.plugtune_train_start(run=run)
            if resume is None and evaluating(t):
                run.state.eval_before = evaluate_kept(run, 0)
            if not run.state.evaluated:
                evaluate_kept(run, run.step)
                run.state.evaluated = True
            seen = weights(run)  # what the last evaluation saw (resumed: the checkpoint's)
            run.model.train()
            plan_epoch, plan = None, []
            feed = Feed(run, data, run.step) if streamed else None
            lengths = [] if streamed else [len(e["input_ids"]) for e in data.examples]
            while run.step < run.total_steps:
                if agree(acc, run.stop_reason is not None):  # asked before this step
                    echo(f"stopping early at step {run.step}: {run.stop_reason}")
                    break
                tick, stepping = time.perf_counter(), True
                if feed is not None:
                    mine, examples, collate = feed.step()
                else:
                    epoch, k = divmod(run.step, per_epoch)
                    if epoch != plan_epoch:
                        plan_epoch = epoch
                        plan = epoch_plan(lengths, t, epoch, rank, world,
                                          mix.draw if mix else None)
                    mine, examples, collate = plan[k], data.examples, data.collate
                loss_sum, count, tokens, signalled, extra, work = train_step(
                    run, mine, examples, collate)
                lr, lrs = rates(run.scheduler, base)  # the rates this step is taken at
                loss = loss_sum / count if count else math.nan
                updating = True
                norm, applied = optimizer_step(run, t, loss)
                run.step += 1
                rng, updating, stepping = run.rng_states(), False, False
                seconds = time.perf_counter() - tick
                metrics = {**_metrics(run, loss, norm, lr, lrs, tokens / seconds, per_epoch),
                           **extra}
                work = {**work, "tokens": tokens, "seconds": seconds}
                run.add_work(work)
                metrics.update(flops.report(work, peak and peak * world))
                run.state.tally(applied, count, norm, loss)
                if not applied:
                    metrics["skipped"] = True
                run.state.evaluated = not (eval_due(t, run) and run.step < run.total_steps)
                # logged even when a step_end hook fails (before the rescue checkpoint)
                unlogged = metrics if run.step % t.log_every == 0 or not applied else None
                h.plugtune_step_end(run=run, step=run.step, metrics=metrics)
                record, unlogged = unlogged, None
                if record is not None:
                    h.plugtune_log(run=run, record=record)
                if not applied and acc.scaler is None:
                    check_divergence(run, t, loss, norm, lr, echo)
                check_stalled(run, t, loss, lr)
                if signalled:
                    raise interrupt(run, rng)
                if not run.state.evaluated:
                    evaluate_kept(run, run.step)
                    run.state.evaluated = True
                    seen = weights(run)
                if due(t.save_every, run) and applied:  # none in a run of bad steps
                    checkpoint_step(run, t)
                if stop_after is not None and run.step >= stop_after:
                    run.stop(f"stopped after {stop_after} steps as asked")
            early = run.stop_reason if run.step < run.total_steps else None
            phase["final"] = True  # from here a signal interrupts at once
            try:
                if agree(acc, run.signum is not None):  # came after the last step's check
                    raise FinalInterrupt(run.signum)
                after, test, artifact = finish(run, seen, phase)
            except FinalInterrupt:
                raise interrupt(run, rng, final=True) from None
            summary = {"steps": run.step, "seconds": time.perf_counter() - start,
                       "eval_before": run.state.eval_before, "eval_after": after,
                       "test": test,
                       "artifact": artifact,
                       "truncated": feed.truncated if feed else data.truncated,
                       "trainable": trainable, "total": total,
                       "skipped_steps": run.state.skipped_steps,
                       "stopped_early": early}
            h.plugtune_train_end(run=run, summary=summary)
            return summary
    except BaseException as exc:
        error = exc
        if isinstance(exc, Exception) and not isinstance(exc, PlugtuneError):
            # the step being computed while one runs, else the last one taken
            error = manager.blame(run.pm, exc, run.step + 1 if stepping else run.step) or exc
            if not updating and run.step > 0:
                if unlogged is not None:  # a step_end hook failed: the step still happened
                    log_anyway(run, unlogged, echo)
                rescue(run, rng, echo)
        if error is exc:
            raise
        raise error from exc
    finally:
        h.plugtune_teardown(run=run, error=error)
        if run.dir is not None:
            try:
                rundir.update_manifest(run.dir, status=status(run, error, early),
                                       steps=run.step)
            finally:
                rundir.release(run.dir)  # the run directory's lock (rundir.lock)


def _metrics(run: Run, loss: float, norm: float, lr: float, lrs: list[float],
             tokens_per_s: float, per_epoch: int) -> dict[str, Any]:
    """The record a step logs (``lrs`` only where the groups' rates differ)."""
    metrics: dict[str, Any] = {"step": run.step, "loss": finite(loss), "lr": lr,
                               "grad_norm": finite(norm), "tokens_per_s": tokens_per_s,
                               "epoch": run.step / per_epoch}
    if len(set(lrs)) > 1:
        metrics["lrs"] = lrs
    return metrics


def optimization(run: Run) -> int:
    """Build the optimizer and scheduler through their hooks (a plugin's fault is named, with
    no step: training has not begun) and prepare them; the index of the logged group."""
    h, t = run.pm.hook, run.recipe.train
    named = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
    with manager.blamed(run.pm):
        optimizer = first(h.plugtune_build_optimizer, "build the optimizer",
                          params=[p for _, p in named], named_params=named, recipe=run.recipe)
        if zero.is_deepspeed(run.accelerator):  # the engine drops a group without parameters
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        run.scheduler = first(h.plugtune_build_scheduler, "build the scheduler",
                              optimizer=optimizer, recipe=run.recipe,
                              total_steps=run.total_steps)
    if t.compile:  # in place: the state dict keeps its keys (docs/performance.md: what it gains)
        run.model.compile(dynamic=True)
    if zero.is_deepspeed(run.accelerator):  # the engine's config from the recipe
        zero.configure(run.accelerator, run.recipe)
    run.model, run.optimizer = run.accelerator.prepare(run.model, optimizer)
    return base_group(optimizer, t.lr)


def _resume(run: Run, run_dir: Any, path: Any, on_resume: Callable[[], object] | None,
            echo: Echo) -> None:
    """Load the checkpoint ``path`` of the run in ``run_dir`` into ``run``."""
    run.dir = Path(run_dir) if run.is_main else None
    run.load_checkpoint(path)
    if on_resume is not None:
        on_resume()
    echo(f"resuming at step {run.step} of {run.total_steps} from {path}")
