"""One medseg process at a time per output folder.

An advisory lock (``fcntl.flock``) on a small file; the kernel drops it when its holder exits, killed or not,
so a crashed run never blocks the next one. The holder removes the file while still holding the lock, and a
taker checks that the file it locked is still the one at the path, so no two processes can both believe they
hold it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from medseg.errors import LockedError

try:
    import fcntl
except ImportError:  # not on POSIX: no locking
    fcntl = None


def _holder(fd: int) -> str:
    text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    return text or "a process that has not written its id yet"


@contextlib.contextmanager
def exclusive(lock_path: str | Path, folder: str | Path, what: str):
    """Hold ``lock_path`` for the block, or raise LockedError (naming the holder's pid) at once if another
    process holds it. ``folder`` and ``what`` only word the message."""
    lock_path = Path(lock_path)
    if fcntl is None:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockedError(f"{folder} is in use by another medseg process ({holder}); one {what} at a time may "
                              f"use it: wait for that one to finish or choose another folder (lock: {lock_path})"
                              ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: take the new one
    else:
        raise LockedError(f"{lock_path}: could not take the lock (the file keeps being replaced)")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what}, pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still locked: see the module docstring
        os.close(fd)
