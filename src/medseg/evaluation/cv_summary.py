"""Cross-validation summary: per-case rows of every fold -> per-class mean/std overall and per fold."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError


def _read_rows(fold_dir: Path) -> list[dict]:
    with open(fold_dir / "validation" / "per_case.csv") as f:
        return list(csv.DictReader(f))


def _stats(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if not math.isnan(x)]
    return (float(np.mean(v)), float(np.std(v)), len(v)) if v else (float("nan"), float("nan"), 0)


def summarize_run(run_dir: Path) -> list[dict]:
    """Rows (run, fold or 'all', class, mean, std, n) for one <model>__<loss> run dir."""
    folds = sorted(d for d in run_dir.glob("fold_*") if (d / "metrics.json").is_file()
                   and (d / "validation" / "per_case.csv").is_file())
    rows_by_fold = {d.name: _read_rows(d) for d in folds}
    all_rows = [r for rows in rows_by_fold.values() for r in rows]
    if not all_rows:
        return []
    classes = [k for k in all_rows[0] if k.startswith("dice_")]
    out = []
    for scope, rows in [("all", all_rows), *rows_by_fold.items()]:
        for c in classes:
            mean, std, n = _stats([float(r[c]) for r in rows])
            out.append({"run": run_dir.name, "fold": scope, "metric": c, "mean": mean, "std": std, "n": n})
        per_case_mean = [np.nanmean([float(r[c]) for c in classes]) for r in rows]
        mean, std, n = _stats(per_case_mean)
        out.append({"run": run_dir.name, "fold": scope, "metric": "dice_mean", "mean": mean, "std": std, "n": n})
    return out


def summarize_experiment(experiment_dir: Path, output: Path | None = None) -> str:
    """Writes cv_summary.csv and cv_summary.md; returns the markdown table. ``experiment_dir`` may be an
    experiment (several run dirs) or one run dir."""
    runs = [experiment_dir] if any(experiment_dir.glob("fold_*")) else sorted(
        d for d in experiment_dir.iterdir() if d.is_dir() and any(d.glob("fold_*")))
    rows = [r for run in runs for r in summarize_run(run)]
    if not rows:
        raise MedsegError(f"{experiment_dir}: no finished folds (fold_*/metrics.json) found")
    out = output or experiment_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cv_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| run | fold | metric | mean | std | cases |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['fold']} | {r['metric']} | {r['mean']:.4f} | {r['std']:.4f} | {r['n']} |"
              for r in rows]
    table = "\n".join(lines)
    (out / "cv_summary.md").write_text(table + "\n")
    return table
