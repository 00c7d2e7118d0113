"""The training loop: set up through hooks, then batch -> loss -> backward -> step, evaluating
and saving through hooks. Accelerate does device placement, mixed precision, gradient
accumulation and (under ``accelerate launch``) distribution."""
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from . import rundir
from .errors import PluginError


@dataclass
class Run:
    """What the training-phase hooks see of a run."""

    recipe: object
    pm: object
    accelerator: Accelerator
    model: object = None
    tokenizer: object = None
    data: dict = field(default_factory=dict)  # "train"/"validation" -> plugtune.data.Tokenized
    dir: Path | None = None
    step: int = 0
    total_steps: int = 0

    @property
    def is_main(self):
        return self.accelerator.is_main_process


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
    acc = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum)
    run = Run(recipe, pm, acc)
    run.tokenizer = first(h.plugtune_load_tokenizer, "load the tokenizer", recipe=recipe)
    splits = first(h.plugtune_read_data, "read the data", recipe=recipe)
    for split in ("train", "validation"):
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
                          "the freeze/lora settings of the recipe")
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


def evaluate(run, step):
    """Mean loss over the validation split, plus every plugin's extra metrics."""
    model, data = run.model, run.data["validation"]
    batch_size = run.recipe.train.eval_batch_size or run.recipe.train.batch_size
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(data.examples), batch_size):
            batch = data.collate(data.examples[i:i + batch_size])
            batch = {k: v.to(run.accelerator.device) for k, v in batch.items()}
            with run.accelerator.autocast():
                loss = run.pm.hook.plugtune_compute_loss(model=model, batch=batch,
                                                         recipe=run.recipe)
            losses.append(loss.float().item())
        result = {"step": step, "eval_loss": sum(losses) / max(len(losses), 1)}
        for extra in run.pm.hook.plugtune_evaluate(run=run, model=model, step=step,
                                                   eval_loss=result["eval_loss"]):
            result.update(extra or {})
    model.train()
    run.pm.hook.plugtune_log(run=run, record=result)
    return result


def train(run, echo=print):
    """Train ``run`` (from :func:`setup`) to the end; return the summary."""
    h, t, acc = run.pm.hook, run.recipe.train, run.accelerator
    data = run.data["train"]
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = first(h.plugtune_build_optimizer, "build the optimizer", params=params,
                      recipe=run.recipe)
    loader = torch.utils.data.DataLoader(data.examples, batch_size=t.batch_size, shuffle=True,
                                         collate_fn=data.collate, drop_last=False)
    trainable, total = count_parameters(run.model)
    raw_optimizer = optimizer
    run.model, optimizer, loader = acc.prepare(run.model, optimizer, loader)
    # the prepared loader holds this process's share of the batches (under accelerate launch)
    steps_per_epoch = math.ceil(len(loader) / t.grad_accum)
    run.total_steps = t.max_steps or steps_per_epoch * t.epochs
    # stepped by the loop once per optimizer step, whatever the number of processes
    scheduler = first(h.plugtune_build_scheduler, "build the scheduler", optimizer=raw_optimizer,
                      recipe=run.recipe, total_steps=run.total_steps)
    processes = f" x {acc.num_processes} processes" if acc.num_processes > 1 else ""
    echo(f"training: {run.total_steps} steps of {t.batch_size} x {t.grad_accum} sequences"
         f"{processes} ({steps_per_epoch} steps per epoch) on {acc.device}")
    run.dir = rundir.create(run.recipe) if run.is_main else None
    error, start = None, time.perf_counter()
    try:
        h.plugtune_train_start(run=run)
        before = evaluate(run, 0)
        window, tokens, tick = [], 0, time.perf_counter()
        while run.step < run.total_steps:
            for batch in loader:
                with acc.accumulate(run.model):
                    loss = h.plugtune_compute_loss(model=run.model, batch=batch,
                                                   recipe=run.recipe)
                    acc.backward(loss)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad()
                window.append(loss.detach().float().item())
                mask = batch.get("attention_mask")
                tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                if not acc.sync_gradients:
                    continue
                run.step += 1
                loss_sum, count = sum(window), len(window)
                if acc.num_processes > 1:  # every process's share, under accelerate launch
                    loss_sum, tokens = acc.reduce(
                        torch.tensor([loss_sum, tokens], device=acc.device)).tolist()
                    count *= acc.num_processes
                now = time.perf_counter()
                metrics = {"step": run.step, "loss": loss_sum / count,
                           "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / (now - tick),
                           "epoch": run.step / steps_per_epoch}
                window, tokens, tick = [], 0, now
                h.plugtune_step_end(run=run, step=run.step, metrics=metrics)
                if run.step % t.log_every == 0:
                    h.plugtune_log(run=run, record=metrics)
                if t.eval_every and run.step % t.eval_every == 0 and run.step < run.total_steps:
                    evaluate(run, run.step)
                if run.step >= run.total_steps:
                    break
        after = evaluate(run, run.step)
        artifact = save(run) if run.is_main and run.recipe.output.save_model else None
        summary = {"steps": run.step, "seconds": time.perf_counter() - start,
                   "eval_before": before, "eval_after": after, "artifact": artifact,
                   "truncated": data.truncated, "trainable": trainable, "total": total}
        h.plugtune_train_end(run=run, summary=summary)
        return summary
    except BaseException as exc:
        error = exc
        raise
    finally:
        h.plugtune_teardown(run=run, error=error)
        if run.dir is not None:
            status = "completed" if error is None else f"failed: {type(error).__name__}: {error}"
            rundir.update_manifest(run.dir, status=status, steps=run.step)


def save(run):
    """Save the final model through the save hook, into place by a rename."""
    tmp = run.dir / ".artifact.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    name = first(run.pm.hook.plugtune_save_model, "save the model", run=run,
                 model=run.accelerator.unwrap_model(run.model), tokenizer=run.tokenizer, path=tmp)
    final = run.dir / name
    tmp.replace(final)
    return str(final)
