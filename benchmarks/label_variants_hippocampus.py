"""nnU-Net raw variants of MSD Task04 Hippocampus for the label-scheme benchmark (benchmarks/label_variants.sh).

Usage: python benchmarks/label_variants_hippocampus.py <Task04 folder> <raw folder> [every]

Writes three datasets under <raw folder>, the images as symlinks to the task's files (never written):
* Dataset004_Labels:  the task as it is (Anterior 1, Posterior 2);
* Dataset005_Regions: the same label files declared as nnU-Net regions, hippocampus = [1, 2] and posterior = [2]
  with regions_class_order [1, 2] (painting them back gives the original labels);
* Dataset006_Sparse:  sparse annotation: only every <every>-th slice (3 by default) along the file's first axis
  keeps its labels, every other voxel is the ignore label (3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

CHANNELS = {"0": "MRI"}


def _cases(task: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (task / "imagesTr").glob("*.nii.gz")
                  if not p.name.startswith((".", "_")))


def _dataset(raw: Path, name: str, task: Path, labels: dict, **extra) -> Path:
    root = raw / name
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for case in _cases(task):
        (root / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(task / "imagesTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": CHANNELS, "labels": labels,
                                                   "numTraining": len(_cases(task)), "file_ending": ".nii.gz",
                                                   **extra}, indent=1))
    return root


def make_variants(task: Path, raw: Path, every: int = 3) -> list[Path]:
    task = task.resolve()
    plain = {"background": 0, "Anterior": 1, "Posterior": 2}
    labels = _dataset(raw, "Dataset004_Labels", task, plain)
    regions = _dataset(raw, "Dataset005_Regions", task, {"background": 0, "hippocampus": [1, 2], "posterior": [2]},
                       regions_class_order=[1, 2])
    sparse = _dataset(raw, "Dataset006_Sparse", task, {**plain, "ignore": 3})
    annotated = total = 0
    for case in _cases(task):
        source = task / "labelsTr" / f"{case}.nii.gz"
        for root in (labels, regions):
            (root / "labelsTr" / source.name).symlink_to(source)
        img = nib.load(str(source))
        label = np.asarray(img.dataobj).astype(np.uint8)
        keep = np.zeros(label.shape, bool)
        keep[::every] = True
        sparse_label = np.where(keep, label, 3).astype(np.uint8)
        annotated, total = annotated + int(keep.sum()), total + keep.size
        nib.save(nib.Nifti1Image(sparse_label, img.affine, img.header), str(sparse / "labelsTr" / source.name))
    print(f"sparse: {annotated / total:.1%} of the voxels annotated (one slice in {every})")
    return [labels, regions, sparse]


if __name__ == "__main__":
    for path in make_variants(Path(sys.argv[1]), Path(sys.argv[2]), *(int(a) for a in sys.argv[3:])):
        print(path)
