"""nnU-Net's augmentation set, batched: geometry conventions, probabilities, and each transform's effect."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from medseg.loading.augmentation import (
    AugmentationSettings,
    _centre_crop,
    _sample_affines,
    augment_batch,
    intensity_transforms,
    nnunet_settings,
    sampling_patch_size,
)

OFF = AugmentationSettings(p_rotation=0, p_scaling=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
                           p_gamma=0, p_gamma_inverted=0, mirror_axes=())


def _labels(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, shape, generator=g)


def test_nnunet_rules_for_rotation_and_in_plane_augmentation():
    assert nnunet_settings([40, 56, 40]).rotation == pytest.approx((-math.pi / 6, math.pi / 6))
    assert not nnunet_settings([40, 56, 40]).in_plane_only
    aniso = nnunet_settings([8, 64, 64])
    assert aniso.in_plane_only and aniso.rotation[1] == pytest.approx(math.pi)
    assert nnunet_settings([56, 40]).rotation[1] == pytest.approx(math.pi)
    assert nnunet_settings([128, 40]).rotation[1] == pytest.approx(math.radians(15))
    assert nnunet_settings([56, 40]).mirror_axes == (0, 1)


def test_sampled_patch_holds_the_rotated_and_zoomed_patch_and_keeps_parity():
    for patch in ([40, 56, 40], [56, 40], [8, 64, 64], [41, 56, 39]):
        s = nnunet_settings(patch)
        size = sampling_patch_size(patch, s)
        assert all((a - p) % 2 == 0 and a >= p for a, p in zip(size, patch))
    size = sampling_patch_size([40, 56, 40], nnunet_settings([40, 56, 40]))
    # the 56-long axis rotated by 30 deg against a 40-long one spans 56 cos30 + 40 sin30 = 68.5, / 0.85 zoom
    assert size[1] >= 68.5 / 0.85 - 1
    assert sampling_patch_size([8, 64, 64], nnunet_settings([8, 64, 64]))[0] == 8  # no room needed across slices


def test_without_any_transform_the_batch_is_the_exact_centre_crop():
    image = torch.randn(3, 2, 20, 24, 22)
    label = _labels((3, 1, 20, 24, 22))
    x, y = augment_batch(image, label, [10, 12, 10], OFF, seed=1)
    assert torch.equal(x, _centre_crop(image, [10, 12, 10])) and torch.equal(y, _centre_crop(label, [10, 12, 10]))


def test_a_zero_angle_rotation_resamples_onto_the_same_grid():
    image = torch.randn(2, 1, 16, 18, 16)
    label = _labels((2, 1, 16, 18, 16))
    s = replace(OFF, p_rotation=1.0, rotation=(0.0, 0.0))
    x, y = augment_batch(image, label, [8, 10, 8], s, seed=3)
    assert torch.allclose(x, _centre_crop(image, [8, 10, 8]), atol=1e-4)
    assert torch.equal(y, _centre_crop(label, [8, 10, 8]))


def test_a_quarter_turn_in_plane_matches_rot90_for_image_and_label():
    image = torch.randn(1, 1, 6, 12, 12)
    label = _labels((1, 1, 6, 12, 12), seed=4)
    s = replace(OFF, spatial_dims=3, in_plane_only=True, p_rotation=1.0, rotation=(math.pi / 2, math.pi / 2))
    x, y = augment_batch(image, label, [6, 12, 12], s, seed=0)
    turned = [torch.rot90(t, k, dims=(3, 4)) for t in (image, label) for k in (1, 3)]
    assert any(torch.allclose(x, t, atol=1e-4) for t in turned[:2])
    assert any(torch.equal(y, t) for t in turned[2:])
    # the in-plane transform never mixes slices: each output slice is a turned input slice
    assert all(torch.equal(y[0, 0, k].unique(), label[0, 0, k].unique()) for k in range(6))


def test_scaling_zooms_image_and_label_together():
    label = torch.zeros(1, 1, 41, 41, 41, dtype=torch.long)
    label[..., 15:26, 15:26, 15:26] = 1
    image = label.float() * 5
    s = replace(OFF, p_scaling=1.0, scaling=(0.7, 0.7))
    x, y = augment_batch(image, label, [41, 41, 41], s, seed=0)
    # coordinates shrink by 0.7: the 11-voxel cube appears 1/0.7 times larger (15.7) along each axis
    side = round(int(y.sum()) ** (1 / 3))
    assert side ** 3 == int(y.sum()) and 15 <= side <= 16
    assert torch.equal(y.bool(), x > 2.5)


def test_rotation_and_scaling_happen_at_nnunet_rates():
    g = torch.Generator().manual_seed(0)
    _, moved = _sample_affines(4000, nnunet_settings([40, 56, 40]), g)
    assert len(moved) / 4000 == pytest.approx(1 - 0.8 * 0.8, abs=0.03)


def test_same_seed_same_batch_other_seed_other_batch():
    image, label = torch.randn(4, 1, 30, 30, 30), _labels((4, 1, 30, 30, 30))
    s = replace(nnunet_settings([20, 20, 20]), p_rotation=0.5, p_noise=0.5, p_gamma=0.5)
    a = augment_batch(image, label, [20, 20, 20], s, seed=7)
    b = augment_batch(image, label, [20, 20, 20], s, seed=7)
    c = augment_batch(image, label, [20, 20, 20], s, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mirroring_flips_image_and_label_together():
    label = _labels((64, 1, 6, 7, 8))
    image = label.float() * 3
    x, y = augment_batch(image, label, [6, 7, 8], replace(OFF, mirror_axes=(0, 1, 2)), seed=0)
    assert torch.equal(x, y.float() * 3)
    flipped = [not torch.equal(y[b], label[b]) for b in range(64)]
    assert 0.75 < np.mean(flipped) < 1.0  # 1 - 0.5^3 of the samples flip along at least one axis


@pytest.mark.parametrize("field, check", [
    ("p_brightness", lambda x, out: torch.allclose(out / x, (out / x).flatten()[0].expand_as(x), atol=1e-4)),
    ("p_contrast", lambda x, out: out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5),
    ("p_gamma", lambda x, out: torch.allclose(out.mean(), x.mean(), atol=1e-4) and
     torch.allclose(out.std(), x.std(), atol=1e-3)),
    ("p_gamma_inverted", lambda x, out: torch.allclose(out.mean(), x.mean(), atol=1e-4)),
    ("p_noise", lambda x, out: 0 < (out - x).var() <= 0.1 + 1e-2),
    ("p_blur", lambda x, out: out.var() < x.var()),
    ("p_lowres", lambda x, out: out.shape == x.shape),
])
def test_each_intensity_transform_changes_the_image_as_specified(field, check):
    x = torch.rand(1, 1, 16, 16, 16) + 0.5
    s = replace(OFF, **{field: 1.0}, p_blur_per_channel=1.0, p_lowres_per_channel=1.0, lowres_scale=(0.5, 0.5))
    changed = False
    for seed in range(5):
        out = intensity_transforms(x.clone(), s, torch.Generator().manual_seed(seed))
        assert check(x, out)
        changed |= not torch.allclose(out, x)
    assert changed


def test_two_dimensional_batches():
    s = nnunet_settings([32, 24])
    size = sampling_patch_size([32, 24], s)
    x, y = augment_batch(torch.randn(5, 2, *size), _labels((5, 1, *size)), [32, 24], s, seed=0)
    assert x.shape == (5, 2, 32, 24) and y.shape == (5, 1, 32, 24) and set(y.unique().tolist()) <= {0, 1, 2}


class _FakeCache:
    """Two preprocessed cases, as PreprocessedCache.load_arrays returns them."""

    def load_arrays(self, case_id, mmap=True):
        g = np.random.default_rng(int(case_id))
        data = g.normal(size=(1, 20, 26, 22)).astype(np.float32)
        label = np.zeros((20, 26, 22), dtype=np.uint8)
        label[8:12, 10:16, 9:13] = 1
        return data, label, {1: np.argwhere(label == 1)}


def test_device_side_augmentation_gets_raw_larger_patches_and_finishes_them_after_transfer():
    from medseg.loading.datamodule import PatchBatches, SegmentationDataModule

    patch = [12, 16, 12]
    s = nnunet_settings(patch)
    deferred = PatchBatches(_FakeCache(), ["1", "2"], patch, 4, 3, 0.5, s, augment_in_loader=False)
    item = deferred[0]
    assert isinstance(item, dict) and list(item["image"].shape[2:]) == sampling_patch_size(patch, s)
    assert item["label"].dtype == torch.uint8
    dm = SegmentationDataModule.__new__(SegmentationDataModule)
    dm.train_set = deferred
    image, label = dm.on_after_batch_transfer(item, 0)
    assert image.shape == (4, 1, *patch) and label.shape == (4, 1, *patch) and label.dtype == torch.long
    # the oversampled half of the batch is centred on foreground, which rotation and zoom keep in the patch
    assert all(label[b].any() for b in (2, 3))
    in_loader = PatchBatches(_FakeCache(), ["1", "2"], patch, 4, 3, 0.5, s)
    image, label = in_loader[0]
    assert image.shape == (4, 1, *patch) and label.dtype == torch.long
