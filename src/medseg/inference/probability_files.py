"""Class probabilities on disk: the validation's compact per-case files that selection ensembles from, and the
full files ``medseg-predict save_probabilities=true`` writes.

A validation file (``validation/<case>_probabilities.npz``) holds float16 probabilities on the case's own grid,
cropped to the box outside which every voxel is exactly background (softmax: background 1, others 0; regions:
every sigmoid 0). Prediction puts exactly that outside the planning crop, so the crop is lossless, and on a
typical scan with a small foreground the box is a small part of the file. ``read_probabilities`` restores the
full array from either kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_path
from medseg.errors import MedsegError
from medseg.inference.postprocessing import bounding_box

SUFFIX = "_probabilities.npz"


def probability_file(folder: Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}{SUFFIX}"


def background(num_channels: int, has_regions: bool) -> np.ndarray:
    """The probability vector of a voxel that is certainly background."""
    vector = np.zeros(num_channels, dtype=np.float16)
    if not has_regions:
        vector[0] = 1
    return vector


def write_probabilities(path: str | Path, probabilities: np.ndarray, labels: np.ndarray) -> None:
    """The full (classes, z, y, x) float16 array and each channel's label value; atomic (temp + rename)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, probabilities=probabilities, labels=labels)


def write_compact_probabilities(path: str | Path, probabilities: np.ndarray, labels: np.ndarray,
                                has_regions: bool) -> None:
    """As write_probabilities, cropped to the box outside which every voxel is exactly background."""
    probabilities = np.asarray(probabilities, dtype=np.float16)
    bg = background(probabilities.shape[0], has_regions).reshape(-1, *([1] * (probabilities.ndim - 1)))
    box = bounding_box(np.any(probabilities != bg, axis=0))
    if box is None:  # all background: an empty box
        box = tuple(slice(0, 0) for _ in probabilities.shape[1:])
    start = np.array([s.start for s in box], dtype=np.int64)
    stop = np.array([s.stop for s in box], dtype=np.int64)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, probabilities=probabilities[(slice(None),) + tuple(box)], labels=labels,
                            shape=np.array(probabilities.shape[1:], dtype=np.int64), box_start=start, box_stop=stop,
                            regions=np.array(has_regions))


@dataclass
class Probabilities:
    values: np.ndarray  # float16 (classes, z, y, x) on the case's grid
    labels: np.ndarray  # the label value of each channel


def read_probabilities(path: str | Path) -> Probabilities:
    """Either kind of file, as the full array; MedsegError naming the file when it is not one."""
    path = Path(path)
    try:
        with np.load(path) as data:
            values, labels = data["probabilities"], data["labels"]
            if "box_start" not in data:
                return Probabilities(values, labels)
            shape = tuple(int(s) for s in data["shape"])
            start, stop = data["box_start"], data["box_stop"]
            has_regions = bool(data["regions"])
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise MedsegError(f"{path}: not a medseg probability file ({e})") from e
    full = np.empty((values.shape[0], *shape), dtype=np.float16)
    full[...] = background(values.shape[0], has_regions).reshape(-1, *([1] * len(shape)))
    full[tuple([slice(None), *(slice(int(a), int(b)) for a, b in zip(start, stop))])] = values
    return Probabilities(full, labels)
