"""The output-folder lock between processes: the second taker is refused with the holder's pid, and a holder
killed with SIGKILL leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from medseg.errors import LockedError
from medseg.locking import exclusive

HOLD = """
import sys, time
from medseg.locking import exclusive
with exclusive(sys.argv[1], sys.argv[2], "prediction"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_lock_held_by_another_process_refuses_then_frees_when_that_process_is_killed(tmp_path):
    lock = tmp_path / "out" / ".medseg-predict.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(tmp_path / "out")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"out is in use by another medseg process \(prediction, pid "
                                              rf"{holder.pid} on .*\); one prediction at a time"):
            with exclusive(lock, tmp_path / "out", "prediction"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert lock.exists()  # the killed holder could not remove it, but the kernel released its lock
    with exclusive(lock, tmp_path / "out", "prediction"):
        assert f"pid {os.getpid()} " in lock.read_text()
    assert not lock.exists()
