"""Where a run keeps what: the one place that spells out the folder layout of experiments, runs and folds.

    <output>/<experiment>/<run>/            a run: one model x loss x configuration
        postprocessing.json                 the cross-validated post-processing decision
        fold_<k>/ (or fold_all/)            one fold
            run.json                        the resolved settings the fold was trained with
            overrides.yaml                  the command line's overrides (to train the same run with fold=all)
            config.yaml, plan.json          the composed config and the plan
            model_summary.json
            checkpoints/last.ckpt, best.ckpt
            validation/<case>.<the labels' format>, per_case.csv, postprocessing_candidates.csv
            predicted_next_stage/<next stage>/<case>.npy
                                            3d_lowres folds only: each held-out case's predicted label map on the
                                            next stage's (3d_cascade_fullres = 3d_fullres) preprocessed grid
            metrics.json                    written last: its presence marks the fold finished

Previous-stage predictions (nnU-Net's "predicted_next_stage") live in the fold that held the case out: a cascade
trains each case on the prediction of the one 3d_lowres fold that did not train on it (its validation fold), found
as ``next_stage_file(fold_dir(lowres_run, fold of the case), ...)``. Kept per fold (nnU-Net keeps one folder per
run), so that which fold made a file is its path, and a fold set aside (overwrite=true) or extended takes its
predictions with it. Stored as plain .npy (int8/int16) so that training memory-maps them like the cached images.
"""

from __future__ import annotations

import re
from pathlib import Path

ALL_FOLD = "all"  # nnU-Net's train-on-every-case fold
FOLD_DIR = re.compile(r"fold_(\d+|all)")

RUN_RECORD = "run.json"
OVERRIDES = "overrides.yaml"  # the command-line overrides the fold was trained with (Hydra's task overrides)
CONFIG = "config.yaml"
PLAN = "plan.json"
MODEL_SUMMARY = "model_summary.json"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
PER_CASE = "per_case.csv"
CANDIDATES = "postprocessing_candidates.csv"
POSTPROCESSING = "postprocessing.json"
NEXT_STAGE = "predicted_next_stage"


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


def next_stage_dir(fold: Path, next_stage: str) -> Path:
    """Where a 3d_lowres fold keeps its held-out cases' predictions for ``next_stage`` (3d_cascade_fullres)."""
    return Path(fold) / NEXT_STAGE / next_stage


def next_stage_file(fold: Path, next_stage: str, case_id: str) -> Path:
    return next_stage_dir(fold, next_stage) / f"{case_id}.npy"
