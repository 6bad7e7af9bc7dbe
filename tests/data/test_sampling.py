import numpy as np

from medseg.data.sampling import sample_patch
from medseg.preprocessing.pipeline import class_locations


def _volume():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1, 12, 30, 20)).astype(np.float32)
    label = np.zeros((12, 30, 20), np.int8)
    label[7, 20:24, 3:6] = 2  # a small structure in one slice, near a border
    return data, label, class_locations(label, [1, 2])


def test_forced_foreground_3d_patch_contains_the_structure_and_small_volumes_are_padded():
    data, label, locs = _volume()
    rng = np.random.default_rng(1)
    for _ in range(20):
        x, y = sample_patch(data, label, locs, [16, 16, 16], rng, force_foreground=True)
        assert x.shape == (1, 16, 16, 16) and y.shape == (16, 16, 16)
        assert (y == 2).any()
    x, _ = sample_patch(data, label, locs, [16, 40, 24], rng, force_foreground=False)  # larger than the volume
    assert x.shape == (1, 16, 40, 24)


def test_2d_patches_come_from_one_slice_and_forced_ones_from_the_labelled_slice():
    data, label, locs = _volume()
    rng = np.random.default_rng(2)
    for _ in range(20):
        x, y = sample_patch(data, label, locs, [16, 16], rng, force_foreground=True)
        assert x.shape == (1, 16, 16) and (y == 2).sum() == 12
    random = [sample_patch(data, label, locs, [16, 16], rng, force_foreground=False)[1].any() for _ in range(40)]
    assert 0 < sum(random) < 40  # random slices: most miss the one labelled slice
