"""How a run stops other than at its end: signals (stop after this step, or at once), the
checkpoint a signal or a crash leaves, and the manifest's status line."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator

import torch

from . import checkpoint, sharding
from .errors import PlugtuneError
from .state import Run

Echo = Callable[[str], object]


class Interrupted(PlugtuneError):
    """SIGINT/SIGTERM: the run stopped after a whole step and wrote a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class FinalInterrupt(BaseException):
    """A signal during the final phase (steps_done, the final evaluation, the save): raised in
    the handler, so a long evaluation does not keep a scheduler waiting until its SIGKILL. A
    BaseException, so a plugin's ``except Exception`` does not swallow it."""


@contextlib.contextmanager
def signals(run: Run, echo: Echo, phase: dict[str, bool] | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM ask the loop to stop after the current step (with a checkpoint); a
    second SIGINT/SIGTERM stops at once. In the final phase (``phase["final"]``) the first
    signal stops the evaluation/save at once (:class:`FinalInterrupt`; the loop writes a
    checkpoint of the last step); once the model is saved (``phase["saved"]``) the run just
    finishes. Handlers are restored afterwards."""
    phase = {} if phase is None else phase

    def handler(signum: int, frame: FrameType | None) -> None:
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

    previous: dict[signal.Signals, Any] = {}
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


def agree(acc: Any, flag: bool) -> bool:
    """Whether any process wants ``flag`` (so all of them stop at the same step)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum").item())


def checkpoint_step(run: Run, t: Any, rng: list[Any] | None = None) -> Path | None:
    """``RUN/checkpoints/step-K``, keeping the newest ``train.keep_checkpoints``; every
    process calls it (each one's random state is recorded, and under FSDP its shards) but
    after a crash (``rng``), where the main process alone does."""
    rng = rng or run.rng_states()
    if not run.is_main:  # under FSDP its shards are gathered with the others'
        run.save_checkpoint("", rng=rng)
        return None
    assert run.dir is not None  # the main process has the run directory
    path = run.save_checkpoint(checkpoint.directory(run.dir) / f"step-{run.step}", rng=rng)
    checkpoint.prune(run.dir, t.keep_checkpoints)
    return path


def rescue(run: Run, rng: list[Any], echo: Echo) -> None:
    """After a crash outside an optimizer update (out of memory, a plugin's error): the
    weights, optimizer and scheduler are still those of the last whole step, so checkpoint
    them with the random state that step ended with, and the run can be resumed."""
    if run.dir is None or (checkpoint.directory(run.dir) / f"step-{run.step}").exists():
        return
    if sharding.is_sharded(run.accelerator):  # the other processes may be gone
        echo(f"no checkpoint of step {run.step} after this error: under "
             f"{run.accelerator.distributed_type} the state is sharded across the processes; "
             "resume from the last saved checkpoint")
        return
    try:
        path = checkpoint_step(run, run.recipe.train, rng=rng)
        echo(f"wrote a checkpoint of step {run.step} before stopping: {path}")
    except Exception as exc:  # the original error matters more
        echo(f"could not write a checkpoint of step {run.step}: {exc}")


def interrupt(run: Run, rng: list[Any], final: bool = False) -> Interrupted:
    """Checkpoint the last step (with the random state it ended with) and say how to go on.
    ``final``: the signal came after the last step, in the final evaluation or save."""
    signum = run.signum or signal.SIGTERM  # another process was signalled
    path = checkpoint_step(run, run.recipe.train, rng=rng)
    where, then = ("", "") if not final else (
        " (after the last step, before the model was saved)",
        " (it evaluates and saves the model)")
    return Interrupted(f"{signal.Signals(signum).name}: interrupted at step {run.step} of "
                       f"{run.total_steps}{where}; checkpoint {path}; continue with: plugtune "
                       f"resume {run.dir}{then}", signum)


def log_anyway(run: Run, record: dict[str, Any], echo: Echo) -> None:
    """Log a step's record after a hook failed before it was logged."""
    try:
        run.pm.hook.plugtune_log(run=run, record=record)
    except Exception as exc:  # the original error matters more
        echo(f"could not log step {record['step']}: {exc}")


def status(run: Run, error: BaseException | None, early: str | None = None) -> str:
    """The manifest's status. ``early``: the reason of a stop that cut training short (a stop
    asked after the last step, e.g. in the final evaluation, changes nothing)."""
    if error is None:
        return f"stopped early: {early}" if early else "completed"
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        return f"interrupted at step {run.step}"
    return f"failed at step {run.step}: {type(error).__name__}: {error}"
