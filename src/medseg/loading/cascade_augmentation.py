"""nnU-Net's augmentation of a cascade's previous-stage channels (nnUNetTrainer.get_training_transforms with
is_cascaded=True, batchgeneratorsv2), applied per sample once the previous stage's label map has become one-hot
image channels (after the spatial transforms and mirroring, which move it as a segmentation):

* ApplyRandomBinaryOperatorTransform, p 0.4: each foreground channel, in random order, with p 0.5: a binary
  dilation, erosion, opening or closing by a ball of radius uniform in [1, 8] voxels; voxels a channel gains
  are cleared in the others, so the channels stay one-hot;
* RemoveRandomConnectedComponentFromOneHotEncodingTransform, p 0.2 (fill_with_other_class_p 0,
  dont_do_if_covers_more_than_x_percent 0.15): each channel, in random order, with p 0.5: one random connected
  component (full connectivity) smaller than 15% of the patch is removed.

They run on the host (scipy) in the loader workers, as nnU-Net's do: connected components have no torch operator,
and which component goes depends on the data, which device-side augmentation never reads back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


@dataclass(frozen=True)
class CascadeAugmentationSettings:
    p_binary_operator: float = 0.4
    strel_radius: tuple[float, float] = (1.0, 8.0)  # voxels, uniform (nnU-Net's strel_size)
    p_per_label: float = 0.5
    p_remove_component: float = 0.2
    max_component_fraction: float = 0.15  # of the patch's voxels: larger components are never removed


def ball(radius: float, dims: int = 3) -> np.ndarray:
    """The voxels within ``radius`` of the centre: an odd-sized, centred structuring element. (skimage's ball, which
    nnU-Net calls with the drawn float radius, spaces its grid over an even number of points for non-integer radii,
    shifting the mask by half a voxel; the set of offsets within the radius has no such shift.)"""
    r = int(np.floor(radius))
    grid = np.mgrid[(slice(-r, r + 1),) * dims]
    return (grid ** 2).sum(0) <= radius * radius


# Morphology by a ball through the Euclidean distance transform: a voxel is within ``radius`` of the mask exactly
# when the dilation by ``ball(radius)`` reaches it, so the result is scipy's binary_dilation / binary_erosion with
# that ball, in time linear in the voxels instead of voxels x ball (6 s for radius 8 on a 80x160x160 patch, against
# 0.3 s). Border as nnU-Net's FFT convolution pads: nothing beyond the patch is foreground for a dilation, nothing
# beyond it is background for an erosion (scipy's border_value 0 and 1).

def dilation(mask: np.ndarray, radius: float) -> np.ndarray:
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def erosion(mask: np.ndarray, radius: float) -> np.ndarray:
    if mask.all():
        return mask.copy()
    return ndimage.distance_transform_edt(mask) > radius


def opening(mask: np.ndarray, radius: float) -> np.ndarray:
    return dilation(erosion(mask, radius), radius)


def closing(mask: np.ndarray, radius: float) -> np.ndarray:
    return erosion(dilation(mask, radius), radius)


OPERATORS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "dilation": dilation, "erosion": erosion, "closing": closing, "opening": opening}


def apply_binary_operator(channels: np.ndarray, index: int, operator: str, radius: float) -> None:
    """In place on (K, *patch) bool one-hot channels: channel ``index`` through ``operator``; what it gains is
    taken from the other channels."""
    before = channels[index]
    after = OPERATORS[operator](before, radius)
    gained = after & ~before
    others = [k for k in range(len(channels)) if k != index]
    if others and gained.any():
        channels[others] &= ~gained
    channels[index] = after


def remove_random_component(mask: np.ndarray, rng: np.random.Generator, max_fraction: float) -> np.ndarray:
    """``mask`` without one of its connected components (full connectivity) covering less than ``max_fraction`` of
    the patch, chosen uniformly; unchanged when there is none."""
    if not mask.any():
        return mask
    labelled, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(labelled.ravel())[1:]
    small = np.flatnonzero(sizes < mask.size * max_fraction) + 1
    if not len(small):
        return mask
    return mask & (labelled != small[rng.integers(len(small))])


def _chosen_channels(k: int, p: float, rng: np.random.Generator) -> list[int]:
    order = rng.permutation(k)  # nnU-Net shuffles the channels, then picks each with p
    return [int(c) for c in order[rng.random(k) < p]]


def augment_sample(channels: np.ndarray, s: CascadeAugmentationSettings, rng: np.random.Generator) -> np.ndarray:
    """(K, *patch) bool one-hot channels of one sample, augmented as drawn from ``rng``."""
    if rng.random() < s.p_binary_operator:
        for c in _chosen_channels(len(channels), s.p_per_label, rng):
            operator = list(OPERATORS)[rng.integers(len(OPERATORS))]
            apply_binary_operator(channels, c, operator, float(rng.uniform(*s.strel_radius)))
    if rng.random() < s.p_remove_component:
        for c in _chosen_channels(len(channels), s.p_per_label, rng):
            channels[c] = remove_random_component(channels[c], rng, s.max_component_fraction)
    return channels


def augment_previous_stage(image: torch.Tensor, num_channels: int, s: CascadeAugmentationSettings,
                           rng: np.random.Generator) -> torch.Tensor:
    """(B, C, *patch) host batch whose last ``num_channels`` channels are the one-hot previous stage: those
    augmented per sample (the image channels are left as they are)."""
    if num_channels == 0:
        return image
    out = image.clone()
    for b in range(image.shape[0]):
        channels = image[b, -num_channels:].numpy() > 0.5
        out[b, -num_channels:] = torch.from_numpy(augment_sample(channels, s, rng)).to(image.dtype)
    return out
