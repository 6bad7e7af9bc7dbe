"""A 2D version of MSD Task04 Hippocampus for the 2D-picture benchmark (benchmarks/hippocampus_2d.sh).

Usage: python benchmarks/hippocampus_2d.py <Task04 folder> <raw folder>

No 2D segmentation dataset with labels can be had offline here (public packages download theirs), so each
Hippocampus volume gives one picture: the slice (along the volume's last axis) with the most hippocampus, its
intensities scaled to 8 bits as a camera or a PNG export would (clipped at the case's 0.5th and 99.5th
percentiles). The same pixels are written twice:
* Dataset007_HippocampusPNG:   8-bit grey PNG images and PNG label maps (nnU-Net's natural-image format);
* Dataset008_HippocampusSlice: one-slice NIfTI volumes (2D data stored as 3D NIfTI) with the volume's spacing,
so the two runs differ only in the file format and its reader.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def _cases(task: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (task / "imagesTr").glob("*.nii.gz")
                  if not p.name.startswith((".", "_")))


def picture(task: Path, case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The case's most-labelled slice: 8-bit image, label map, and the slice's in-plane spacing."""
    image = nib.load(str(task / "imagesTr" / f"{case}.nii.gz"))
    label = np.asarray(nib.load(str(task / "labelsTr" / f"{case}.nii.gz")).dataobj).astype(np.uint8)
    k = int(np.argmax((label > 0).sum(axis=(0, 1))))
    data = np.asarray(image.dataobj, dtype=np.float32)[:, :, k]
    lo, hi = np.percentile(data, [0.5, 99.5])
    grey = np.round(np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:2])
    return grey, label[:, :, k], spacing  # type: ignore[return-value]


def _dataset_json(root: Path, n: int, ending: str) -> None:
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": LABELS,
                                                   "numTraining": n, "file_ending": ending}, indent=1))


def make(task: Path, raw: Path) -> list[Path]:
    cases = _cases(task)
    png, nifti = raw / "Dataset007_HippocampusPNG", raw / "Dataset008_HippocampusSlice"
    for root in (png, nifti):
        for sub in ("imagesTr", "labelsTr"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    for case in cases:
        grey, label, spacing = picture(task, case)
        # PNG: rows x columns as SimpleITK writes a 2D array
        sitk.WriteImage(sitk.GetImageFromArray(grey), str(png / "imagesTr" / f"{case}_0000.png"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(png / "labelsTr" / f"{case}.png"))
        # one-slice NIfTI of the same pixels, in the same row/column order
        for array, path in ((grey, nifti / "imagesTr" / f"{case}_0000.nii.gz"),
                            (label, nifti / "labelsTr" / f"{case}.nii.gz")):
            img = sitk.GetImageFromArray(array[None])
            img.SetSpacing((spacing[1], spacing[0], 1.0))
            sitk.WriteImage(img, str(path))
    _dataset_json(png, len(cases), ".png")
    _dataset_json(nifti, len(cases), ".nii.gz")
    return [png, nifti]


if __name__ == "__main__":
    for path in make(Path(sys.argv[1]).resolve(), Path(sys.argv[2])):
        print(path)
