import math

import numpy as np

from medseg.evaluation.metrics import dice_per_class, summarize


def test_dice_equals_an_independent_computation():
    rng = np.random.default_rng(3)
    pred, ref = rng.integers(0, 3, (20, 20, 20)), rng.integers(0, 3, (20, 20, 20))
    got = dice_per_class(pred, ref, [1, 2])
    for c in (1, 2):
        inter = np.logical_and(pred == c, ref == c).sum()
        assert math.isclose(got[c], 2 * inter / ((pred == c).sum() + (ref == c).sum()))


def test_absent_class_is_nan_and_left_out_of_means():
    pred = np.zeros((4, 4, 4), int)
    ref = np.zeros((4, 4, 4), int)
    pred[0, 0, 0] = ref[0, 0, 0] = 1
    dice = dice_per_class(pred, ref, [1, 2])
    assert dice[1] == 1.0 and math.isnan(dice[2])
    summary = summarize([{"dice_a": dice[1], "dice_b": dice[2]}, {"dice_a": 0.5, "dice_b": 0.25}], {1: "a", 2: "b"})
    assert summary["dice"] == {"a": 0.75, "b": 0.25} and summary["dice_mean"] == 0.5
