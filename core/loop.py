"""The training loop: set up through hooks, then for each optimizer step micro-batches ->
loss (hook) -> backward -> optimizer step, evaluating, checkpointing and saving through hooks.
Accelerate does device placement, mixed precision and (under ``accelerate launch``/``torchrun``)
distribution; the loop does its own accumulation so that a step's objective is exact.

What a step means: the mean loss over every target of the optimizer step, across its
micro-batches and processes (see ``plugtune.loss``). Each micro-batch's summed loss is
backpropagated divided by a reference count that every process shares, and once the step's true
count is known the gradients are scaled by ``reference / count`` (torchtune's way: exact, one
pass over the gradients, and no need to know the count before the first forward).
"""
import contextlib
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
        """End training after the current optimizer step: the final evaluation and save still
        run, and the manifest says ``stopped early: REASON``. Any plugin may call it."""
        self.stop_reason = self.stop_reason or str(reason)

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
    """Everything that can fail on bad input, before the run directory exists."""
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
    """The task plugin's :class:`~plugtune.loss.Loss` of ``model`` on ``batch``. Keys that
    start with ``_`` are the loop's bookkeeping (``_tokens``), not model inputs: left out."""
    batch = {k: v for k, v in batch.items() if not k.startswith("_")}
    return as_loss(first(run.pm.hook.plugtune_compute_loss, "compute the loss", model=model,
                         batch=batch, recipe=run.recipe))


def real_tokens(batch):
    """The tokens of ``batch`` that are not padding: its ``_tokens`` where the collator counted
    them (packed rows), else the attention mask's sum, else every position."""
    if "_tokens" in batch:
        return batch["_tokens"].float()
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
    step number. Written here rather than with a DataLoader for that reason: a DataLoader draws
    its base seed from the global state at every epoch. Under several processes micro-batch
    ``j`` of a step goes to process ``j % world``; a process left without one in an epoch's
    last step runs a zero-weight micro-batch (``counts`` False) so the gradient all-reduce
    still meets every process.
    """
    generator = torch.Generator().manual_seed(t.seed + epoch)
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
            if reference is None:  # the same on every process, about the step's count
                shared = acc.reduce(count, "sum") if world > 1 else count
                reference = shared.clamp(min=1) * len(micro)
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


@contextlib.contextmanager
def signals(run, echo):
    """SIGINT/SIGTERM ask the loop to stop after the current step (with a checkpoint); a
    second SIGINT/SIGTERM stops at once. Handlers are restored afterwards."""
    def handler(signum, frame):
        if run.signum is not None:
            raise KeyboardInterrupt
        run.signum = signum
        echo(f"\n{signal.Signals(signum).name}: stopping after this step and writing a "
             "checkpoint (again to stop at once)")

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


def train(run, echo=print, resume=None, stop_after=None):
    """Train ``run`` (from :func:`setup`) to the end; return the summary.

    :param resume: ``(run_dir, checkpoint_dir)`` to continue a run from its checkpoint.
    :param stop_after: stop (as :meth:`Run.stop` does) after this many steps in all.
    """
    h, t, acc = run.pm.hook, run.recipe.train, run.accelerator
    data = run.data["train"]
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = first(h.plugtune_build_optimizer, "build the optimizer", params=params,
                      recipe=run.recipe)
    trainable, total = count_parameters(run.model)
    world, rank = acc.num_processes, acc.process_index
    per_epoch = steps_per_epoch(len(data.examples), t, world)
    run.total_steps = t.max_steps or per_epoch * t.epochs
    run.scheduler = first(h.plugtune_build_scheduler, "build the scheduler",
                          optimizer=optimizer, recipe=run.recipe, total_steps=run.total_steps)
    run.model, run.optimizer = acc.prepare(run.model, optimizer)
    processes = f" x {world} processes" if world > 1 else ""
    echo(f"training: {run.total_steps} steps of {t.batch_size} x {t.grad_accum} sequences"
         f"{processes} ({per_epoch} steps per epoch) on {acc.device}")
    run.state = {"bad_steps": 0, "skipped_steps": 0, "evaluated": True, "eval_before": None}
    if resume is not None:
        run.dir = Path(resume[0]) if run.is_main else None
        run.state = checkpoint.load(
            resume[1], model=acc.unwrap_model(run.model), optimizer=run.optimizer,
            scheduler=run.scheduler, scaler=acc.scaler,
            plugin_hook=lambda p: h.plugtune_load_checkpoint(run=run, path=p))
        run.step = run.state.pop("step")
        echo(f"resuming at step {run.step} of {run.total_steps} from {resume[1]}")
    else:
        run.dir = rundir.create(run.recipe, run.sources) if run.is_main else None
    error, start = None, time.perf_counter()
    rng, updating = checkpoint.rng_state(), False
    try:
        with signals(run, echo):
            h.plugtune_train_start(run=run)
            if resume is None and evaluating(t):
                run.state["eval_before"] = evaluate(run, 0)
            if not run.state["evaluated"]:
                evaluate(run, run.step)
                run.state["evaluated"] = True
            run.model.train()
            plan_epoch, plan = None, None
            lengths = [len(e["input_ids"]) for e in data.examples]
            while run.step < run.total_steps:
                epoch, k = divmod(run.step, per_epoch)
                if epoch != plan_epoch:
                    plan_epoch = epoch
                    plan = epoch_plan(lengths, t, epoch, rank, world)
                tick = time.perf_counter()
                loss_sum, count, tokens, signalled = train_step(run, plan[k], data.examples,
                                                                data.collate)
                lr = run.scheduler.get_last_lr()[0]  # the rate this step is taken at
                loss = loss_sum / count if count else math.nan
                updating = True
                norm, applied = optimizer_step(run, t, loss)
                run.step += 1
                rng, updating = checkpoint.rng_state(), False
                metrics = {"step": run.step, "loss": _finite(loss), "lr": lr,
                           "grad_norm": _finite(norm),
                           "tokens_per_s": tokens / (time.perf_counter() - tick),
                           "epoch": run.step / per_epoch}
                run.state["bad_steps"] = 0 if applied else run.state["bad_steps"] + 1
                if not applied:
                    run.state["skipped_steps"] += 1
                    metrics["skipped"] = True
                run.state["evaluated"] = not (_eval_due(t, run) and run.step < run.total_steps)
                h.plugtune_step_end(run=run, step=run.step, metrics=metrics)
                if run.step % t.log_every == 0 or not applied:
                    h.plugtune_log(run=run, record=metrics)
                if not applied and acc.scaler is None:
                    _check_divergence(run, t, loss, norm, lr, echo)
                if signalled:
                    raise _interrupt(run)
                if not run.state["evaluated"]:
                    evaluate(run, run.step)
                    run.state["evaluated"] = True
                if _due(t.save_every, run) and applied:  # none in a run of bad steps
                    _checkpoint(run, t)
                if stop_after is not None and run.step >= stop_after:
                    run.stop(f"stopped after {stop_after} steps as asked")
                if _agree(acc, run.stop_reason is not None):
                    echo(f"stopping early at step {run.step}: {run.stop_reason}")
                    break
            h.plugtune_steps_done(run=run)
            after = evaluate(run, run.step) if evaluating(t) else None
            _check_finite(run, after)
            test = evaluate(run, run.step, "test") if "test" in run.data else None
            artifact = save(run) if run.is_main and run.recipe.output.save_model else None
            summary = {"steps": run.step, "seconds": time.perf_counter() - start,
                       "eval_before": run.state["eval_before"], "eval_after": after,
                       "test": test,
                       "artifact": artifact, "truncated": data.truncated,
                       "trainable": trainable, "total": total,
                       "skipped_steps": run.state["skipped_steps"],
                       "stopped_early": run.stop_reason}
            h.plugtune_train_end(run=run, summary=summary)
            return summary
    except BaseException as exc:
        error = exc
        if isinstance(exc, Exception) and not isinstance(exc, PlugtuneError):
            error = manager.blame(run.pm, exc, run.step) or exc
            if not updating and run.step > 0:
                _rescue(run, rng, echo)
        if error is exc:
            raise
        raise error from exc
    finally:
        h.plugtune_teardown(run=run, error=error)
        if run.dir is not None:
            try:
                rundir.update_manifest(run.dir, status=_status(run, error), steps=run.step)
            finally:
                rundir.release(run.dir)  # the run directory's lock (rundir.lock)


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
    """``RUN/checkpoints/step-K``, keeping the newest ``train.keep_checkpoints``."""
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


def _interrupt(run):
    signum = run.signum or signal.SIGTERM  # another process was signalled
    path = _checkpoint(run, run.recipe.train)
    return Interrupted(f"{signal.Signals(signum).name}: interrupted at step {run.step} of "
                       f"{run.total_steps}; checkpoint {path}; continue with: plugtune resume "
                       f"{run.dir}", signum)


def _check_divergence(run, t, loss, norm, lr, echo):
    bad = run.state["bad_steps"]
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    echo(f"step {run.step}: non-finite {what} (loss {loss}, grad norm {norm}); "
         f"step skipped ({bad} in a row)")
    if bad < t.max_bad_steps:
        return
    last = checkpoint.latest(run.dir) if run.dir is not None else None
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


def _status(run, error):
    if error is None:
        return f"stopped early: {run.stop_reason}" if run.stop_reason else "completed"
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
