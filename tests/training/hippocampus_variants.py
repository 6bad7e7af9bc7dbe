"""Small nnU-Net raw datasets made from real Hippocampus cases (images symlinked, never copied), and the tiny
settings the fine-tuning tests train with."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.conftest import hippocampus_root

NUM_CASES = 12
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
MERGED = {"background": 0, "hippocampus": 1}
# a 4-stage network (so it has a deep-supervision head) of 4-32 features on a 32x32x16 patch: ~10 it/s on one
# CPU thread; AdamW learns the task in tens of iterations, where SGD + poly (nnU-Net's) needs hundreds
TINY = ["data=nnunet_raw", "debug=fast", "planner.base_features=4", "planner.patch_size=[32,32,16]",
        "augmentation.enabled=false", "optimizer=adamw", "optimizer.lr=0.01", "scheduler=poly",
        "callbacks.progress=plain", "validation.iterations=4"]


def _cases(task: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (task / "imagesTr").glob("hippocampus_*.nii.gz"))[:NUM_CASES]


def make_variant(root: Path, name: str, channels: int = 1, merge: bool = False) -> Path:
    """<root>/<name>: the first NUM_CASES cases; ``channels`` copies of the image (symlinks: channel k is
    <case>_000k); ``merge``: labels 1 and 2 written as one foreground label."""
    task = hippocampus_root().resolve()
    dataset = root / name
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True, exist_ok=True)
    cases = _cases(task)
    for case in cases:
        for k in range(channels):
            (dataset / "imagesTr" / f"{case}_{k:04d}.nii.gz").symlink_to(task / "imagesTr" / f"{case}.nii.gz")
        source = task / "labelsTr" / f"{case}.nii.gz"
        if merge:
            img = nib.load(str(source))
            merged = (np.asarray(img.dataobj) > 0).astype(np.uint8)
            nib.save(nib.Nifti1Image(merged, img.affine, img.header), str(dataset / "labelsTr" / source.name))
        else:
            (dataset / "labelsTr" / source.name).symlink_to(source)
    meta = {"channel_names": {str(k): "MRI" for k in range(channels)}, "labels": MERGED if merge else LABELS,
            "numTraining": len(cases), "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    return dataset


def paths(root: Path) -> list[str]:
    return [f"paths.preprocessed={root / 'pre'}", f"paths.output={root / 'out'}"]
