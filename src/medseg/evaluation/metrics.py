"""Per-case segmentation metrics and their summaries.

Three metrics per class and case, computed with MONAI on one-hot masks:

- ``dice``: volumetric Dice.
- ``hd95``: 95th-percentile symmetric Hausdorff distance in millimetres (the larger of the two directed 95th
  percentiles of the distances between edge voxels, MONAI's ``compute_hausdorff_distance``).
- ``nsd``: normalised surface Dice at a tolerance in millimetres (default 1.0 mm, per class if wanted):
  the fraction of both surfaces lying within the tolerance of the other, surface elements weighted by their
  area (MONAI's ``compute_surface_dice`` with ``use_subvoxels=True``, the definition of Nikolov et al.).

Distances use the voxel spacing in array order (``Geometry.spacing``), so they are in millimetres.

Conventions for empty masks:

- class absent from both prediction and reference: NaN for all three metrics;
- class present in only one of them: Dice 0, NSD 0, HD95 NaN (a distance to an empty surface is undefined;
  MONAI would report inf, which would dominate every mean).

Summaries skip NaN values and count, per class, in how many cases the class was in both masks, in only one,
or in neither, so a NaN-free HD95 mean over few cases is recognisable as such.

Per-case rows hold ``dice_<name>``, ``hd95_<name>`` and ``nsd_<name>`` columns, grouped by metric.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_path
from medseg.datasets.labels import LabelScheme
from medseg.errors import ConfigError

METRICS = ("dice", "hd95", "nsd")
DEFAULT_TOLERANCE_MM = 1.0
NAN = float("nan")

Tolerance = float | Mapping[str | int, float]


def dice_of_masks(p: np.ndarray, r: np.ndarray) -> float:
    """Dice of two boolean masks; NaN where both are empty."""
    denom = int(p.sum()) + int(r.sum())
    return NAN if denom == 0 else 2.0 * int((p & r).sum()) / denom


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Dice per class; NaN where the class is absent from both (it then does not enter means)."""
    return {c: dice_of_masks(pred == c, ref == c) for c in classes}


def class_tolerances(class_names: Mapping[int, str], tolerance_mm: Tolerance) -> dict[int, float]:
    """Surface-Dice tolerance (mm) per class: one number for all, or {class name or value: mm} where classes
    not named keep the default. Unknown keys are refused so that a misspelt class name is not ignored."""
    if isinstance(tolerance_mm, Mapping):
        by_key = {str(k): float(v) for k, v in tolerance_mm.items()}
        known = {str(c) for c in class_names} | set(class_names.values())
        unknown = sorted(set(by_key) - known)
        if unknown:
            raise ConfigError(f"tolerance_mm names unknown classes {unknown}; classes are {dict(class_names)}")
        out = {c: by_key.get(name, by_key.get(str(c), DEFAULT_TOLERANCE_MM)) for c, name in class_names.items()}
    else:
        out = {c: float(tolerance_mm) for c in class_names}
    bad = {class_names[c]: t for c, t in out.items() if not (math.isfinite(t) and t >= 0)}
    if bad:
        raise ConfigError(f"tolerance_mm must be finite and >= 0, got {bad}")
    return out


def _crop_to_union(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus one voxel. MONAI crops the same way, but only
    after casting the whole volume to float per class; cutting first keeps large CT volumes cheap."""
    union = p | r
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    return p[tuple(box)], r[tuple(box)]


def _surface_metrics(p: np.ndarray, r: np.ndarray, spacing: Sequence[float], tolerance: float) -> tuple[float, float]:
    """(HD95, NSD) of two non-empty masks, in mm."""
    # imported here: torch and MONAI take seconds to load, and the summaries below need neither
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    # MONAI's one-hot layout: batch 1, channel 1 (this class), spatial axes
    yp, yr = (torch.from_numpy(np.ascontiguousarray(m))[None, None] for m in _crop_to_union(p, r))
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI's own internals pass an argument it has deprecated; the warning is not ours to act on
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(yp, yr, [tolerance], include_background=True, spacing=spacing,
                                   use_subvoxels=True)
    return float(hd95[0, 0]), float(nsd[0, 0])


def class_metrics(p: np.ndarray, r: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> dict[str, float]:
    """Dice, HD95 and NSD of one class's boolean masks, with the module's empty-mask conventions."""
    in_pred, in_ref = bool(p.any()), bool(r.any())
    if not in_pred and not in_ref:
        return {"dice": NAN, "hd95": NAN, "nsd": NAN}
    if not (in_pred and in_ref):
        return {"dice": 0.0, "hd95": NAN, "nsd": 0.0}
    hd95, nsd = _surface_metrics(p, r, spacing, tolerance_mm)
    return {"dice": dice_of_masks(p, r), "hd95": hd95, "nsd": nsd}


def case_metrics(pred: np.ndarray, ref: np.ndarray, class_names: Mapping[int, str], spacing: Sequence[float],
                 tolerance_mm: Tolerance = DEFAULT_TOLERANCE_MM, members: Mapping[int, Sequence[int]] | None = None,
                 ignore_label: int | None = None) -> dict[str, float]:
    """One case's row: ``dice_<name>`` for every class, then ``hd95_<name>``, then ``nsd_<name>``.
    ``pred`` and ``ref`` are label maps on the same grid, ``spacing`` in the arrays' axis order. ``members``: the
    label values making up each class (regions; default: the class's own value). Voxels whose reference is
    ``ignore_label`` count in no class (they were never annotated)."""
    tolerances = class_tolerances(class_names, tolerance_mm)
    valid = None if ignore_label is None else ref != ignore_label

    def mask(labels: np.ndarray, c: int) -> np.ndarray:
        return _class_mask(labels, list(members[c]) if members is not None else [c], valid)

    scores = {c: class_metrics(mask(pred, c), mask(ref, c), spacing, tolerances[c]) for c in class_names}
    return {f"{m}_{name}": scores[c][m] for m in METRICS for c, name in class_names.items()}


def _class_mask(labels: np.ndarray, values: list[int], valid: np.ndarray | None) -> np.ndarray:
    m = labels == values[0] if len(values) == 1 else np.isin(labels, values)
    return m & valid if valid is not None else m


def case_dice(pred: np.ndarray, ref: np.ndarray, class_names: Mapping[int, str],
              members: Mapping[int, Sequence[int]] | None = None, ignore_label: int | None = None) -> dict[int, float]:
    """Dice per class as ``case_metrics`` scores it (same classes, regions and ignore label), without the
    surface metrics: for scoring many candidate predictions of a case."""
    valid = None if ignore_label is None else ref != ignore_label
    out = {}
    for c in class_names:
        values = list(members[c]) if members is not None else [c]
        out[c] = dice_of_masks(_class_mask(pred, values, valid), _class_mask(ref, values, valid))
    return out


def scheme_targets(scheme: LabelScheme) -> tuple[dict[int, str], dict[int, tuple[int, ...]]]:
    """(class_names, members) of what a dataset is scored on: its regions (keyed 1..R), or its foreground labels
    (keyed by value), as ``case_metrics`` takes them."""
    if scheme.has_regions:
        return ({i: r.name for i, r in enumerate(scheme.regions, start=1)},
                {i: r.values for i, r in enumerate(scheme.regions, start=1)})
    names = {v: scheme.labels[v] for v in scheme.values if v != 0}
    return names, {v: (v,) for v in names}


def _finite(values) -> list[float]:
    return [float(v) for v in values if not math.isnan(float(v))]


def metric_stats(values) -> dict:
    """Mean, standard deviation and count of the non-NaN values."""
    v = _finite(values)
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} if v else \
        {"mean": NAN, "std": NAN, "n": 0}


def _presence_counts(rows: list[dict], name: str) -> dict[str, int]:
    """In how many cases the class was in both masks (HD95 defined), in only one (Dice defined, HD95 not),
    or in neither (Dice NaN)."""
    dice = [float(r.get(f"dice_{name}", NAN)) for r in rows]
    hd95 = [float(r.get(f"hd95_{name}", NAN)) for r in rows]
    neither = sum(math.isnan(d) for d in dice)
    both = sum(not math.isnan(h) for h in hd95)
    return {"in_both": both, "in_one_only": len(rows) - neither - both, "in_neither": neither}


def summarize(per_case: list[dict], class_names: Mapping[int, str]) -> dict:
    """Per metric: the mean per class over cases (``dice``, ``hd95``, ``nsd``: {name: mean}) and the mean of
    those over classes (``dice_mean``, ...), NaNs skipped; ``per_class`` adds std, n and presence counts.
    Rows lacking a metric's columns (older per-case files) count as NaN for it."""
    out: dict = {}
    per_class: dict = {name: {} for name in class_names.values()}
    for m in METRICS:
        for name in class_names.values():
            per_class[name][m] = metric_stats(r.get(f"{m}_{name}", NAN) for r in per_case)
        means = {name: per_class[name][m]["mean"] for name in class_names.values()}
        finite = _finite(means.values())
        out[m] = means
        out[f"{m}_mean"] = float(np.mean(finite)) if finite else NAN
    for name in class_names.values():
        per_class[name]["cases"] = _presence_counts(per_case, name)
    out["num_cases"] = len(per_case)
    out["per_class"] = per_class
    return out


def write_case_csv(rows: list[dict], path: str | Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case_id"])
        writer.writeheader()
        writer.writerows(rows)
