import numpy as np

from medseg.loading.sampling import sample_patch
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


def test_patch_bounds_follow_nnunet_get_bbox():
    from medseg.loading.sampling import patch_bounds

    # a large case: the box may leave it by half the augmentation margin on each side
    assert patch_bounds([100, 80], [60, 50], [20, 10]) == ([-10, -5], [50, 35])
    # a case smaller than the (sampled) patch: the box is exactly as large as needed, so random patches sit still
    assert patch_bounds([36, 50], [74, 80], [34, 24]) == ([-19, -15], [-19, -15])
    assert patch_bounds([35, 50], [40, 56], [0, 0]) == ([-2, -3], [-2, -3])  # odd room: the extra voxel after


def test_random_patches_reach_half_the_margin_beyond_the_border_uniformly():
    from medseg.loading.sampling import patch_start

    rng = np.random.default_rng(0)
    starts = np.array([patch_start([100], [60], rng, margin=[20]) for _ in range(4000)])[:, 0]
    assert starts.min() == -10 and starts.max() == 50
    counts = np.bincount(starts + 10)
    assert counts.min() > 0.5 * counts.mean()  # every start in [-10, 50] is drawn, none favoured


def test_forced_patches_centre_the_voxel_and_shift_a_small_case_inside_the_patch():
    rng = np.random.default_rng(3)
    data = np.ones((1, 10, 12, 8), np.float32)
    label = np.zeros((10, 12, 8), np.uint8)
    label[2:8, 3:9, 2:6] = 1
    locs = {1: np.argwhere(label == 1)}
    offsets = []
    for _ in range(200):
        x, y = sample_patch(data, label, locs, [16, 16, 16], rng, force_foreground=True)
        assert y[8, 8, 8] == 1  # centred on a foreground voxel (or as near as the lower bound allows)
        offsets.append(np.argwhere(x[0] > 0).min(0))  # where the case's corner landed
        assert x.sum() == data.sum() and (y == 1).sum() == (label == 1).sum()  # the whole case, zero-padded
    offsets = np.array(offsets)
    # centred on voxels 2-7 / 3-8 / 2-5 with lower bounds -3 / -2 / -4: the case lands at 3 / 3 / 2 places
    assert [len(np.unique(offsets[:, a])) for a in range(3)] == [3, 3, 2]
    # random patches of a small case all hold it at one place (nnU-Net's bounds leave no room)
    random = {tuple(np.argwhere(sample_patch(data, label, locs, [16, 16, 16], rng, False)[0][0] > 0)[0])
              for _ in range(20)}
    assert random == {(3, 2, 4)}  # (16 - 10) / 2, (16 - 12) / 2, (16 - 8) / 2


def test_2d_forced_patches_choose_the_slice_uniformly_not_by_voxel_count():
    data = np.zeros((1, 6, 20, 20), np.float32)
    label = np.zeros((6, 20, 20), np.uint8)
    label[1, 10, 10] = 1  # one voxel in slice 1
    label[4, 2:12, 2:12] = 1  # a hundred in slice 4
    for z in range(6):
        data[0, z] = z
    locs = {1: np.argwhere(label == 1)}
    rng = np.random.default_rng(0)
    slices = [int(sample_patch(data, label, locs, [8, 8], rng, True)[0].max()) for _ in range(400)]
    share = slices.count(1) / len(slices)
    assert set(slices) == {1, 4} and 0.4 < share < 0.6


def test_with_an_ignore_label_every_patch_is_centred_on_an_annotated_voxel():
    """Sparse annotation: one annotated slice in a volume of ignore (3). Patches that need no foreground are
    centred on an annotated voxel (nnU-Net's loader), so each holds annotated voxels; forced ones hold the class."""
    from medseg.datasets.labels import ANNOTATED

    data = np.zeros((1, 40, 40, 40), np.float32)
    label = np.full((40, 40, 40), 3, np.int8)
    label[30] = 0
    label[30, 5:8, 30:34] = 1
    locations = {**class_locations(label, [1, 2]), **class_locations(label != 3, [True], key=ANNOTATED)}
    assert set(locations) == {1, 2, ANNOTATED} and len(locations[2]) == 0
    rng = np.random.default_rng(0)
    for force in (False, True):
        for _ in range(30):
            _, y = sample_patch(data, label, locations, [12, 12, 12], rng, force_foreground=force)
            assert (y != 3).any() and (not force or (y == 1).any())
    # without the annotated locations, random patches mostly miss the one annotated slice
    plain = {k: v for k, v in locations.items() if k != ANNOTATED}
    misses = sum(not (sample_patch(data, label, plain, [12, 12, 12], rng, False)[1] != 3).any() for _ in range(30))
    assert misses > 10


def test_region_groups_choose_a_region_then_a_voxel_of_any_of_its_values():
    """Regions (BraTS: [1, 2, 3], [2, 3], [3]): a forced patch picks a present region uniformly, then a voxel of
    any value in it; a region whose values are absent from the case is never chosen."""
    label = np.zeros((1, 60, 60), np.int8)
    label[0, 5, 5] = 1
    label[0, 50, 50] = 2
    locations = class_locations(label, [1, 2, 3])
    rng = np.random.default_rng(0)
    hits = {(5, 5): 0, (50, 50): 0}
    for _ in range(600):
        _, y = sample_patch(label[None].astype(np.float32), label, locations, [1, 1, 1], rng, True,
                            groups=[(1, 2, 3), (2, 3), (3,)])
        hits[(5, 5)] += int(y[0, 0, 0] == 1)
        hits[(50, 50)] += int(y[0, 0, 0] == 2)
    # region (1,2,3) gives either voxel (1/2 each), region (2,3) always voxel 2, region (3,) is absent:
    # voxel 1 in 1/4 of the draws, voxel 2 in 3/4
    assert hits[(5, 5)] + hits[(50, 50)] == 600
    assert abs(hits[(5, 5)] / 600 - 0.25) < 0.06
