"""The loader sizes itself to the shared memory it has (Docker's default /dev/shm is 64 MiB), instead of
dying mid-epoch with "unable to allocate shared memory"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from medseg.loading.shared_memory import LoaderPlan, fit_to_shared_memory

MIB = 2**20


def test_fewer_batches_ahead_first_then_fewer_workers_then_none():
    assert fit_to_shared_memory(12, 4, 20 * MIB, 8 * 1024 * MIB) == LoaderPlan(12, 4)  # --shm-size=8g: as asked
    assert fit_to_shared_memory(4, 4, 2 * MIB, 64 * MIB) == LoaderPlan(4, 3)  # (4 x 3 + 2) x 2 = 28 <= 32
    assert fit_to_shared_memory(4, 4, 4 * MIB, 64 * MIB) == LoaderPlan(3, 2)  # (3 x 2 + 2) x 4 = 32 <= 32
    assert fit_to_shared_memory(4, 4, 10 * MIB, 64 * MIB) == LoaderPlan(0, None)  # even 1 x 2 would not fit
    assert fit_to_shared_memory(0, 4, 10 * MIB, 64 * MIB) == LoaderPlan(0, None)
    assert fit_to_shared_memory(4, 4, 10 * MIB, None) == LoaderPlan(4, 4)  # nothing to measure: as asked


PROBE = textwrap.dedent('''
    import sys
    import numpy as np
    from medseg.loading.datamodule import SegmentationDataModule

    class Cache:
        def load_arrays(self, case_id, mmap=True):
            data = np.random.default_rng(int(case_id)).normal(size=(1, 64, 64, 64)).astype(np.float32)
            label = np.zeros((64, 64, 64), np.uint8)
            label[20:40, 20:40, 20:40] = 1
            return data, label, {1: np.argwhere(label == 1)}

    batch = int(sys.argv[1])
    dm = SegmentationDataModule(Cache(), ["0", "1", "2"], ["0"], [64, 64, 64], batch, iterations_per_epoch=30,
                                num_workers=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    print("batches", sum(1 for _ in loader), "workers", loader.num_workers, "prefetch", loader.prefetch_factor)
''')


def _in_small_shm(tmp_path, batch: int) -> subprocess.CompletedProcess:
    """The probe in a private mount namespace whose /dev/shm is a 64 MiB tmpfs, as Docker gives by default."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    inner = f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} {script} {batch}"
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _can_mount_a_small_shm() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount_a_small_shm(),
                                 reason="needs a private mount namespace (unshare -m, as root) for a small /dev/shm")


@needs_mount
def test_in_a_64_mib_shm_the_loader_keeps_running_with_what_fits(tmp_path):
    # 4 workers x 4 batches ahead of 8 x 64^3 patches (10 MiB each) need ~180 MiB: torch's loader died with
    # "unable to allocate shared memory" here before it sized itself
    result = _in_small_shm(tmp_path, batch=8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batches 30 workers 0 prefetch None" in result.stdout
    assert "do not fit in the 64 MiB free in /dev/shm; using 0 worker(s)" in result.stderr
    assert "--shm-size" in result.stderr
    # smaller batches keep all four workers, with fewer batches ahead
    result = _in_small_shm(tmp_path, batch=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batches 30 workers 4 prefetch 2" in result.stdout
