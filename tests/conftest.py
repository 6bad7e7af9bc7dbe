"""Shared fixtures: the real Hippocampus data (read in place) and small generated datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli.common import CONFIG_DIR as medseg_config_dir
from medseg.datasets.synthetic import generate_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(medseg_config_dir)  # the package's own configs (src/medseg/configs), as the CLIs find them


def hippocampus_root() -> Path:
    root = Path(os.environ.get("MEDSEG_HIPPOCAMPUS", REPO.parent / "shared" / "data" / "Task04_Hippocampus"))
    if not (root / "dataset.json").is_file():
        raise RuntimeError(f"the Hippocampus data is expected at {root} (set MEDSEG_HIPPOCAMPUS)")
    return root


@pytest.fixture(scope="session")
def hippocampus() -> Path:
    return hippocampus_root()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "synthetic", num_train=10,
                                      num_test=2, shape=(24, 28, 20), spacing=(1.0, 1.0, 1.5), seed=1)


def write_nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def make_msd(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], modality=None, labels=None,
             affine=None) -> Path:
    """An MSD-layout dataset from arrays: {case: (image, label)}."""
    training = []
    for case, (image, label) in cases.items():
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {"name": root.name, "modality": modality or {"0": "MRI"},
            "labels": labels or {"0": "background", "1": "a", "2": "b"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def compose(config_name: str, overrides: list[str]):
    """The real Hydra configs, composed as the CLIs compose them."""
    from hydra import compose as hydra_compose, initialize_config_dir

    import medseg.cli.common  # noqa: F401 - registers the resolvers

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)
