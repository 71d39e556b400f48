"""One writer per run directory: an exclusive ``flock`` on ``<out>/.lock`` for as long as a run writes there.

The kernel releases the lock when the process ends, however it ends (SIGKILL included), so a stale lock file never
blocks a ``--resume``; a second ``cil run`` into the same ``--out`` while the first is alive is refused in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class RunDirectoryBusyError(FileExistsError):
    """Another process is writing this run directory."""


@contextlib.contextmanager
def exclusive_run_directory(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusyError(
                f"another cil run is writing {str(out)!r}; wait for it to finish, or choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
