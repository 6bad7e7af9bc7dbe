import numpy as np

from medseg.preprocessing.resample import new_shape, resample_image, resample_label, separate_axis


def test_separate_axis_rule():
    assert separate_axis([4.0, 0.7, 0.7], [1.0, 1.0, 1.0]) == 0  # decided on the current spacing
    assert separate_axis([1.0, 1.0, 1.0], [1.0, 1.0, 3.5]) == 2  # else on the target spacing
    assert separate_axis([1.2, 1.0, 1.0], [1.0, 1.0, 1.0]) is None
    assert separate_axis([4.0, 4.0, 1.0], [1.0, 1.0, 1.0]) is None  # two coarse axes: no single one to separate


def test_new_shape_rounds_half_to_even_like_nnunet():
    assert new_shape([5, 10, 10], [1.5, 1.0, 1.0], [1.0, 1.0, 1.0]) == [8, 10, 10]  # 7.5 -> 8
    assert new_shape([5, 10, 10], [2.5, 1.0, 1.0], [1.0, 1.0, 1.0]) == [12, 10, 10]  # 12.5 -> 12


def test_thick_slices_are_not_blended_along_the_coarse_axis():
    rng = np.random.default_rng(0)
    image = np.repeat(np.arange(1, 6, dtype=np.float32)[:, None, None], 16, 1).repeat(16, 2)[None]
    image = image + rng.normal(0, 0.01, image.shape).astype(np.float32)
    out = resample_image(image, [20, 24, 24], [4.0, 1.0, 1.0], [1.0, 0.667, 0.667])
    assert out.shape == (1, 20, 24, 24)
    slice_means = out[0].mean(axis=(1, 2))
    # nearest neighbour along axis 0: each output slice equals one input slice (1..5), never an average
    assert np.allclose(slice_means, np.round(slice_means), atol=0.02)
    assert sorted(set(np.round(slice_means).astype(int))) == [1, 2, 3, 4, 5]


def test_label_resampling_keeps_label_values_and_structure():
    label = np.zeros((10, 20, 20), np.int16)
    label[3:7, 5:15, 5:15] = 1
    label[4:6, 8:12, 8:12] = 2
    out = resample_label(label, [10, 40, 40], [1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0, 1, 2])
    assert set(np.unique(out)) == {0, 1, 2}
    assert abs((out == 1).sum() / 4 - (label == 1).sum()) / (label == 1).sum() < 0.1
