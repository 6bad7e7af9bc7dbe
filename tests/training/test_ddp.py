"""trainer=ddp: two CPU processes (gloo) train one fold; ranks draw different batches; rank 0 validates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from medseg.loading import datamodule


def test_ranks_draw_different_patch_streams():
    seeds = []
    for rank in (0, 1):
        with mock.patch.object(datamodule.dist, "is_initialized", return_value=True), \
                mock.patch.object(datamodule.dist, "get_rank", return_value=rank):
            seeds.append(datamodule._process_seed(0))
    assert seeds[0] != seeds[1]
    assert datamodule._process_seed(0) != datamodule._process_seed(250)  # a resumed run does not replay


def test_two_process_ddp_run_trains_and_validates_once(tmp_path):
    exe = Path(sys.executable).with_name("medseg-train")
    result = subprocess.run([str(exe), "debug=fast", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                             "callbacks.progress=plain", f"paths.data={tmp_path / 'data'}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "world_size: 2" in out or "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    fold = tmp_path / "outputs" / "synthetic" / "unet__dice_ce" / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["num_cases"] == 5 and np.isfinite(metrics["dice_mean"])
    assert out.count("fold 0 validation: mean Dice") == 1  # only rank 0 runs the final validation
    # the recipe of one process: the plan's batch of 2 split in two, every one of the 2 x 4 optimizer steps run
    assert "rank 0 of 2: 1 of the batch's 2 samples (0 centred on foreground), all 4 iterations" in out
    assert "rank 1 of 2: 1 of the batch's 2 samples (1 centred on foreground), all 4 iterations" in out
    last = torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and metrics["epochs"] == 2
