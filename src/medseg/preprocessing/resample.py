"""Resampling between spacings: images with cubic splines, labels linearly on one-hot maps (nnU-Net's
orders); logits at prediction time with torch (fast, and one map per class anyway)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import zoom


def resampled_shape(shape, spacing, target_spacing) -> tuple[int, ...]:
    return tuple(max(1, int(round(s * sp / tsp))) for s, sp, tsp in zip(shape, spacing, target_spacing))


def _zoom_to(x: np.ndarray, new_shape, order: int) -> np.ndarray:
    factors = [n / s for n, s in zip(new_shape, x.shape)]
    out = zoom(x, factors, order=order, mode="nearest", grid_mode=True)
    assert out.shape == tuple(new_shape), (out.shape, new_shape)
    return out


def resample_image(image: np.ndarray, new_shape) -> np.ndarray:
    """(c, *spatial) float image to ``new_shape``."""
    if tuple(image.shape[1:]) == tuple(new_shape):
        return image
    return np.stack([_zoom_to(c, new_shape, order=3) for c in image]).astype(np.float32)


def resample_label(label: np.ndarray, new_shape, classes: list[int]) -> np.ndarray:
    """Integer label map to ``new_shape``: each class's mask linearly, then the most likely class."""
    if tuple(label.shape) == tuple(new_shape):
        return label
    scores = np.stack([_zoom_to((label == c).astype(np.float32), new_shape, order=1) for c in classes])
    return np.asarray(classes, dtype=label.dtype)[np.argmax(scores, axis=0)]


def resample_logits(logits: torch.Tensor, new_shape) -> torch.Tensor:
    """(c, *spatial) logits to ``new_shape`` with (tri)linear interpolation."""
    if tuple(logits.shape[1:]) == tuple(new_shape):
        return logits
    mode = "trilinear" if logits.ndim == 4 else "bilinear"
    return F.interpolate(logits[None].float(), size=tuple(new_shape), mode=mode, align_corners=False)[0]
