"""Loader workers hand their batches to the training process through shared memory (/dev/shm). Docker gives a
container 64 MiB of it unless started with ``--shm-size`` or ``--ipc=host``; torch then fails mid-epoch with
"unable to allocate shared memory". The loader sizes itself to what is there, before training starts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

SHM_PATH = "/dev/shm"
# share of the free shared memory the batches in flight may take: the rest is for the validation loader, other
# processes on the node and torch's own bookkeeping
SHARE = 0.5
MIN_PREFETCH = 2
ADVICE = ("give the container more shared memory (docker run --shm-size=8g ..., or --ipc=host) or set "
          "sampling.num_workers explicitly")


@dataclass(frozen=True)
class LoaderPlan:
    workers: int
    prefetch: int | None  # batches each worker prepares ahead; None without workers

    def in_flight(self) -> int:
        """Batches that can sit in shared memory at once: every worker's prefetched ones, plus the one being
        handed over and the one the training step holds."""
        return self.workers * (self.prefetch or 0) + 2 if self.workers else 0


def free_shared_memory(path: str = SHM_PATH) -> int | None:
    """Bytes free for unprivileged use in the shared-memory file system, None where there is none to measure."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def fit_to_shared_memory(workers: int, prefetch: int, batch_bytes: int, free_bytes: int | None) -> LoaderPlan:
    """The largest loader (fewer batches ahead first, then fewer workers) whose batches in flight fit in
    ``SHARE`` of ``free_bytes``; no workers at all when even one worker with two batches ahead would not fit."""
    wanted = LoaderPlan(workers, prefetch if workers else None)
    if workers == 0 or free_bytes is None:
        return wanted
    budget = SHARE * free_bytes
    for w in range(workers, 0, -1):
        for p in range(prefetch, MIN_PREFETCH - 1, -1):
            plan = LoaderPlan(w, p)
            if plan.in_flight() * batch_bytes <= budget:
                return plan
    return LoaderPlan(0, None)


def sized_loader(workers: int, prefetch: int, batch_bytes: int, what: str, path: str = SHM_PATH) -> LoaderPlan:
    """``fit_to_shared_memory`` for the shared memory at ``path``, saying what was reduced and why."""
    free = free_shared_memory(path)
    plan = fit_to_shared_memory(workers, prefetch, batch_bytes, free)
    if plan != LoaderPlan(workers, prefetch if workers else None):
        mib = 2**20
        log.warning("%s loader: %d worker(s) x %d batch(es) ahead of %.1f MiB each do not fit in the %.0f MiB free "
                    "in %s; using %d worker(s)%s. To keep %d, %s", what, workers, prefetch, batch_bytes / mib,
                    (free or 0) / mib, path, plan.workers,
                    f" x {plan.prefetch} ahead" if plan.workers else " (batches made in the training process)",
                    workers, ADVICE)
    return plan
