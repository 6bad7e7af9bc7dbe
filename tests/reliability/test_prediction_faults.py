"""Prediction under bad inputs and faults: a truncated, NaN/Inf or enormous input fails its own case with its
file named while the others are written; a full disk or a SIGKILL mid-write leaves no partial output that the
skip-existing logic would take as done, and replaces nothing that was there; untrusted or damaged checkpoints
are refused before anything is written; two predictions cannot share an output folder."""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.errors import CheckpointError, LockedError
from medseg.inference.batch import LOCK_FILE, SUMMARY_FILE
from medseg.locking import exclusive
from tests.inference.conftest import SCAN_CASES, predict_on_cpu

CASES = SCAN_CASES
_predict = predict_on_cpu


def test_truncated_nan_inf_and_enormous_inputs_fail_only_their_own_case(tiny_run, scans, tmp_path):
    good = nib.load(str(scans / f"{CASES[0]}.nii.gz"))
    whole = (scans / f"{CASES[0]}.nii.gz").read_bytes()
    (scans / "a_truncated.nii.gz").write_bytes(whole[: len(whole) * 2 // 3])
    for name, value in (("b_nan", np.nan), ("c_inf", -np.inf)):
        data = np.asarray(good.dataobj, dtype=np.float32).copy()
        data[5:7, 5:7, 5:7] = value
        nib.save(nib.Nifti1Image(data, good.affine), str(scans / f"{name}.nii.gz"))
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((5000, 5000, 5000))
    (scans / "d_huge.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 100))
    out = tmp_path / "preds"
    summary = _predict(tiny_run, scans, out)
    assert summary.written == CASES
    failed = summary.failed
    assert sorted(failed) == ["a_truncated", "b_nan", "c_inf", "d_huge"]
    assert failed["a_truncated"].startswith(str(scans / "a_truncated.nii.gz") + ": cannot read the voxel data; "
                                            "the file is truncated or corrupt")
    assert failed["b_nan"] == f"{scans / 'b_nan.nii.gz'}: image contains NaN or Inf values (8 voxel(s))"
    assert failed["c_inf"] == f"{scans / 'c_inf.nii.gz'}: image contains NaN or Inf values (8 voxel(s))"
    assert "d_huge.nii.gz: the header declares a 5000x5000x5000 volume" in failed["d_huge"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{c}.nii.gz" for c in CASES] + [SUMMARY_FILE])
    assert json.loads((out / SUMMARY_FILE).read_text())["failed"] == failed


def test_disk_full_while_writing_a_prediction(tiny_run, scans, tmp_path, monkeypatch):
    real_save, calls = nib.save, []

    def disk_full_on_the_second_case(img, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\x1f\x8b partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(img, filename, *args, **kwargs)

    out = tmp_path / "preds"
    monkeypatch.setattr(nib, "save", disk_full_on_the_second_case)
    summary = _predict(tiny_run, scans, out)
    monkeypatch.undo()
    target = out / f"{CASES[1]}.nii.gz"
    assert summary.written == [CASES[0], CASES[2]]
    assert summary.failed == {CASES[1]: f"{target}: cannot write (No space left on device); nothing was replaced"}
    assert not target.exists() and not list(out.glob(".*"))  # no partial file, no temp file
    again = _predict(tiny_run, scans, out)  # the failed case is not taken as done
    assert again.written == [CASES[1]] and again.skipped == [CASES[0], CASES[2]]

    # overwrite=true with the disk full again: the earlier, complete prediction stays as it was
    before = target.read_bytes()
    calls.clear()
    monkeypatch.setattr(nib, "save", disk_full_on_the_second_case)
    summary = _predict(tiny_run, scans, out, overwrite=True)
    monkeypatch.undo()
    assert list(summary.failed) == [CASES[1]] and target.read_bytes() == before
    assert nib.load(str(target)).shape == nib.load(str(scans / f"{CASES[1]}.nii.gz")).shape


KILLED_PREDICTION = """
import os, signal, sys
from pathlib import Path
import nibabel as nib
from medseg.inference.batch import predict_folder

real_save, calls = nib.save, []

def killed_mid_write(img, filename, *args, **kwargs):
    calls.append(filename)
    if len(calls) == 2:  # the second case: part of the file written, then SIGKILL (no cleanup runs)
        Path(filename).write_bytes(b"\\x1f\\x8b partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(img, filename, *args, **kwargs)

nib.save = killed_mid_write
predict_folder(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), device="cpu", progress=False)
"""


def test_sigkill_mid_write_then_the_next_run_predicts_the_unfinished_cases(tiny_run, scans, tmp_path):
    out = tmp_path / "preds"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_PREDICTION), str(tiny_run), str(scans),
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"{CASES[0]}.nii.gz"]
    assert [p for p in out.iterdir() if p.name.startswith(f".{CASES[1]}.nii.gz.")]  # the torn temp file
    assert (out / LOCK_FILE).exists()  # left by the killed process, but no longer held
    summary = _predict(tiny_run, scans, out)
    assert summary.skipped == [CASES[0]] and summary.written == CASES[1:]
    for case in CASES:
        assert nib.load(str(out / f"{case}.nii.gz")).shape == nib.load(str(scans / f"{case}.nii.gz")).shape


def test_a_second_prediction_into_the_same_folder_is_refused(tiny_run, scans, tmp_path):
    out = tmp_path / "preds"
    out.mkdir()
    with exclusive(out / LOCK_FILE, out, "prediction"):
        with pytest.raises(LockedError, match=rf"{out} is in use by another medseg process \(prediction, pid "
                                              rf"{os.getpid()} on "):
            _predict(tiny_run, scans, out)
        assert not list(out.glob("*.nii.gz"))
    assert _predict(tiny_run, scans, out).written == CASES
    assert not (out / LOCK_FILE).exists()  # removed once the run is over


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"): creates the marker file
        return (open, (str(self.marker), "w"))


def test_untrusted_and_damaged_checkpoints_are_refused_before_anything_is_written(tiny_run, scans, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil_run" / "fold_0" / "checkpoints" / "last.ckpt"
    evil.parent.mkdir(parents=True)
    good = torch.load(tiny_run / "fold_0" / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**good, "callbacks": _Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    out = tmp_path / "preds"
    with pytest.raises(CheckpointError, match=r"last.ckpt: refused: the checkpoint holds a Python object "
                                              r"\(io.open\)"):
        _predict(evil.parents[2], scans, out)
    assert not marker.exists() and not out.exists()

    truncated = tmp_path / "cut_run" / "fold_0" / "checkpoints" / "last.ckpt"
    truncated.parent.mkdir(parents=True)
    whole = (tiny_run / "fold_0" / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=rf"{truncated}: not a readable checkpoint; it is truncated or damaged"):
        _predict(truncated.parents[2], scans, out)
    assert not out.exists()
