"""Patch sampling from preprocessed cases, with nnU-Net's foreground oversampling."""

from __future__ import annotations

import numpy as np


def pad_to(array: np.ndarray, shape, value: float = 0) -> np.ndarray:
    """Pad the trailing spatial axes of ``array`` symmetrically up to ``shape`` (no-op where already larger)."""
    spatial = array.shape[-len(shape):]
    pads = [max(0, int(s) - a) for s, a in zip(shape, spatial)]
    if not any(pads):
        return array
    width = [(0, 0)] * (array.ndim - len(shape)) + [(p // 2, p - p // 2) for p in pads]
    return np.pad(array, width, mode="constant", constant_values=value)


def patch_start(shape, patch, rng: np.random.Generator, center=None) -> list[int]:
    """Start corner of a patch inside ``shape`` (already >= patch), random or centred on a voxel."""
    start = []
    for axis, (s, p) in enumerate(zip(shape, patch)):
        high = s - p
        if center is None:
            start.append(int(rng.integers(0, high + 1)))
        else:
            start.append(int(np.clip(center[axis] - p // 2, 0, high)))
    return start


def sample_patch(data: np.ndarray, label: np.ndarray, locations: dict[int, np.ndarray], patch,
                 rng: np.random.Generator, force_foreground: bool):
    """One (image (c, *patch), label (*patch)) patch. Forced foreground: a class present in the case, chosen
    uniformly, and a voxel of it as the patch centre; otherwise a uniformly random position. A 2D patch from a
    3D volume (the 2d configuration) is taken from one slice along the first axis: the foreground voxel's
    slice, or a random one."""
    center = None
    if force_foreground:
        present = [c for c, locs in locations.items() if len(locs)]
        if present:
            locs = locations[present[rng.integers(len(present))]]
            center = np.asarray(locs[rng.integers(len(locs))])
    if len(patch) == label.ndim - 1:
        z = int(center[0]) if center is not None else int(rng.integers(label.shape[0]))
        data, label = data[:, z], label[z]
        center = center[1:] if center is not None else None
    spatial = data.shape[1:]
    offset = np.asarray([max(0, int(p) - s) // 2 for p, s in zip(patch, spatial)])
    data = pad_to(data, patch)
    label = pad_to(label, patch)
    start = patch_start(data.shape[1:], patch, rng, None if center is None else center + offset)
    region = tuple(slice(a, a + int(p)) for a, p in zip(start, patch))
    return np.asarray(data[(slice(None),) + region]), np.asarray(label[region])
