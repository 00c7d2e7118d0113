"""SIGTERM as an exception: while :func:`terminate_raises` is active a SIGTERM raises
:class:`Terminated` in the main thread, so every ``finally`` and ``except BaseException`` runs —
temporary folders (a GGUF conversion, an export) are removed and a run's manifest says it
failed — instead of the process vanishing mid-write."""
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(BaseException):
    """The process received SIGTERM."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def terminate_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block. Does nothing where another
    handler is already set (an embedding program's, or an outer block's) or off the main
    thread, where Python cannot set handlers."""
    try:
        installed = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        if installed:
            signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        installed = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
