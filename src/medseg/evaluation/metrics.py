"""Overlap metrics on label maps."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from medseg.atomic import atomic_path


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Dice per class; NaN where the class is absent from both (it then does not enter means)."""
    out = {}
    for c in classes:
        p, r = pred == c, ref == c
        denom = int(p.sum()) + int(r.sum())
        out[c] = float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom
    return out


def summarize(per_case: list[dict], class_names: dict[int, str]) -> dict:
    """Mean Dice per class over cases (NaNs skipped) and the mean over classes."""
    per_class = {}
    for c, name in class_names.items():
        vals = [r[f"dice_{name}"] for r in per_case if not math.isnan(r[f"dice_{name}"])]
        per_class[name] = float(np.mean(vals)) if vals else float("nan")
    finite = [v for v in per_class.values() if not math.isnan(v)]
    return {"dice": per_class, "dice_mean": float(np.mean(finite)) if finite else float("nan"),
            "num_cases": len(per_case)}


def write_case_csv(rows: list[dict], path: str | Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case_id"])
        writer.writeheader()
        writer.writerows(rows)
