"""Stopping a run on SIGTERM (what SLURM and ``timeout`` send) or SIGINT (Ctrl-C) with an exception of its own.

``cil run`` turns the signals into :class:`Interrupted` for the whole command (:func:`interrupt_on_signals`); the
engine discards the unfinished task and writes the files that mark a task finished under
:func:`signals_deferred`, so a signal never splits them; the command line exits with ``128 + signal``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["Interrupted", "interrupt_on_signals", "signals_deferred"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A run stopped by a signal.

    A ``BaseException`` like ``KeyboardInterrupt``, so that ``except Exception`` clean-up does not swallow it, but
    not a ``KeyboardInterrupt``: Lightning turns those into ``sys.exit(1)`` inside ``fit``.

    Args:
        signum: The signal that stopped the run.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        # Filled in by the engine when the signal came during the stream:
        self.finished_tasks: int | None = None
        self.num_tasks: int | None = None
        self.out: Path | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum

    def __str__(self) -> str:
        if self.finished_tasks is None:
            return f"stopped by {self.signal_name} before the stream started"
        return (
            f"stopped by {self.signal_name} in task {self.finished_tasks + 1} of {self.num_tasks}; "
            f"{self.finished_tasks} finished task(s) are saved in {self.out}"
        )


class _State:
    deferring = 0
    pending: int | None = None


def _restore(handlers: dict[int, Any]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def interrupt_on_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Raises :class:`Interrupted` in the main thread when one of ``signums`` arrives during the block.

    The first signal puts the previous handlers back, so a second Ctrl-C stops at once. Lightning's own SIGTERM
    handler, installed during ``fit``, calls this one after noting the signal. Outside the main thread, where
    Python cannot set handlers, the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in signums}

    def handler(signum: int, frame: FrameType | None) -> None:
        _restore(previous)
        if _State.deferring:
            _State.pending = signum
            return
        raise Interrupted(signum)

    _State.pending = None
    for signum in signums:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        _restore(previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds :class:`Interrupted` back until the block has finished (the writes that mark a task finished)."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if not _State.deferring and _State.pending is not None:
        signum, _State.pending = _State.pending, None
        raise Interrupted(signum)
