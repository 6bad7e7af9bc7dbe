"""The preprocessed cache under faults: a write that fails half-way (disk full) or a process killed with
SIGKILL mid-write never leaves a case that a later run trusts, and the next run redoes exactly those cases."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from medseg.datasets.adapters import build_manifest
from medseg.errors import MedsegError
from medseg.planning.fingerprint import compute_fingerprint
from medseg.planning.planner import PlannerSettings, plan_dataset
from medseg.preprocessing.cache import case_key, preprocess_dataset


def _plan(root, **settings):
    manifest = build_manifest("msd", root=str(root))
    fp = compute_fingerprint(manifest, num_processes=1, progress=False)
    return manifest, plan_dataset(fp, manifest.channel_names, manifest.label_scheme, PlannerSettings(**settings))


def _keys(manifest, plan):
    config_key = plan.preprocessing_key("3d_fullres")
    return {c.case_id: case_key(c, config_key) for c in manifest.cases}


def _stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if not p.name.startswith(".")}


def test_disk_full_mid_write_leaves_the_case_untrusted_even_where_an_older_entry_existed(synthetic_root, tmp_path,
                                                                                           monkeypatch):
    manifest, plan = _plan(synthetic_root)
    folder = tmp_path / "cache"
    cache = preprocess_dataset(manifest, plan, plan.configuration("3d_fullres"), folder, num_processes=1,
                               progress=False)
    _, plan2 = _plan(synthetic_root, target_spacing=[1.2, 1.0, 1.0])  # every case must be redone
    keys2 = _keys(manifest, plan2)
    real_save, calls = np.save, []

    def disk_full_on_the_fourth_array(f, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the second case's label: part written, then the disk is full
            f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", disk_full_on_the_fourth_array)
    with pytest.raises(MedsegError, match=r"synthetic_001.json: cannot write the preprocessed case synthetic_001 "
                                          r"\(No space left on device\)"):
        preprocess_dataset(manifest, plan2, plan2.configuration("3d_fullres"), folder, num_processes=1,
                           progress=False)
    monkeypatch.undo()
    assert cache.is_current("synthetic_000", keys2["synthetic_000"])
    # its old entry (first plan) is gone, not trusted with half-new arrays
    assert not cache.paths("synthetic_001")["properties"].exists()
    assert not any(cache.is_current("synthetic_001", k) for k in (keys2["synthetic_001"],
                                                                   _keys(manifest, plan)["synthetic_001"]))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left behind
    before = _stamps(folder)
    preprocess_dataset(manifest, plan2, plan2.configuration("3d_fullres"), folder, num_processes=1, progress=False)
    after = _stamps(folder)
    assert all(cache.is_current(c, k) for c, k in keys2.items())
    assert after["synthetic_000.npy"] == before["synthetic_000.npy"]  # a finished case is not redone


KILLED_RUN = """
import os, signal, sys
import numpy as np
from medseg.datasets.adapters import build_manifest
from medseg.planning.plan import Plan
from medseg.preprocessing.cache import preprocess_dataset

real_save, calls = np.save, []

def killed_mid_write(f, array, *args, **kwargs):
    calls.append(1)
    if len(calls) == 5:  # the third case's image: part of it written, then SIGKILL (no cleanup runs)
        f.write(b"\\x93NUMPY partial")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(f, array, *args, **kwargs)

np.save = killed_mid_write
plan = Plan.load(sys.argv[2])
preprocess_dataset(build_manifest("msd", root=sys.argv[1]), plan, plan.configuration("3d_fullres"), sys.argv[3],
                   num_processes=1, progress=False)
"""


def test_sigkill_mid_write_then_the_next_run_redoes_only_the_unfinished_cases(synthetic_root, tmp_path):
    manifest, plan = _plan(synthetic_root)
    plan.save(tmp_path / "plans.json")
    folder = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(synthetic_root),
                           str(tmp_path / "plans.json"), str(folder)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    keys = _keys(manifest, plan)
    from medseg.preprocessing.cache import PreprocessedCache

    cache = PreprocessedCache(folder)
    assert [c for c, k in keys.items() if cache.is_current(c, k)] == ["synthetic_000", "synthetic_001"]
    assert [p.name for p in folder.iterdir() if p.name.startswith(".synthetic_002.npy.")]  # the torn temp file
    assert not cache.paths("synthetic_002")["image"].exists()  # never under the real name
    before = _stamps(folder)
    preprocess_dataset(manifest, plan, plan.configuration("3d_fullres"), folder, num_processes=1, progress=False)
    assert all(cache.is_current(c, k) for c, k in keys.items())
    after = _stamps(folder)
    assert [n for n in before if after[n] != before[n]] == []  # the two finished cases were not redone
    data, label = cache.load_volume("synthetic_002")
    assert data.shape[1:] == label.shape and np.isfinite(data).all()
