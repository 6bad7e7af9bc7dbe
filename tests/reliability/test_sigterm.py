"""SIGTERM (SLURM preemption or scancel, docker stop) ends training with a message, a non-zero status that tells
schedulers and `&&` chains the fold is unfinished, and a checkpoint the same command resumes from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

EXE = Path(sys.executable).with_name("medseg-train")


def _command(tmp_path: Path, epochs: int) -> list[str]:
    return [str(EXE), "debug=fast", "callbacks.progress=plain", f"trainer.max_epochs={epochs}",
            f"paths.data={tmp_path / 'data'}"]


def test_sigterm_stops_with_status_143_and_the_same_command_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_command(tmp_path, 50), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # wait until a checkpointed epoch is behind us
        lines.append(line)
        if "epoch 2/50" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 143, out[-3000:]
    fold = tmp_path / "outputs" / "synthetic" / "unet__dice_ce" / "fold_0"
    last = fold / "checkpoints" / "last.ckpt"
    assert "training stopped by SIGTERM" in out and f"{last.relative_to(tmp_path)} holds the last finished epoch" in out
    assert "run the same command again to resume" in out
    assert not (fold / "metrics.json").exists()
    stopped_at = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= stopped_at < 49
    resumed = subprocess.run(_command(tmp_path, stopped_at + 2), cwd=tmp_path, capture_output=True, text=True,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert json.loads((fold / "metrics.json").read_text())["epochs"] == stopped_at + 2
