"""A checkpoint of an untrained tiny U-Net planned on the synthetic data: prediction tests need a real
model, plan and checkpoint format, not a trained one (seeded random weights give varied label maps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from medseg.datasets.adapters import build_manifest
from medseg.inference.batch import predict_folder
from medseg.models import create_model
from medseg.planning.fingerprint import compute_fingerprint
from medseg.planning.planner import PlannerSettings, plan_dataset

PATCH = [16, 16, 16]


def save_untrained_checkpoint(plan, configuration: str, path: Path, model: str = "unet", seed: int = 0) -> Path:
    """A checkpoint as training writes it (model weights under ``model.``, the plan under ``medseg``)."""
    torch.manual_seed(seed)
    config = plan.configuration(configuration)
    net = create_model(model, config.spatial_dims, len(plan.channel_names), len(plan.labels), plan=config)
    extras = {"plan": plan.to_dict(), "configuration": configuration, "fold": 0,
              "model": {"name": model, "kwargs": {}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "medseg": extras}, path)
    return path


@pytest.fixture(scope="session")
def tiny_plan(synthetic_root):
    manifest = build_manifest("msd", root=str(synthetic_root))
    fp = compute_fingerprint(manifest, num_processes=1, progress=False)
    return plan_dataset(fp, manifest.channel_names, manifest.label_scheme,
                        PlannerSettings(patch_size=PATCH, base_features=4))


@pytest.fixture(scope="session")
def tiny_run(tiny_plan, tmp_path_factory) -> Path:
    """A run dir with one fold (fold_0/checkpoints/last.ckpt) of the 3d_fullres configuration."""
    run = tmp_path_factory.mktemp("tiny_run")
    save_untrained_checkpoint(tiny_plan, "3d_fullres", run / "fold_0" / "checkpoints" / "last.ckpt")
    return run


SCAN_CASES = ["synthetic_000", "synthetic_001", "synthetic_002"]


def predict_on_cpu(run, source, out, **kwargs):
    """predict_folder on the CPU with two windows per pass and no progress bar."""
    kwargs.setdefault("progress", False)
    return predict_folder(run, source, out, device="cpu", sw_batch_size=2, **kwargs)


@pytest.fixture()
def scans(synthetic_root, tmp_path) -> Path:
    """A folder of three synthetic images (no labels), as a user's scans."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for case in SCAN_CASES:
        shutil.copy(synthetic_root / "imagesTr" / f"{case}.nii.gz", folder)
    return folder
