"""Cross-validation summary: per-case rows of every fold -> per-class mean/std overall and per fold."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medseg.errors import MedsegError
from medseg.evaluation.metrics import METRICS, metric_stats
from medseg.layout import CONFIG, PER_CASE, VALIDATION, find_runs, fold_dirs, indexed_fold_dirs, is_finished


def read_case_rows(fold_dir: Path) -> list[dict]:
    with open(fold_dir / VALIDATION / PER_CASE) as f:
        return list(csv.DictReader(f))


def _stats(values: list[float]) -> tuple[float, float, int]:
    s = metric_stats(values)
    return s["mean"], s["std"], s["n"]


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def metric_columns(rows: list[dict]) -> dict[str, list[str]]:
    """Class columns per metric (``dice_<name>``, ``hd95_<name>``, ``nsd_<name>``), in file order, over all
    rows: folds validated before a metric existed simply lack its columns."""
    seen = list(dict.fromkeys(k for r in rows for k in r))
    columns = {m: [k for k in seen if k.startswith(f"{m}_")] for m in METRICS}
    return {m: cols for m, cols in columns.items() if cols}


def case_value(row: dict, column: str) -> float:
    v = row.get(column)
    return float(v) if v not in (None, "") else float("nan")


def summarize_run(run_dir: Path) -> list[dict]:
    """Rows (run, fold or 'all', metric, mean, std, n) for one <model>__<loss> run dir: each class column of
    each metric, then ``<metric>_mean``, the per-case mean over classes (NaNs skipped) summarised over cases."""
    folds = [d for d in fold_dirs(run_dir) if is_finished(d)]
    rows_by_fold = {d.name: read_case_rows(d) for d in folds}
    all_rows = [r for rows in rows_by_fold.values() for r in rows]
    if not all_rows:
        return []
    columns = metric_columns(all_rows)
    out = []
    for scope, rows in [("all", all_rows), *rows_by_fold.items()]:
        for metric, cols in columns.items():
            for c in cols:
                mean, std, n = _stats([case_value(r, c) for r in rows])
                out.append({"run": run_dir.name, "fold": scope, "metric": c, "mean": mean, "std": std, "n": n})
            per_case_mean = [nanmean([case_value(r, c) for c in cols]) for r in rows]
            mean, std, n = _stats(per_case_mean)
            out.append({"run": run_dir.name, "fold": scope, "metric": f"{metric}_mean", "mean": mean, "std": std,
                        "n": n})
    return out


def expected_folds(run_dir: Path) -> int | None:
    """How many cross-validation folds the run's data is split into: the ``num_folds`` of a manifest file the
    run trained from, else ``data.num_folds`` of a fold's config.yaml; None where no fold says."""
    for fold_dir in fold_dirs(run_dir):
        try:
            cfg = OmegaConf.load(fold_dir / CONFIG)
        except (OSError, ValueError, OmegaConfBaseException, yaml.YAMLError):
            continue
        manifest = OmegaConf.select(cfg, "data.path", default=None)
        if OmegaConf.select(cfg, "data.adapter", default=None) == "manifest" and manifest:
            try:
                return int(json.loads(Path(str(manifest)).read_text())["num_folds"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # the manifest moved, or does not say: the adapter's default, from the config
        num_folds = OmegaConf.select(cfg, "data.num_folds", default=None)
        if num_folds is not None:
            return int(num_folds)
    return None


def missing_folds_note(run_dir: Path) -> str | None:
    """A line such as "<run>: folds 0 of 5 finished; missing 1, 2, 3, 4" where the run has fewer finished folds
    than its data has, or has started folds that did not finish; None for a complete run."""
    folds = {k: is_finished(d) for k, d in indexed_fold_dirs(run_dir)}
    finished = sorted(k for k, done in folds.items() if done)
    unfinished = sorted(k for k, done in folds.items() if not done)
    total = expected_folds(run_dir)
    missing = sorted(set(range(total)) - set(finished)) if total is not None else unfinished
    if not missing:
        return None
    listed = ", ".join(str(k) for k in finished) or "none"
    of = f" of {total}" if total is not None else ""
    note = f"{run_dir.name}: folds {listed}{of} finished; missing {', '.join(str(k) for k in missing)}"
    started = [k for k in unfinished if k in missing]
    if started:
        note += f" ({', '.join(f'fold {k}' for k in started)} started, not finished)"
    return note + (f'; "all" covers {listed} only' if finished else "")


def summarize_experiment(experiment_dir: Path, output: Path | None = None) -> str:
    """Writes cv_summary.csv and cv_summary.md; returns the markdown table. ``experiment_dir`` may be an
    experiment (several run dirs) or one run dir."""
    if not experiment_dir.is_dir():
        raise MedsegError(f"{experiment_dir}: no such directory")
    runs = find_runs(experiment_dir)
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
    notes = [n for n in (missing_folds_note(run) for run in runs) if n]
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    table = "\n".join(lines)
    (out / "cv_summary.md").write_text(table + "\n")
    return table
