"""Patch sampling from preprocessed cases, as nnU-Net v2's data loader does it (nnUNetDataLoader.get_bbox).

The patch box may reach outside the case: by half the augmentation margin (the sampled patch minus the
network's patch) on each side, and, for a case smaller than the patch, far enough for the case to sit anywhere
inside it. A random patch starts uniformly within those bounds; a foreground patch is centred on a voxel of a
class present in the case, clipped only at the lower bound. What lies outside the case is zero (image) and
background (label). Without these shifts a case smaller than the patch would always sit at the same place in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.datasets.labels import ANNOTATED


def pad_to(array: np.ndarray, shape, value: float = 0) -> np.ndarray:
    """Pad the trailing spatial axes of ``array`` symmetrically up to ``shape`` (no-op where already larger)."""
    spatial = array.shape[-len(shape):]
    pads = [max(0, int(s) - a) for s, a in zip(shape, spatial)]
    if not any(pads):
        return array
    width = [(0, 0)] * (array.ndim - len(shape)) + [(p // 2, p - p // 2) for p in pads]
    return np.pad(array, width, mode="constant", constant_values=value)


def patch_bounds(shape, patch, margin) -> tuple[list[int], list[int]]:
    """Lowest and highest start of a patch along each axis (nnU-Net's lbs/ubs): the box may leave the case by
    half of ``margin``, or by what a case smaller than the patch needs."""
    lows, highs = [], []
    for s, p, m in zip(shape, patch, margin):
        need = max(int(m), int(p) - int(s))
        lows.append(-(need // 2))
        highs.append(int(s) + need // 2 + need % 2 - int(p))
    return lows, highs


def patch_start(shape, patch, rng: np.random.Generator, center=None, margin=None) -> list[int]:
    """Start corner of a patch: uniform within ``patch_bounds``, or centred on ``center`` (not below the lowest
    start; above the highest it may go, as nnU-Net's)."""
    lows, highs = patch_bounds(shape, patch, margin if margin is not None else [0] * len(patch))
    if center is None:
        return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs)]
    return [max(lo, int(c) - int(p) // 2) for lo, c, p in zip(lows, center, patch)]


def crop(array: np.ndarray, start, patch, value: float = 0) -> np.ndarray:
    """The box [start, start + patch) of the trailing spatial axes, ``value`` where it lies outside ``array``."""
    lead = array.ndim - len(patch)
    spatial = array.shape[lead:]
    inside = tuple(slice(max(0, a), min(s, a + int(p))) for a, s, p in zip(start, spatial, patch))
    part = np.asarray(array[(slice(None),) * lead + inside])
    pads = [(max(0, -a), max(0, a + int(p) - s)) for a, s, p in zip(start, spatial, patch)]
    if not any(lo or hi for lo, hi in pads):
        return part
    return np.pad(part, [(0, 0)] * lead + pads, mode="constant", constant_values=value)


def _pick_voxel(locs: np.ndarray, rng: np.random.Generator, by_slice: bool):
    if by_slice:
        slices = np.unique(locs[:, 0])
        locs = locs[locs[:, 0] == slices[rng.integers(len(slices))]]
    return locs[rng.integers(len(locs))]


def _foreground_voxel(locations: dict[int, np.ndarray], rng: np.random.Generator, by_slice: bool,
                      groups: list[tuple[int, ...]] | None = None):
    """A voxel of a class present in the case, the class chosen uniformly; for 2D patches a slice holding the
    class is chosen uniformly first (as nnU-Net's 2D loader), then a voxel in it. ``groups``: the classes as
    sets of label values (regions); by default each foreground value of ``locations`` is one."""
    if groups is None:
        groups = [(c,) for c in locations if c != ANNOTATED]
    present = [g for g in groups if any(len(locations.get(v, ())) for v in g)]
    if not present:
        return None
    chosen = present[rng.integers(len(present))]
    locs = np.concatenate([np.asarray(locations[v]) for v in chosen if len(locations.get(v, ()))])
    return _pick_voxel(locs, rng, by_slice)


@dataclass(frozen=True)
class Placement:
    """Where a patch lies in a case: the slice of a 2D patch from a 3D volume (None for a 3D patch) and the start
    corner; ``cut`` takes the same box from any array over the case's grid (image, label, a previous stage's)."""

    patch: tuple[int, ...]
    start: tuple[int, ...]
    z: int | None = None

    def cut(self, array: np.ndarray, value: float = 0) -> np.ndarray:
        if self.z is not None:  # the slice axis is the one before the patch's axes
            array = array[(slice(None),) * (array.ndim - len(self.patch) - 1) + (self.z,)]
        return crop(array, self.start, self.patch, value)


def place_patch(label: np.ndarray, locations: dict[int, np.ndarray], patch, rng: np.random.Generator,
                force_foreground: bool, margin=None, groups: list[tuple[int, ...]] | None = None) -> Placement:
    """Where ``sample_patch`` cuts its patch (the same random draws)."""
    by_slice = len(patch) == label.ndim - 1
    center = _foreground_voxel(locations, rng, by_slice, groups) if force_foreground else None
    if center is None and len(locations.get(ANNOTATED, ())):
        center = _pick_voxel(np.asarray(locations[ANNOTATED]), rng, by_slice)
    z = None
    shape = label.shape
    if by_slice:
        z = int(center[0]) if center is not None else int(rng.integers(label.shape[0]))
        shape = label.shape[1:]
        center = center[1:] if center is not None else None
    start = patch_start(shape, patch, rng, center, margin)
    return Placement(tuple(int(p) for p in patch), tuple(start), z)


def sample_patch(data: np.ndarray, label: np.ndarray, locations: dict[int, np.ndarray], patch,
                 rng: np.random.Generator, force_foreground: bool, margin=None,
                 groups: list[tuple[int, ...]] | None = None):
    """One (image (c, *patch), label (*patch)) patch, placed as ``patch_start`` says. ``margin``: per axis, how
    much larger ``patch`` is than the network's patch (the room augmentation needs; none by default). A 2D patch
    from a 3D volume (the 2d configuration) is taken from one slice along the first axis: one holding the forced
    class, or a random one. ``groups``: the foreground classes as sets of values (regions; default: each value).
    A case with annotated-voxel locations (an ignore label) centres its other patches on an annotated voxel."""
    where = place_patch(label, locations, patch, rng, force_foreground, margin, groups)
    return where.cut(data), where.cut(label)
