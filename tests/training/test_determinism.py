"""Seeded runs repeat exactly; a different seed gives a different run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXE = Path(sys.executable).with_name("medseg-train")


def _train(tmp_path: Path, name: str, *extra: str) -> dict:
    result = subprocess.run([str(EXE), "debug=fast", "trainer.deterministic=true", "callbacks.progress=plain",
                             f"paths.data={tmp_path / 'data'}", f"experiment_name={name}", *extra], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "outputs" / name / "unet__dice_ce" / "fold_0" / "metrics.json").read_text())


def test_same_seed_same_result_other_seed_other_result(tmp_path):
    a = _train(tmp_path, "a")
    b = _train(tmp_path, "b")
    c = _train(tmp_path, "c", "seed=7")
    assert a["dice"] == b["dice"]  # augmentation, sampling and initialisation all follow the seed
    assert a["dice"] != c["dice"]
