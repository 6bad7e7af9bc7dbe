import numpy as np
import pytest

from medseg.preprocessing.normalize import normalize

CT = [{"percentile_00_5": -100.0, "percentile_99_5": 300.0, "mean": 50.0, "std": 25.0}]


def test_zscore_inside_mask_leaves_outside_at_zero():
    image = np.random.default_rng(0).normal(100, 10, (1, 8, 8, 8)).astype(np.float32)
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 2:6, 2:6] = True
    out = normalize(image, ["zscore"], [True], mask)
    assert out[0][mask].mean() == pytest.approx(0, abs=1e-5) and out[0][mask].std() == pytest.approx(1, abs=1e-4)
    assert np.all(out[0][~mask] == 0)
    whole = normalize(image, ["zscore"], [False], mask)
    assert whole.mean() == pytest.approx(0, abs=1e-5)


def test_ct_clips_to_dataset_percentiles_then_global_zscore():
    image = np.array([-1000.0, 0.0, 50.0, 2000.0], np.float32).reshape(1, 1, 1, 4)
    out = normalize(image, ["ct"], [False], np.ones((1, 1, 4), bool), CT)
    np.testing.assert_allclose(out.ravel(), [(-100 - 50) / 25, -2.0, 0.0, (300 - 50) / 25])


def test_rescale_and_rgb_and_none():
    image = np.array([10.0, 20.0, 30.0], np.float32).reshape(1, 1, 1, 3)
    ones = np.ones((1, 1, 3), bool)
    np.testing.assert_allclose(normalize(image, ["rescale_0_1"], [False], ones).ravel(), [0, 0.5, 1])
    np.testing.assert_allclose(normalize(image, ["rgb_0_1"], [False], ones).ravel(), [10 / 255, 20 / 255, 30 / 255])
    np.testing.assert_allclose(normalize(image, ["none"], [False], ones).ravel(), [10, 20, 30])
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize(image, ["bogus"], [False], ones)
