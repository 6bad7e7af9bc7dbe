"""Crop to the bounding box of nonzero voxels (nnU-Net's first preprocessing step)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled (so dark structures inside the body count)."""
    mask = np.any(image != 0, axis=0)
    return binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    if not mask.any():
        return [(0, s) for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box


def crop(array: np.ndarray, box: list[tuple[int, int]]) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` to ``box``."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[lead + tuple(slice(a, b) for a, b in box)]


def crop_to_nonzero(image: np.ndarray, label: np.ndarray | None = None):
    """Return (image, label, mask, box) cropped to the nonzero box; mask is the cropped nonzero mask."""
    mask = nonzero_mask(image)
    box = bounding_box(mask)
    return crop(image, box), (crop(label, box) if label is not None else None), crop(mask, box), box
