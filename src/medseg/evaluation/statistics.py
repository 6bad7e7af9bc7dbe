"""Paired comparisons of two models over the same cases: Wilcoxon signed-rank test, percentile-bootstrap
confidence interval of the mean difference, and Holm's step-down correction across several comparisons.

Inputs are per-case scores in matching order (case i of ``a`` is case i of ``b``); a pair with a NaN on
either side is dropped, so every figure is over the cases both models have a score for (``n``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

# resamples drawn per block: bounds memory (block x cases indices) for large case counts
_BOOTSTRAP_BLOCK = 1000


@dataclass(frozen=True)
class WilcoxonResult:
    statistic: float
    pvalue: float
    n: int  # pairs with both scores finite (zero differences included)


def paired_finite(a, b) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of ``a`` and ``b`` where both are finite, as float arrays."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def paired_wilcoxon(a, b, alternative: str = "two-sided") -> WilcoxonResult:
    """scipy.stats.wilcoxon on the differences a - b (zero differences dropped, as Wilcoxon's original test).
    No pairs: NaN; all differences zero: statistic 0 and p = 1 (no evidence of a difference), where scipy
    would return NaN with a warning."""
    x, y = paired_finite(a, b)
    n = len(x)
    if n == 0:
        return WilcoxonResult(float("nan"), float("nan"), 0)
    if np.all(x == y):
        return WilcoxonResult(0.0, 1.0, n)
    with warnings.catch_warnings():
        # scipy warns that the normal approximation is rough for small n; the p-value is still the test's
        warnings.simplefilter("ignore", UserWarning)
        res = stats.wilcoxon(x, y, zero_method="wilcox", alternative=alternative)
    return WilcoxonResult(float(res.statistic), float(res.pvalue), n)


def bootstrap_resample_means(differences, n_resamples: int = 10000, seed: int = 0) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement, same size) of ``differences``, drawn with
    ``np.random.default_rng(seed).integers(0, n, (n_resamples, n))`` (in blocks, which yields the same
    indices as one call)."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n == 0 or n_resamples < 1:
        raise ValueError(f"need at least one value and one resample, got {n} values, {n_resamples} resamples")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, _BOOTSTRAP_BLOCK):
        stop = min(start + _BOOTSTRAP_BLOCK, n_resamples)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


@dataclass(frozen=True)
class BootstrapCI:
    mean: float  # observed mean difference
    low: float
    high: float
    n: int
    confidence: float


def bootstrap_ci(a, b, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> BootstrapCI:
    """Percentile-bootstrap confidence interval of mean(a - b) over the finite pairs, resampling cases."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = paired_finite(a, b)
    if len(x) == 0:
        nan = float("nan")
        return BootstrapCI(nan, nan, nan, 0, confidence)
    d = x - y
    means = bootstrap_resample_means(d, n_resamples, seed)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return BootstrapCI(float(d.mean()), float(low), float(high), len(d), confidence)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control): the i-th smallest of m p-values is
    multiplied by (m - i), made monotone, capped at 1. NaN p-values stay NaN and do not count in m.
    Reject hypothesis j at level alpha when adjusted[j] <= alpha."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out
