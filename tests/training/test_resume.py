"""A killed run resumes with the same command; checkpoints are never half-written; finished runs extend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medseg.training.checkpoint_io import AtomicCheckpointIO

EXE = Path(sys.executable).with_name("medseg-train")


def _command(tmp_path: Path, *extra: str) -> list[str]:
    return [str(EXE), "debug=fast", f"paths.data={tmp_path / 'data'}", "sampling.iterations_per_epoch=12",
            "trainer.max_epochs=4", "callbacks.progress=plain", *extra]


def _run(tmp_path: Path, *extra: str) -> str:
    result = subprocess.run(_command(tmp_path, *extra), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_kill_9_mid_epoch_then_the_same_command_resumes_and_finishes(tmp_path):
    fold = tmp_path / "outputs" / "synthetic" / "unet__dice_ce" / "fold_0"
    proc = subprocess.Popen(_command(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    epoch_started = None
    try:
        for line in proc.stdout:
            if "epoch 1/4" in line:
                epoch_started = time.monotonic()
            if "epoch 2/4" in line:
                # epoch 2 took (now - epoch_started); kill the process about half-way through epoch 3
                time.sleep(0.5 * (time.monotonic() - epoch_started))
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (fold / "metrics.json").exists()
    killed_at = torch.load(fold / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert killed_at["epoch"] in (1, 2)  # epoch index of the last completed epoch

    out = _run(tmp_path)
    assert "resuming from" in out
    assert "epoch 1/4" not in out and "epoch 4/4" in out  # continued, not restarted
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["epochs"] == 4 and metrics["num_cases"] == 5
    for ckpt in (fold / "checkpoints").glob("*.ckpt"):
        assert "state_dict" in torch.load(ckpt, map_location="cpu", weights_only=True)

    # finished: the same command does nothing; a larger max_epochs is refused (exit 2, before any data work)
    # unless extend=true, which keeps the old results
    assert "nothing to do" in _run(tmp_path)
    refused = subprocess.run(_command(tmp_path, "trainer.max_epochs=5"), cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode == 2 and "extend=true" in refused.stderr
    out = _run(tmp_path, "trainer.max_epochs=5", "extend=true")
    assert "epoch 5/5" in out and "epoch 4/5" not in out
    assert json.loads((fold / "metrics.json").read_text())["epochs"] == 5
    assert json.loads((fold / "metrics.epochs4.json").read_text()) == metrics
    assert (fold / "validation.epochs4" / "per_case.csv").is_file()


def test_a_checkpoint_write_that_fails_half_way_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
