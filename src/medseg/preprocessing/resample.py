"""Resampling between spacings, with nnU-Net's orders: images cubic, labels linear on one-hot maps, and for
anisotropic data (spacing ratio > 3) in-plane only, nearest neighbour along the coarse axis, so thick slices
are not blurred into each other. Prediction resamples logits with torch (fast; one map per class anyway)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import zoom

ANISOTROPY_RATIO = 3.0


def new_shape(shape, spacing, target_spacing) -> list[int]:
    """nnU-Net's rounding: round(old_spacing / new_spacing * old_shape), half to even; at least one voxel (a
    structure thinner than half a target voxel would otherwise vanish, leaving an empty array)."""
    return [max(1, int(round(float(sp / t * s)))) for s, sp, t in zip(shape, spacing, target_spacing)]


def separate_axis(spacing, target_spacing) -> int | None:
    """The coarse axis resampled on its own, or None: decided on the current spacing, else on the target."""
    for sp in (np.asarray(spacing, float), np.asarray(target_spacing, float)):
        if sp.max() / sp.min() > ANISOTROPY_RATIO:
            coarse = np.flatnonzero(sp == sp.max())
            return int(coarse[0]) if len(coarse) == 1 else None
    return None


def _zoom_to(x: np.ndarray, shape, order: int) -> np.ndarray:
    if tuple(x.shape) == tuple(shape):
        return x
    out = zoom(x, [n / s for n, s in zip(shape, x.shape)], order=order, mode="nearest", grid_mode=True)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def _nearest_along(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Nearest-neighbour resize of one axis (pixel centres aligned, as align_corners=False)."""
    old = x.shape[axis]
    if old == size:
        return x
    idx = np.clip(np.round((np.arange(size) + 0.5) * old / size - 0.5), 0, old - 1).astype(int)
    return np.take(x, idx, axis=axis)


def _resample_3d(x: np.ndarray, shape, axis: int | None, order: int) -> np.ndarray:
    """One spatial volume to ``shape``; with ``axis``, per-slice in-plane then nearest along ``axis``."""
    if axis is None:
        return _zoom_to(x, shape, order)
    in_plane = [s for a, s in enumerate(shape) if a != axis]
    slices = [_zoom_to(np.take(x, i, axis=axis), in_plane, order) for i in range(x.shape[axis])]
    return _nearest_along(np.stack(slices, axis=axis), axis, shape[axis])


def resample_image(image: np.ndarray, shape, spacing, target_spacing) -> np.ndarray:
    """(c, *spatial) float image to ``shape``."""
    if tuple(image.shape[1:]) == tuple(shape):
        return image
    axis = separate_axis(spacing, target_spacing)
    return np.stack([_resample_3d(c.astype(np.float32), shape, axis, 3) for c in image]).astype(np.float32)


def resample_label(label: np.ndarray, shape, spacing, target_spacing, classes: list[int]) -> np.ndarray:
    """Integer label map to ``shape``: each class's mask linearly, then the most likely class per voxel."""
    if tuple(label.shape) == tuple(shape):
        return label
    axis = separate_axis(spacing, target_spacing)
    scores = np.stack([_resample_3d((label == c).astype(np.float32), shape, axis, 1) for c in classes])
    return np.asarray(classes, dtype=label.dtype)[np.argmax(scores, axis=0)]


def resample_logits(logits: torch.Tensor, shape) -> torch.Tensor:
    """(c, *spatial) logits to ``shape`` with (tri)linear interpolation."""
    if tuple(logits.shape[1:]) == tuple(shape):
        return logits
    mode = "trilinear" if logits.ndim == 4 else "bilinear"
    return F.interpolate(logits[None].float(), size=tuple(shape), mode=mode, align_corners=False)[0]


