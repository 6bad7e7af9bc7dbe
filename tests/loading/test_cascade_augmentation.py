"""The cascade's previous-stage channels in the loader: one-hot per foreground label, moved with the image by the
spatial transforms and mirroring, and nnU-Net's two cascade augmentations, each checked against what it must do."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.morphology import ball as skimage_ball

from medseg.loading.augmentation import AugmentationSettings, augment_batch
from medseg.loading.cascade_augmentation import (CascadeAugmentationSettings, apply_binary_operator, augment_sample,
                                                 ball, closing, dilation, erosion, opening, remove_random_component)
from medseg.loading.previous_stage import move_previous_to_image


def _blobs(seed: int, shape=(20, 22, 18)) -> np.ndarray:
    """A mask with several blobs, one cut by the patch border, and a hole."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    mask = np.zeros(shape, bool)
    for centre, r in [((0, 5, 5), 4.5), ((10, 11, 9), 5.0), ((16, 18, 14), 2.0)]:
        mask |= np.linalg.norm(grid - np.asarray(centre) - rng.uniform(-0.5, 0.5, 3), axis=-1) <= r
    mask[10, 11, 9] = False
    return mask


@pytest.mark.parametrize("radius", [1.0, 2.5, 3.0, 5.7])
def test_binary_operators_are_scipys_with_a_ball(radius):
    mask = _blobs(int(radius * 10))
    b = ball(radius)
    # dilation as scipy's (nothing beyond the patch is foreground), erosion with the patch's outside counting as
    # foreground (nnU-Net's FFT convolution pads the complement with zeros: the patch border does not erode)
    assert np.array_equal(dilation(mask, radius), ndimage.binary_dilation(mask, b))
    assert np.array_equal(erosion(mask, radius), ndimage.binary_erosion(mask, b, border_value=1))
    assert np.array_equal(opening(mask, radius),
                          ndimage.binary_dilation(ndimage.binary_erosion(mask, b, border_value=1), b))
    assert np.array_equal(closing(mask, radius),
                          ndimage.binary_erosion(ndimage.binary_dilation(mask, b), b, border_value=1))
    assert dilation(mask, radius).sum() > mask.sum() > erosion(mask, radius).sum()


def test_ball_is_skimages_for_whole_radii_and_centred_otherwise():
    for r in (1, 2, 3, 8):
        assert np.array_equal(ball(r), skimage_ball(r).astype(bool))
    b = ball(2.5)
    assert b.shape == (5, 5, 5) and np.array_equal(b, b[::-1, ::-1, ::-1])
    assert b.sum() == sum(1 for v in np.ndindex(5, 5, 5) if sum((np.array(v) - 2) ** 2) <= 6.25)


def test_operators_leave_empty_and_full_masks_alone():
    empty, full = np.zeros((6, 6, 6), bool), np.ones((6, 6, 6), bool)
    assert not dilation(empty, 3).any() and not erosion(empty, 3).any()
    assert dilation(full, 3).all() and erosion(full, 3).all()


def test_a_dilated_channel_takes_its_gain_from_the_other_channels():
    seg = np.zeros((12, 12, 12), np.int64)
    seg[2:6, 2:6, 2:6] = 1
    seg[6:10, 2:6, 2:6] = 2  # touches label 1
    channels = np.stack([seg == 1, seg == 2])
    apply_binary_operator(channels, 0, "dilation", 2.0)
    grown = ndimage.binary_dilation(seg == 1, ball(2.0))
    assert np.array_equal(channels[0], grown)
    assert np.array_equal(channels[1], (seg == 2) & ~grown)
    assert not (channels[0] & channels[1]).any()  # still one-hot


def test_erosion_gives_nothing_to_the_other_channels():
    seg = np.zeros((12, 12, 12), np.int64)
    seg[2:9, 2:9, 2:9] = 1
    seg[9:11, 2:9, 2:9] = 2
    channels = np.stack([seg == 1, seg == 2])
    apply_binary_operator(channels, 0, "erosion", 1.0)
    assert np.array_equal(channels[0], ndimage.binary_erosion(seg == 1, ball(1.0), border_value=1))
    assert np.array_equal(channels[1], seg == 2)


def test_only_components_covering_less_than_15_percent_are_removed():
    shape = (20, 20, 20)  # 8000 voxels: 15% is 1200
    big = np.zeros(shape, bool)
    big[:12, :12, :12] = True  # 1728 voxels: 21.6%
    small = np.zeros(shape, bool)
    small[15:18, 15:18, 15:18] = True  # 27 voxels
    diagonal = np.zeros(shape, bool)
    diagonal[2, 16, 16] = diagonal[3, 17, 17] = True  # touch at a corner: one component (full connectivity)
    rng = np.random.default_rng(0)
    mask = big | small | diagonal
    for _ in range(10):
        out = remove_random_component(mask, rng, 0.15)
        assert np.array_equal(out, big | small) or np.array_equal(out, big | diagonal)
    assert np.array_equal(remove_random_component(big, rng, 0.15), big)  # the only one is too large
    exactly = np.zeros(shape, bool)
    exactly.reshape(-1)[:1200] = True  # exactly 15%: kept (nnU-Net removes only those below)
    assert np.array_equal(remove_random_component(exactly, rng, 0.15), exactly)
    assert not remove_random_component(small, rng, 0.15).any()


def test_augment_sample_draws_each_transform_with_its_probability():
    seg = np.zeros((16, 16, 16), np.int64)
    seg[2:12, 2:12, 2:12] = 1  # 1000 of 4096 voxels: 24%, never removed
    seg[12:14, 12:14, 12:14] = 2  # 8 voxels
    onehot = np.stack([seg == 1, seg == 2])
    never = CascadeAugmentationSettings(p_binary_operator=0, p_remove_component=0)
    for seed in range(5):
        assert np.array_equal(augment_sample(onehot.copy(), never, np.random.default_rng(seed)), onehot)
    removal = dataclasses.replace(never, p_remove_component=1, p_per_label=1)
    out = augment_sample(onehot.copy(), removal, np.random.default_rng(0))
    assert np.array_equal(out[0], onehot[0]) and not out[1].any()
    morphology = dataclasses.replace(never, p_binary_operator=1, p_per_label=1)
    changed = [not np.array_equal(augment_sample(onehot.copy(), morphology, np.random.default_rng(s)), onehot)
               for s in range(5)]
    assert all(changed)
    # half of the labels on average: over many draws each label is sometimes left alone, sometimes changed
    half = dataclasses.replace(morphology, p_per_label=0.5)
    touched = [[not np.array_equal(a, b) for a, b in zip(augment_sample(onehot.copy(), half,
                                                                         np.random.default_rng(s)), onehot)]
               for s in range(40)]
    rate = np.mean(touched, axis=0)
    assert all(0.2 < r < 0.8 for r in rate), rate


def test_a_component_below_the_limit_is_removed_when_drawn():
    seg = np.zeros((16, 16, 16), np.int64)
    seg[3:8, 3:8, 3:8] = 1  # 125 voxels: 3%
    onehot = np.stack([seg == 1])
    s = CascadeAugmentationSettings(p_binary_operator=0, p_remove_component=1, p_per_label=1)
    assert not augment_sample(onehot.copy(), s, np.random.default_rng(0)).any()


def test_previous_stage_becomes_one_hot_image_channels_for_the_foreground_labels():
    image = torch.randn(2, 1, 3, 4, 5)
    label = torch.zeros(2, 2, 3, 4, 5, dtype=torch.uint8)
    label[:, 0, 0] = 1
    label[0, 1, 1] = 2
    label[1, 1, 2] = 1
    label[1, 1, 0, 0, 0] = 3  # a value that is not a foreground label: all zero
    out, target = move_previous_to_image(image, label, [1, 2])
    assert out.shape == (2, 3, 3, 4, 5) and target.shape == (2, 1, 3, 4, 5)
    assert torch.equal(out[:, :1], image) and torch.equal(target, label[:, :1])
    assert torch.equal(out[:, 1], (label[:, 1] == 1).float()) and torch.equal(out[:, 2], (label[:, 1] == 2).float())
    assert out[1, 1:, 0, 0, 0].sum() == 0


def test_spatial_transforms_move_the_previous_stage_as_a_label_with_the_image():
    rng = np.random.default_rng(3)
    seg = torch.from_numpy(rng.integers(0, 3, (4, 1, 22, 22, 22)).astype(np.uint8))
    label = torch.cat([seg, seg], dim=1)  # the previous stage equal to the reference
    off = dict(p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0, p_gamma=0, p_gamma_inverted=0)
    rotate = AugmentationSettings(p_rotation=1.0, p_scaling=1.0, **off)
    _, out = augment_batch(seg.float(), label, [16, 16, 16], rotate, seed=5, num_classes=3)
    assert out.shape == (4, 2, 16, 16, 16) and torch.equal(out[:, 0], out[:, 1])  # the same resampling
    mirror = AugmentationSettings(p_rotation=0, p_scaling=0, **off)
    image, out = augment_batch(seg.float(), label, [16, 16, 16], mirror, seed=5, num_classes=3)
    assert torch.equal(image[:, 0].round().to(torch.uint8), out[:, 1])  # flipped with the image
