"""Paired statistics of the leaderboard against scipy, numpy and hand-computed answers."""

import numpy as np
import pytest
from scipy import stats

from medseg.evaluation.statistics import bootstrap_ci, bootstrap_resample_means, holm, paired_wilcoxon


def test_wilcoxon_matches_the_exact_answer_and_scipy():
    # six positive differences: W- = 0, and the exact two-sided p is 2 / 2^6
    b = np.zeros(6)
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    res = paired_wilcoxon(a, b)
    assert res.statistic == 0.0 and res.n == 6
    assert res.pvalue == pytest.approx(2 / 2**6)

    rng = np.random.default_rng(3)
    x, y = rng.normal(0.80, 0.05, 40), rng.normal(0.78, 0.05, 40)
    expected = stats.wilcoxon(x, y)
    res = paired_wilcoxon(x, y)
    assert res.statistic == pytest.approx(expected.statistic)
    assert res.pvalue == pytest.approx(expected.pvalue)


def test_wilcoxon_drops_pairs_with_a_missing_score_and_handles_degenerate_input():
    a = np.array([0.9, 0.8, np.nan, 0.7, 0.95, 0.85, 0.6])
    b = np.array([0.8, 0.82, 0.5, np.nan, 0.9, 0.80, 0.5])
    keep = ~np.isnan(a) & ~np.isnan(b)
    res = paired_wilcoxon(a, b)
    assert res.n == keep.sum() == 5
    assert res.pvalue == pytest.approx(stats.wilcoxon(a[keep], b[keep]).pvalue)
    same = paired_wilcoxon([0.5, 0.6], [0.5, 0.6])
    assert (same.statistic, same.pvalue, same.n) == (0.0, 1.0, 2)
    assert np.isnan(paired_wilcoxon([np.nan], [0.5]).pvalue)
    with pytest.raises(ValueError):
        paired_wilcoxon([0.1, 0.2], [0.1])


def test_bootstrap_ci_is_numpy_percentiles_of_seeded_resample_means():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.85, 0.04, 57), rng.normal(0.83, 0.04, 57)
    d = a - b
    ci = bootstrap_ci(a, b, n_resamples=10000, confidence=0.95, seed=42)
    # the same computation written out: one call for all resamples (the implementation draws in blocks)
    idx = np.random.default_rng(42).integers(0, len(d), size=(10000, len(d)))
    low, high = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    assert (ci.low, ci.high) == (pytest.approx(low, abs=1e-15), pytest.approx(high, abs=1e-15))
    assert ci.mean == pytest.approx(d.mean()) and ci.n == 57 and ci.confidence == 0.95
    assert ci.low < ci.mean < ci.high
    # and close to scipy's percentile bootstrap (other resamples, so only approximately)
    ref = stats.bootstrap((d,), np.mean, n_resamples=10000, confidence_level=0.95, method="percentile",
                          rng=np.random.default_rng(1)).confidence_interval
    assert ci.low == pytest.approx(ref.low, abs=2e-3) and ci.high == pytest.approx(ref.high, abs=2e-3)
    # seeded: the same interval again, another seed another one
    assert bootstrap_ci(a, b, seed=42) == ci
    assert bootstrap_ci(a, b, seed=43) != ci


def test_bootstrap_ci_covers_the_true_mean_difference():
    true_diff = 0.02
    rng = np.random.default_rng(7)
    b = rng.uniform(0.7, 0.9, 300)
    a = b + rng.normal(true_diff, 0.03, 300)
    ci = bootstrap_ci(a, b, n_resamples=5000, seed=0)
    # for a mean of 300 cases the percentile interval is close to the normal-theory one
    d = a - b
    half = stats.norm.ppf(0.975) * d.std(ddof=1) / np.sqrt(len(d))
    assert ci.low == pytest.approx(d.mean() - half, abs=3e-4) and ci.high == pytest.approx(d.mean() + half, abs=3e-4)
    # a 95% interval misses the true difference in 5% of samples: check the rate over repeated samples of 30
    hits = 0
    for rep in range(200):
        b = rng.uniform(0.7, 0.9, 30)
        a = b + rng.normal(true_diff, 0.03, 30)
        ci = bootstrap_ci(a, b, n_resamples=1000, seed=rep)
        hits += ci.low <= true_diff <= ci.high
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_drops_missing_pairs_and_rejects_bad_arguments():
    ci = bootstrap_ci([0.9, np.nan, 0.7], [0.8, 0.8, np.nan], n_resamples=100)
    assert ci.n == 1 and ci.mean == pytest.approx(0.1) and ci.low == pytest.approx(0.1)
    assert np.isnan(bootstrap_ci([np.nan], [0.1]).mean)
    with pytest.raises(ValueError):
        bootstrap_ci([0.1], [0.2], confidence=1.5)
    with pytest.raises(ValueError):
        bootstrap_resample_means([], 10)


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> monotone 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    # NaN stays NaN and does not count in m
    np.testing.assert_allclose(holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    assert holm([]).shape == (0,)
    # rejections at 0.05: the step-down procedure stops at the first p above alpha / (m - i)
    assert list(holm([0.01, 0.04, 0.03, 0.005]) <= 0.05) == [True, False, False, True]
