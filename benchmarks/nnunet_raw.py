"""nnU-Net raw layout of an MSD task, for the benchmarks that run nnunetv2 beside medseg.

Usage: python benchmarks/nnunet_raw.py <MSD task folder> <raw folder> [Dataset004_Hippocampus]

Writes <raw folder>/<dataset>/{imagesTr,labelsTr,dataset.json}: the images as symlinks named <case>_0000.nii.gz
(nnU-Net's channel suffix), the labels as symlinks, and a v2 dataset.json. The task folder is never written.
Hidden files (macOS "._" forks shipped in some MSD archives) are skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def make_raw(task: Path, raw: Path, name: str = "Dataset004_Hippocampus") -> Path:
    task = task.resolve()
    dataset = raw / name
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True, exist_ok=True)
    for image in sorted((task / "imagesTr").glob("*.nii.gz")):
        if image.name.startswith((".", "_")):
            continue
        case = image.name[: -len(".nii.gz")]
        (dataset / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(image)
        (dataset / "labelsTr" / image.name).symlink_to(task / "labelsTr" / image.name)
    msd = json.loads((task / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": msd["modality"], "labels": {v: int(k) for k, v in msd["labels"].items()},
        "numTraining": len(list((dataset / "imagesTr").iterdir())), "file_ending": ".nii.gz"}))
    return dataset


if __name__ == "__main__":
    print(make_raw(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]))
