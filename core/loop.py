"""The training loop: set up through hooks, then for each optimizer step micro-batches ->
loss (hook) -> backward -> optimizer step, evaluating, checkpointing and saving through hooks.
Accelerate does device placement, mixed precision and (under ``accelerate launch``/``torchrun``)
distribution; the loop does its own accumulation so that a step's objective is exact.

What a step means: the mean loss over every target of the optimizer step, across its
micro-batches and processes (see ``plugtune.loss``), however the micro-batches divide among
the processes. Each micro-batch's summed loss is backpropagated divided by a reference count
that every process shares, and once the step's true count is known the gradients are scaled
by ``reference / count`` (torchtune's way: exact, one pass over the gradients, and no need to
know the count before the first forward). Which examples a step sees follows from the seed
and the epoch (:func:`epoch_plan`); ``train.group_by_length`` changes it.
"""
import contextlib
import hashlib
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from . import checkpoint, manager, rundir
from .data import REAL_TOKENS
from .errors import PluginError, PlugtuneError
from .loss import as_loss
from .recipe import float16_training_problem


class Interrupted(PlugtuneError):
    """SIGINT/SIGTERM: the run stopped after a whole step and wrote a checkpoint."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


class Diverged(PlugtuneError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


@dataclass
class Run:
    """What the training-phase hooks see of a run.

    ``recipe``, ``pm`` (the plugin manager), ``accelerator``, ``model``, ``tokenizer``,
    ``data`` (``"train"``/``"validation"``, and ``"test"`` when the recipe has ``data.test``
    -> :class:`plugtune.data.Tokenized`), ``dir`` (the
    run directory; None on processes other than the main one), ``step`` (optimizer steps
    taken), ``total_steps``, ``optimizer`` and ``scheduler`` once training starts.
    """

    recipe: object
    pm: object
    accelerator: Accelerator
    model: object = None
    tokenizer: object = None
    data: dict = field(default_factory=dict)
    dir: Path | None = None
    step: int = 0
    total_steps: int = 0
    optimizer: object = None
    scheduler: object = None
    stop_reason: str | None = None
    sources: dict = field(default_factory=dict)  # hashes of non-file data, for the manifest
    signum: int | None = None
    state: dict = field(default_factory=dict)  # the loop's counters a checkpoint keeps

    @property
    def is_main(self):
        return self.accelerator.is_main_process

    def stop(self, reason):
        """End training before the next optimizer step: the final evaluation and save still
        run, and where this cut training short the manifest says ``stopped early: REASON``.
        Any plugin may call it."""
        self.stop_reason = self.stop_reason or str(reason)
        self.state["stop_reason"] = self.stop_reason  # a checkpoint keeps it: resume stops too

    def save_checkpoint(self, path, rng=None):
        """Write a checkpoint of the run as it is now (trainable weights, optimizer, scheduler,
        random states, position) into the directory ``path``, atomically; main process only.
        ``RUN/checkpoints/step-K`` are written by the loop; a plugin may keep others
        (``early_stopping`` keeps ``RUN/best``)."""
        if not self.is_main:
            return None
        return checkpoint.save(
            path, model=self.accelerator.unwrap_model(self.model), optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.accelerator.scaler,
            state={"step": self.step, **self.state}, rng=rng,
            plugin_hook=lambda p: self.pm.hook.plugtune_save_checkpoint(run=self, path=p))

    def rng_states(self):
        """Every process's random states, a list by rank, on every process (under several
        processes a collective: each must call it)."""
        state = checkpoint.rng_state()
        return [state] if self.accelerator.num_processes == 1 else self.gather([state])

    def share(self, items):
        """This process's contiguous share of ``items``, so that evaluation work (batches,
        generations) is split across processes; one process gets everything."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return items[len(items) * rank // world:len(items) * (rank + 1) // world]

    def gather(self, values):
        """Every process's results for its :meth:`share`, concatenated in the order of the
        shared items, on every process (each must call it)."""
        if self.accelerator.num_processes == 1:
            return list(values)
        from accelerate.utils import gather_object

        return gather_object(list(values))

    def load_weights(self, path):
        """Copy the trainable weights of the checkpoint directory ``path`` into the model."""
        checkpoint.load_trainable(self.accelerator.unwrap_model(self.model),
                                  Path(path) / checkpoint.WEIGHTS)


def first(hook, what, **kwargs):
    """Call a firstresult hook and insist that some plugin answered."""
    result = hook(**kwargs)
    if result is None:
        raise PluginError(f"no active plugin implements {hook.name} ({what}); "
                          "check plugins: in the recipe and `plugtune plugins`")
    return result


def setup(recipe, pm, echo=print):
    """Everything that can fail on bad input, before the run directory exists. A plugin's
    hook that raises here is named (:class:`plugtune.manager.PluginFault`)."""
    with manager.blamed(pm):
        return _setup(recipe, pm, echo)


def _setup(recipe, pm, echo):
    h, t = pm.hook, recipe.train
    set_seed(t.seed)
    acc = Accelerator(mixed_precision=t.mixed_precision)
    run = Run(recipe, pm, acc)
    run.tokenizer = first(h.plugtune_load_tokenizer, "load the tokenizer", recipe=recipe)
    splits = first(h.plugtune_read_data, "read the data", recipe=recipe)
    run.sources = getattr(splits, "sources", None) or {}
    test = ("test",) if getattr(splits, "test", None) is not None else ()
    for split in ("train", "validation", *test):
        run.data[split] = first(h.plugtune_tokenize, "tokenize records", recipe=recipe,
                                records=getattr(splits, split), tokenizer=run.tokenizer,
                                split=split)
        d = run.data[split]
        echo(f"data: {split} {len(d.examples)} records, {d.tokens():,} tokens, "
             f"{d.truncated} truncated at {t.max_length} tokens")
    run.model = setup_model(h, recipe, echo, tokenizer=run.tokenizer)
    return run


def model_kwargs(h, recipe, tokenizer=None):
    """Every plugin's ``from_pretrained`` arguments, merged; a key given twice is an error."""
    kwargs = {}
    for part in h.plugtune_model_kwargs(recipe=recipe, tokenizer=tokenizer):
        clash = set(kwargs) & set(part or {})
        if clash:
            raise PluginError(f"two plugins set the model loading argument(s) {sorted(clash)}")
        kwargs.update(part or {})
    return kwargs


def load_base(h, recipe, tokenizer=None):
    """Load the model with every plugin's loading arguments and prepare it (k-bit preparation,
    heads, gradient checkpointing): the model as it is before adapters wrap it."""
    model = first(h.plugtune_load_model, "load the model", recipe=recipe,
                  model_kwargs=model_kwargs(h, recipe, tokenizer),
                  model_class=h.plugtune_model_class(recipe=recipe))
    return prepare(h, recipe, model)


def prepare(h, recipe, model):
    """The phases that change a loaded base in place: k-bit preparation, then heads and
    gradient checkpointing. (The planner runs them on a meta-device model.)"""
    h.plugtune_prepare_base(model=model, recipe=recipe)
    h.plugtune_prepare_model(model=model, recipe=recipe)
    return model


def adapt(h, recipe, model):
    """Wrap the prepared base (adapters) and choose the parameters that train."""
    model = h.plugtune_wrap_model(model=model, recipe=recipe) or model
    h.plugtune_select_trainable(model=model, recipe=recipe)
    return model


def setup_model(h, recipe, echo=print, tokenizer=None):
    model = adapt(h, recipe, load_base(h, recipe, tokenizer))
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise PluginError("no parameter is trainable after plugtune_select_trainable; check "
                          "the settings of the recipe's plugins that choose what trains")
    if any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise PlugtuneError(float16_training_problem("some trainable parameters are float16"))
    echo(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def count_parameters(model):
    """``(trainable, total)`` parameter counts (a packed quantized tensor counts the weights it
    stands for: its ``quant_state.shape``, as bitsandbytes' 4-bit weights carry)."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad),
            sum(_numel(p) for p in params))


def _numel(p):
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return shape.numel() if isinstance(shape, torch.Size) else p.numel()


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def loss_of(run, model, batch):
    """The task plugin's :class:`~plugtune.loss.Loss` of ``model`` on ``batch``. The collator's
    count of real tokens (``plugtune.data.REAL_TOKENS``; ``_``-keys before API 1.1) is the
    loop's, not a model input: left out."""
    batch = {k: v for k, v in batch.items() if k != REAL_TOKENS and not k.startswith("_")}
    return as_loss(first(run.pm.hook.plugtune_compute_loss, "compute the loss", model=model,
                         batch=batch, recipe=run.recipe))


def real_tokens(batch):
    """The tokens of ``batch`` that are not padding: the collator's ``REAL_TOKENS`` count
    where it gives one (packed rows; ``_tokens`` before API 1.1), else the attention mask's
    sum, else every position."""
    count = batch.get(REAL_TOKENS, batch.get("_tokens"))
    if count is not None:
        return count.float()
    mask = batch.get("attention_mask")
    return (mask.sum() if mask is not None else
            torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)).float()


def evaluate(run, step, split="validation"):
    """A held-out split's loss (its summed loss over its whole count, so it does not depend on
    the evaluation batch size) and every plugin's extra metrics. The keys of another split
    than ``"validation"`` carry its name: ``test_loss``, ``test_accuracy``, ... Under several
    processes each evaluates its share of the batches and the sums are added up (one
    all-reduce); plugins share their own work with :meth:`Run.share` and :meth:`Run.gather`."""
    model, data, acc = run.model, run.data[split], run.accelerator
    batch_size = run.recipe.train.eval_batch_size or run.recipe.train.batch_size
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=acc.device)
    with torch.no_grad():
        starts = run.share(range(0, len(data.examples), batch_size))
        for i in starts:
            batch = to_device(data.collate(data.examples[i:i + batch_size]), acc.device)
            with acc.autocast():
                loss = loss_of(run, model, batch)
            sums += torch.stack([loss.sum.detach().double(),
                                 torch.as_tensor(loss.count, device=acc.device).double()])
        if acc.num_processes > 1:
            sums = acc.reduce(sums, "sum")
        total, count = sums.tolist()
        result = {"step": step, "eval_loss": total / count if count else float("nan")}
        for extra in run.pm.hook.plugtune_evaluate(run=run, model=model, step=step,
                                                   eval_loss=result["eval_loss"], split=split):
            result.update(extra or {})
    model.train()
    if split != "validation":
        result = {k if k == "step" else f"{split}_{k.removeprefix('eval_')}": v
                  for k, v in result.items()}
    run.pm.hook.plugtune_log(run=run, record=result)
    if split == "validation":  # a test score is reported, never acted on
        run.pm.hook.plugtune_eval_end(run=run, step=step, metrics=result)
    return result


def epoch_plan(lengths, t, epoch, rank, world):
    """This process's micro-batches for each optimizer step of ``epoch``: a list of steps,
    each a list of ``(example indices, counts)``. ``lengths``: each example's tokens.

    The order is a permutation drawn from ``(train.seed, epoch)`` alone, not from the global
    random state (which model and adapter initialisation have drawn from), so every recipe
    with the same seed and data sees the same batches, and a resumed run finds its place by
    step number. Written here rather than with a DataLoader for that reason: a DataLoader
    draws its base seed from the global state at every epoch. The generator's seed is a hash
    of the pair, not ``seed + epoch`` (with which seed s's second epoch was seed s+1's first:
    a seed sweep was not independent). Under several processes micro-batch
    ``j`` of a step goes to process ``j % world``; a process left without one in an epoch's
    last step runs a zero-weight micro-batch (``counts`` False) so the gradient all-reduce
    still meets every process.
    """
    generator = torch.Generator().manual_seed(epoch_seed(t.seed, epoch))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if t.group_by_length:
        micro = grouped_by_length(order, lengths, t.batch_size, generator)
    else:
        micro = [order[i:i + t.batch_size] for i in range(0, len(order), t.batch_size)]
    per_step = t.grad_accum * world
    steps = []
    for s in range(0, len(micro), per_step):
        chunk = micro[s:s + per_step]
        mine = [(m, True) for m in chunk[rank::world]]
        steps.append(mine or [(chunk[0], False)])
    return steps


def epoch_seed(seed, epoch):
    """A 64-bit generator seed for ``(seed, epoch)``: distinct pairs, unrelated seeds."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def grouped_by_length(order, lengths, batch_size, generator, group=50):
    """Micro-batches of examples of similar length, so padding is small: ``order`` is cut into
    groups of ``group`` micro-batches, each sorted by length and cut into micro-batches; then
    the micro-batches are shuffled, and the one holding the longest example goes first (an
    out-of-memory shows at step 1, not hours in). HF Trainer's ``group_by_length`` idea."""
    size = group * batch_size
    micro = []
    for g in range(0, len(order), size):
        ranked = sorted(order[g:g + size], key=lambda i: -lengths[i])
        micro += [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]
    micro = [micro[i] for i in torch.randperm(len(micro), generator=generator).tolist()]
    longest = max(range(len(micro)), key=lambda b: max(lengths[i] for i in micro[b]))
    micro.insert(0, micro.pop(longest))
    return micro


def steps_per_epoch(n, t, world):
    return math.ceil(math.ceil(n / t.batch_size) / (t.grad_accum * world))


def train_step(run, micro, examples, collate):
    """Forward and backward every micro-batch of one optimizer step, then scale the gradients
    so they are those of the mean over the step's targets. Returns the step's loss sum, target
    count and real tokens, summed over processes, and whether any process was signalled (one
    all-reduce; the one host sync of the step)."""
    acc, model = run.accelerator, run.model
    world = acc.num_processes
    sums, counts, tokens = [], [], []
    reference = None
    for i, (indices, real) in enumerate(micro):
        batch = to_device(collate([examples[j] for j in indices]), acc.device)
        last = i == len(micro) - 1
        with contextlib.nullcontext() if last else acc.no_sync(model):
            loss = loss_of(run, model, batch)
            total, count = (loss.sum, loss.count) if real else (loss.sum * 0, 0)
            count = torch.as_tensor(count, device=acc.device, dtype=torch.float32)
            if reference is None:  # about the step's count, and the same on every process:
                # (not x len(micro), which differs where a step's micro-batches do not divide
                # among the processes, and would scale the all-reduced gradient differently)
                shared = acc.reduce(count, "sum") if world > 1 else count
                reference = shared.clamp(min=1) * run.recipe.train.grad_accum
            acc.backward(total * world / reference)
        sums.append(total.detach().float())
        counts.append(count)
        tokens.append(real_tokens(batch))
    signalled = torch.tensor(float(run.signum is not None), device=acc.device)
    step = torch.stack([torch.stack(sums).sum(), torch.stack(counts).sum(),
                        torch.stack(tokens).sum(), signalled, reference])
    if world > 1:
        step = acc.reduce(step, "sum")
    loss_sum, count, n_tokens, signalled, _ = step.tolist()
    if count > 0:
        factor = reference / count
        for p in run.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
    return loss_sum, count, n_tokens, signalled > 0


def optimizer_step(run, t, loss):
    """Clip, check and apply the accumulated gradients, then clear them; ``(grad_norm,
    applied)``. A step whose loss or gradient norm is not finite is not applied (under fp16
    mixed precision the gradient scaler makes that call for the gradients, as it must, and the
    step counts as skipped)."""
    acc = run.accelerator
    norm, applied = math.nan, False
    if math.isfinite(loss):
        norm = acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm or math.inf)
        norm = float(norm) if norm is not None else math.nan
        if acc.scaler is not None or math.isfinite(norm):
            run.optimizer.step()
            applied = acc.scaler is None or not acc.optimizer_step_was_skipped
    if applied:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm, applied


class FinalInterrupt(BaseException):
    """A signal during the final phase (steps_done, the final evaluation, the save): raised in
    the handler, so a long evaluation does not keep a scheduler waiting until its SIGKILL. A
    BaseException, so a plugin's ``except Exception`` does not swallow it."""


@contextlib.contextmanager
def signals(run, echo, phase=None):
    """SIGINT/SIGTERM ask the loop to stop after the current step (with a checkpoint); a
    second SIGINT/SIGTERM stops at once. In the final phase (``phase["final"]``) the first
    signal stops the evaluation/save at once (:class:`FinalInterrupt`; the loop writes a
    checkpoint of the last step); once the model is saved (``phase["saved"]``) the run just
    finishes. Handlers are restored afterwards."""
    phase = {} if phase is None else phase

    def handler(signum, frame):
        if run.signum is not None:
            raise KeyboardInterrupt
        run.signum = signum
        name = signal.Signals(signum).name
        if phase.get("saved"):
            echo(f"\n{name}: the model is saved; finishing (again to stop at once)")
        elif phase.get("final"):
            echo(f"\n{name}: stopping the final evaluation/save and writing a checkpoint of "
                 f"step {run.step} (resume evaluates and saves the model)")
            raise FinalInterrupt(signum)
        else:
            echo(f"\n{name}: stopping after this step and writing a checkpoint (again to "
                 "stop at once)")

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def evaluating(t):
    """Whether the recipe evaluates at all (``train.eval_every: null`` switches it off)."""
    return t.eval_every is not None


def train(run, echo=print, resume=None, stop_after=None, on_resume=None):
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
    per_epoch = steps_per_epoch(len(data.examples), t, world)
    run.total_steps = t.max_steps or per_epoch * t.epochs
    base = optimization(run)
    processes = f" x {world} processes" if world > 1 else ""
    echo(f"training: {run.total_steps} steps of {t.batch_size} x {t.grad_accum} sequences"
         f"{processes} ({per_epoch} steps per epoch) on {acc.device}")
    run.state = {"bad_steps": 0, "empty_steps": 0, "dead_steps": 0, "skipped_steps": 0,
                 "evaluated": True, "eval_before": None, "last_eval": None}
    if resume is not None:
        _resume(run, *resume, on_resume, echo)
    else:
        run.dir = rundir.create(run.recipe, run.sources) if run.is_main else None
    error, early, start = None, None, time.perf_counter()
    rng, updating, stepping, unlogged = run.rng_states(), False, False, None
    phase = {"final": False, "saved": False}
    try:
        with signals(run, echo, phase):
            h.plugtune_train_start(run=run)
            if resume is None and evaluating(t):
                run.state["eval_before"] = _evaluate(run, 0)
            if not run.state["evaluated"]:
                _evaluate(run, run.step)
                run.state["evaluated"] = True
            seen = _weights(run)  # what the last evaluation saw (resumed: the checkpoint's)
            run.model.train()
            plan_epoch, plan = None, None
            lengths = [len(e["input_ids"]) for e in data.examples]
            while run.step < run.total_steps:
                if _agree(acc, run.stop_reason is not None):  # asked before this step
                    echo(f"stopping early at step {run.step}: {run.stop_reason}")
                    break
                epoch, k = divmod(run.step, per_epoch)
                if epoch != plan_epoch:
                    plan_epoch = epoch
                    plan = epoch_plan(lengths, t, epoch, rank, world)
                tick, stepping = time.perf_counter(), True
                loss_sum, count, tokens, signalled = train_step(run, plan[k], data.examples,
                                                                data.collate)
                lr, lrs = rates(run.scheduler, base)  # the rates this step is taken at
                loss = loss_sum / count if count else math.nan
                updating = True
                norm, applied = optimizer_step(run, t, loss)
                run.step += 1
                rng, updating, stepping = run.rng_states(), False, False
                metrics = {"step": run.step, "loss": _finite(loss), "lr": lr,
                           "grad_norm": _finite(norm),
                           "tokens_per_s": tokens / (time.perf_counter() - tick),
                           "epoch": run.step / per_epoch}
                if len(set(lrs)) > 1:
                    metrics["lrs"] = lrs
                run.state["bad_steps"] = 0 if applied else run.state["bad_steps"] + 1
                run.state["empty_steps"] = 0 if count else run.state["empty_steps"] + 1
                dead = applied and norm == 0 and loss > 0  # nothing can change any more
                run.state["dead_steps"] = run.state["dead_steps"] + 1 if dead else 0
                if not applied:
                    run.state["skipped_steps"] += 1
                    metrics["skipped"] = True
                run.state["evaluated"] = not (_eval_due(t, run) and run.step < run.total_steps)
                # logged even when a step_end hook fails (before the rescue checkpoint)
                unlogged = metrics if run.step % t.log_every == 0 or not applied else None
                h.plugtune_step_end(run=run, step=run.step, metrics=metrics)
                record, unlogged = unlogged, None
                if record is not None:
                    h.plugtune_log(run=run, record=record)
                if not applied and acc.scaler is None:
                    _check_divergence(run, t, loss, norm, lr, echo)
                _check_stalled(run, t, loss, lr)
                if signalled:
                    raise _interrupt(run, rng)
                if not run.state["evaluated"]:
                    _evaluate(run, run.step)
                    run.state["evaluated"] = True
                    seen = _weights(run)
                if _due(t.save_every, run) and applied:  # none in a run of bad steps
                    _checkpoint(run, t)
                if stop_after is not None and run.step >= stop_after:
                    run.stop(f"stopped after {stop_after} steps as asked")
            early = run.stop_reason if run.step < run.total_steps else None
            phase["final"] = True  # from here a signal interrupts at once
            try:
                if _agree(acc, run.signum is not None):  # came after the last step's check
                    raise FinalInterrupt(run.signum)
                after, test, artifact = finish(run, seen, phase)
            except FinalInterrupt:
                raise _interrupt(run, rng, final=True) from None
            summary = {"steps": run.step, "seconds": time.perf_counter() - start,
                       "eval_before": run.state["eval_before"], "eval_after": after,
                       "test": test,
                       "artifact": artifact, "truncated": data.truncated,
                       "trainable": trainable, "total": total,
                       "skipped_steps": run.state["skipped_steps"],
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
                    _log_anyway(run, unlogged, echo)
                _rescue(run, rng, echo)
        if error is exc:
            raise
        raise error from exc
    finally:
        h.plugtune_teardown(run=run, error=error)
        if run.dir is not None:
            try:
                rundir.update_manifest(run.dir, status=_status(run, error, early),
                                       steps=run.step)
            finally:
                rundir.release(run.dir)  # the run directory's lock (rundir.lock)


def optimization(run):
    """Build the optimizer and scheduler through their hooks (a plugin's fault is named, with
    no step: training has not begun) and prepare them; the index of the logged group."""
    h, t = run.pm.hook, run.recipe.train
    named = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
    with manager.blamed(run.pm):
        optimizer = first(h.plugtune_build_optimizer, "build the optimizer",
                          params=[p for _, p in named], named_params=named, recipe=run.recipe)
        run.scheduler = first(h.plugtune_build_scheduler, "build the scheduler",
                              optimizer=optimizer, recipe=run.recipe,
                              total_steps=run.total_steps)
    run.model, run.optimizer = run.accelerator.prepare(run.model, optimizer)
    return base_group(optimizer, t.lr)


def _resume(run, run_dir, path, on_resume, echo):
    """Load the checkpoint ``path`` of the run in ``run_dir`` into ``run``."""
    acc = run.accelerator
    run.dir = Path(run_dir) if run.is_main else None
    run.state = {**run.state, **checkpoint.load(
        path, model=acc.unwrap_model(run.model), optimizer=run.optimizer,
        scheduler=run.scheduler, scaler=acc.scaler,
        plugin_hook=lambda p: run.pm.hook.plugtune_load_checkpoint(run=run, path=p))}
    run.step = run.state.pop("step")
    run.stop_reason = run.state.get("stop_reason")  # stopped, then interrupted in the end
    if on_resume is not None:
        on_resume()
    echo(f"resuming at step {run.step} of {run.total_steps} from {path}")


def finish(run, seen, phase):
    """After the last step: ``plugtune_steps_done``, the final evaluation (not again where the
    last evaluation was of this step and these weights: an early stop after an evaluation),
    the test split's, and the save. ``(eval_after, test, artifact)``."""
    run.pm.hook.plugtune_steps_done(run=run)
    last, after = run.state["last_eval"], None
    if evaluating(run.recipe.train):
        same = last is not None and last["step"] == run.step and _weights(run) == seen
        # every process evaluates, or none (a plugin may change the weights on one only)
        after = evaluate(run, run.step) if _agree(run.accelerator, not same) else last
    _check_finite(run, after)
    test = evaluate(run, run.step, "test") if "test" in run.data else None
    artifact = save(run) if run.is_main and run.recipe.output.save_model else None
    phase["saved"] = True
    return after, test, artifact


def _evaluate(run, step):
    """An evaluation during training, kept as the state's ``last_eval`` (a checkpoint written
    after it holds it: resume keeps its record and need not evaluate these weights again)."""
    run.state["last_eval"] = evaluate(run, step)
    return run.state["last_eval"]


def _weights(run):
    """What identifies the trainable weights as they are now: the model object and each
    trainable tensor's storage and in-place version counter (every in-place change, an
    optimizer step or a ``copy_`` of other weights, moves it), so no values are read."""
    return id(run.model), [(p.data_ptr(), p._version) for p in run.model.parameters()
                           if p.requires_grad]


def base_group(optimizer, lr):
    """The index of the parameter group whose rate ``train.lr`` names, the one that is logged:
    a group marked ``"plugtune_base": True`` by the optimizer plugin, else the first whose
    initial rate is ``lr`` (a layer-wise optimizer scales the others), else the first."""
    groups = optimizer.param_groups
    for i, g in enumerate(groups):
        if g.get("plugtune_base"):
            return i
    for i, g in enumerate(groups):
        if math.isclose(g.get("initial_lr", g["lr"]), lr, rel_tol=1e-9):
            return i
    return 0


def rates(scheduler, base):
    """``(the base group's rate, every group's rate)`` for the next optimizer step."""
    lrs = [float(x) for x in scheduler.get_last_lr()]
    return lrs[base], lrs


def _log_anyway(run, record, echo):
    """Log a step's record after a hook failed before it was logged."""
    try:
        run.pm.hook.plugtune_log(run=run, record=record)
    except Exception as exc:  # the original error matters more
        echo(f"could not log step {record['step']}: {exc}")


def _finite(x):
    return x if math.isfinite(x) else None


def _due(every, run):
    return bool(every) and run.step % every == 0


def _eval_due(t, run):
    return isinstance(t.eval_every, int) and _due(t.eval_every, run)


def _agree(acc, flag):
    """Whether any process wants ``flag`` (so all of them stop at the same step)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item())


def _checkpoint(run, t, rng=None):
    """``RUN/checkpoints/step-K``, keeping the newest ``train.keep_checkpoints``; every
    process calls it (each one's random state is recorded) but after a crash (``rng``)."""
    rng = rng or run.rng_states()
    if not run.is_main:
        return None
    path = run.save_checkpoint(checkpoint.directory(run.dir) / f"step-{run.step}", rng=rng)
    checkpoint.prune(run.dir, t.keep_checkpoints)
    return path


def _rescue(run, rng, echo):
    """After a crash outside an optimizer update (out of memory, a plugin's error): the
    weights, optimizer and scheduler are still those of the last whole step, so checkpoint
    them with the random state that step ended with, and the run can be resumed."""
    if not run.is_main or (checkpoint.directory(run.dir) / f"step-{run.step}").exists():
        return
    try:
        path = _checkpoint(run, run.recipe.train, rng=rng)
        echo(f"wrote a checkpoint of step {run.step} before stopping: {path}")
    except Exception as exc:  # the original error matters more
        echo(f"could not write a checkpoint of step {run.step}: {exc}")


def _interrupt(run, rng, final=False):
    """Checkpoint the last step (with the random state it ended with) and say how to go on.
    ``final``: the signal came after the last step, in the final evaluation or save."""
    signum = run.signum or signal.SIGTERM  # another process was signalled
    path = _checkpoint(run, run.recipe.train, rng=rng)
    where, then = ("", "") if not final else (
        " (after the last step, before the model was saved)",
        " (it evaluates and saves the model)")
    return Interrupted(f"{signal.Signals(signum).name}: interrupted at step {run.step} of "
                       f"{run.total_steps}{where}; checkpoint {path}; continue with: plugtune "
                       f"resume {run.dir}{then}", signum)


def _check_divergence(run, t, loss, norm, lr, echo):
    bad = run.state["bad_steps"]
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    if run.state["empty_steps"]:
        echo(f"step {run.step}: no target tokens (every label masked); step skipped "
             f"({bad} in a row)")
    else:
        echo(f"step {run.step}: non-finite {what} (loss {loss}, grad norm {norm}); "
             f"step skipped ({bad} in a row)")
    if bad < t.max_bad_steps:
        return
    last = checkpoint.latest(run.dir) if run.dir is not None else None
    if run.state["empty_steps"] >= bad:  # the data's fault, not the learning rate's
        files = ", ".join(str(getattr(f, "dataset", f)) for f in run.recipe.data.train)
        raise Diverged(f"training stopped: {bad} optimizer steps in a row had no target token "
                       f"(step {run.step}): every label of their records is masked, so there "
                       f"is nothing to learn; no model is saved. Check the data ({files}): "
                       "empty \"text\" records, empty completions or assistant turns, or "
                       "prompts that fill train.max_length. Last good checkpoint: "
                       f"{last or 'none (set train.save_every)'}")
    causes = [f"the learning rate is too high (train.lr={t.lr}, now {lr:.3g})"]
    if not t.max_grad_norm:
        causes.append("no gradient clipping (train.max_grad_norm is null; try 1.0)")
    if run.recipe.train.mixed_precision == "fp16" or run.recipe.model.dtype == "float16":
        causes.append("float16 overflow (try bf16)")
    raise Diverged(f"training diverged: {bad} optimizer steps in a row had a non-finite {what} "
                   f"(step {run.step}: loss {loss}, grad norm {norm}, lr {lr:.3g}); none of "
                   f"them was applied, and no model is saved. Likely cause: "
                   f"{'; or '.join(causes)}. Last good checkpoint: "
                   f"{last or 'none (set train.save_every)'}")


def _check_stalled(run, t, loss, lr):
    """Stop when the gradient has been exactly 0 for ``train.max_bad_steps`` steps in a row
    while the loss is not: no trained weight can change any more. A learning rate far too
    high (``lr=1e6``) does this, saturating the network (weights in the millions) rather than
    overflowing it, and the run would otherwise complete and save a dead model."""
    if run.state["dead_steps"] < t.max_bad_steps:
        return
    model = run.accelerator.unwrap_model(run.model)
    largest = max(float(p.detach().abs().max()) for p in model.parameters() if p.requires_grad)
    last = checkpoint.latest(run.dir) if run.dir is not None else None
    raise Diverged(f"training diverged: the gradient was exactly 0 for {run.state['dead_steps']} "
                   f"optimizer steps in a row at a loss of {loss:.4g} (step {run.step}, lr "
                   f"{lr:.3g}; the largest trained weight is {largest:.3g}): the network has "
                   "saturated and cannot learn any more; no model is saved. Likely cause: the "
                   f"learning rate is too high (train.lr={t.lr}). Last good checkpoint: "
                   f"{last or 'none (set train.save_every)'}")


def _check_finite(run, after):
    """Refuse to save a model whose weights or held-out loss are not finite."""
    model = run.accelerator.unwrap_model(run.model)
    bad = [n for n, p in model.named_parameters() if p.requires_grad and
           not torch.isfinite(p.detach()).all()]
    if bad or (after is not None and not math.isfinite(after["eval_loss"])):
        what = f"{len(bad)} trained tensor(s) are not finite ({bad[0]}, ...)" if bad else \
            f"the held-out loss is {after['eval_loss']}"
        raise Diverged(f"training diverged: after step {run.step} {what}; no model is saved. "
                       f"Lower train.lr (now {run.recipe.train.lr}) or set "
                       "train.max_grad_norm")


def _status(run, error, early=None):
    """The manifest's status. ``early``: the reason of a stop that cut training short (a stop
    asked after the last step, e.g. in the final evaluation, changes nothing)."""
    if error is None:
        return f"stopped early: {early}" if early else "completed"
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        return f"interrupted at step {run.step}"
    return f"failed at step {run.step}: {type(error).__name__}: {error}"


def save(run):
    """Save the final model through the save hook, into place by a rename."""
    tmp = run.dir / ".artifact.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    name = first(run.pm.hook.plugtune_save_model, "save the model", run=run,
                 model=run.accelerator.unwrap_model(run.model), tokenizer=run.tokenizer, path=tmp)
    final = run.dir / name
    if final.exists():  # a resumed run that had saved before it was stopped
        checkpoint.remove(final)
    tmp.replace(final)
    return str(final)
