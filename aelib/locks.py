"""One run at a time in a folder: a lock file the kernel holds (flock) for its process.

It ends with the process however that ends, so a crash or a kill leaves nothing to clear
by hand. Standard library only: `jobs/sweep.py` loads this file without importing the
aelib package (whose __init__ imports Keras).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


class Busy(Exception):
    """Another process holds the lock; str() is what it wrote there (who it is)."""


@contextlib.contextmanager
def held(lock: str | os.PathLike, holder: str) -> Iterator[None]:
    """Holds file `lock` (made if missing) while the block runs, with `holder` written in
    it for a second process to name; raises Busy at once if another process holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise Busy(who or "another process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)
