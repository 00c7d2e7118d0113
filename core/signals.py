"""SIGTERM as an exception: while :func:`terminate_raises` is active a SIGTERM raises
:class:`Terminated` in the main thread, so every ``finally`` and ``except BaseException`` runs —
temporary folders (a GGUF conversion, an export) are removed and a run's manifest says it
failed — instead of the process vanishing mid-write."""
import signal
from contextlib import contextmanager


class Terminated(BaseException):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def terminate_raises():
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
