"""Where a run keeps what: the one place that spells out the folder layout of experiments, runs and folds.

    <output>/<experiment>/<run>/            a run: one model x loss x configuration
        postprocessing.json                 the cross-validated post-processing decision
        fold_<k>/ (or fold_all/)            one fold
            run.json                        the resolved settings the fold was trained with
            config.yaml, plan.json          the composed config and the plan
            model_summary.json
            checkpoints/last.ckpt, best.ckpt
            validation/<case>.nii.gz, per_case.csv, postprocessing_candidates.csv
            metrics.json                    written last: its presence marks the fold finished
"""

from __future__ import annotations

import re
from pathlib import Path

ALL_FOLD = "all"  # nnU-Net's train-on-every-case fold
FOLD_DIR = re.compile(r"fold_(\d+|all)")

RUN_RECORD = "run.json"
CONFIG = "config.yaml"
PLAN = "plan.json"
MODEL_SUMMARY = "model_summary.json"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
PER_CASE = "per_case.csv"
CANDIDATES = "postprocessing_candidates.csv"
POSTPROCESSING = "postprocessing.json"


def fold_name(fold: int | str) -> str:
    return f"fold_{fold}"


def fold_dir(run_dir: Path, fold: int | str) -> Path:
    return Path(run_dir) / fold_name(fold)


def fold_lock(run_dir: Path, fold: int | str) -> Path:
    return Path(run_dir) / f".{fold_name(fold)}.lock"


def fold_key(path: Path) -> int | str | None:
    """k for a ``fold_<k>`` folder ("all" for fold_all); None for anything else, such as ``fold_0.replaced-<time>``
    set aside by overwrite=true, whose cases would otherwise be counted twice."""
    m = FOLD_DIR.fullmatch(path.name)
    if not (m and path.is_dir()):
        return None
    return m.group(1) if m.group(1) == ALL_FOLD else int(m.group(1))


def fold_index(path: Path) -> int | None:
    """k for a cross-validation ``fold_<k>`` folder; None for fold_all and anything else."""
    key = fold_key(path)
    return key if isinstance(key, int) else None


def indexed_fold_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(k, folder) for the run's cross-validation fold_<k> folders, finished or not, by k (fold_all holds out
    nothing)."""
    keyed = [(k, d) for d in Path(run_dir).iterdir() if (k := fold_index(d)) is not None]
    return sorted(keyed, key=lambda kd: kd[0])


def fold_dirs(run_dir: Path) -> list[Path]:
    """The run's cross-validation fold_<k> folders, finished or not, by k (fold_all holds out nothing)."""
    return [d for _, d in indexed_fold_dirs(run_dir)]


def trained_fold_dirs(run_dir: Path) -> list[Path]:
    """The fold folders a run predicts with: its cross-validation folds (an ensemble), or fold_all where the run
    has no others (point at fold_all itself to predict with it beside cross-validation folds)."""
    run_dir = Path(run_dir)
    folds = fold_dirs(run_dir)
    return folds or [d for d in [fold_dir(run_dir, ALL_FOLD)] if d.is_dir()]


def is_finished(fold: Path) -> bool:
    return (fold / METRICS).is_file() and (fold / VALIDATION / PER_CASE).is_file()


def find_runs(experiment_dir: Path) -> list[Path]:
    """``experiment_dir`` itself when it is a run (holds fold_<k> folders), else its run subfolders."""
    if fold_dirs(experiment_dir):
        return [experiment_dir]
    return sorted(d for d in Path(experiment_dir).iterdir() if d.is_dir() and fold_dirs(d))


def checkpoint(fold: Path, which: str = "last") -> Path:
    return fold / CHECKPOINTS / f"{which}.ckpt"
