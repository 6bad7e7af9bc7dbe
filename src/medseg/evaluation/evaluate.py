"""Scoring a folder of predicted label maps against a folder of reference label maps (medseg-evaluate).

Files pair up by case name (the file name without its image suffix; formats may differ between the two
folders). Metrics and their empty-mask conventions are those of :mod:`medseg.evaluation.metrics`.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm import tqdm

from medseg.atomic import number, write_json
from medseg.datasets.io import Geometry, image_suffix, read_label, strip_suffix
from medseg.datasets.labels import LabelScheme, scheme_from_nnunet, scheme_from_values
from medseg.errors import ConfigError, DatasetError, MedsegError
from medseg.evaluation.metrics import (DEFAULT_TOLERANCE_MM, METRICS, Tolerance, case_metrics, class_tolerances,
                                       scheme_targets, summarize, write_case_csv)

log = logging.getLogger(__name__)

# how far two grids may differ and still be "the same": float32 headers (NIfTI) round at about 1e-5 mm
SPACING_ATOL_MM = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class CaseJob:
    case_id: str
    pred: Path
    ref: Path
    labels: Scoring | None  # None: every value found in either file
    tolerance_mm: Tolerance


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    scores: dict[str, float]  # dice_/hd95_/nsd_<name> of the classes scored for this case
    ref_values: frozenset[int]
    pred_values: frozenset[int]


def default_output(pred_dir: Path) -> Path:
    return Path(pred_dir) / "evaluation"


# --- inputs -------------------------------------------------------------------------------------------------

def list_cases(folder: Path, role: str) -> dict[str, Path]:
    """{case name: file} of the label files directly in ``folder``; hidden files (temp files of atomic writes)
    and sub-folders (such as the default evaluation output) are not cases."""
    if not folder.is_dir():
        raise MedsegError(f"{role} folder {folder} not found")
    cases: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file() or not image_suffix(f):
            continue
        case = strip_suffix(f)
        if case in cases:
            raise MedsegError(f"{folder}: case {case} has two files, {cases[case].name} and {f.name}")
        cases[case] = f
    return cases


def pair_cases(pred_dir: Path, ref_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) for every case; all unmatched cases of both folders in one error."""
    preds, refs = list_cases(pred_dir, "prediction"), list_cases(ref_dir, "reference")
    if not refs:
        raise MedsegError(f"no label files (.nii.gz, .nii, .nrrd, .mha, .png, .bmp, .tif) in the reference "
                          f"folder {ref_dir}")
    no_pred, no_ref = sorted(set(refs) - set(preds)), sorted(set(preds) - set(refs))
    problems = []
    if no_pred:
        problems.append(f"{len(no_pred)} reference case(s) without a prediction in {pred_dir}: {', '.join(no_pred)}")
    if no_ref:
        problems.append(f"{len(no_ref)} prediction(s) without a reference in {ref_dir}: {', '.join(no_ref)}")
    if problems:
        raise MedsegError("cases do not match:\n  - " + "\n  - ".join(problems))
    return [(case, preds[case], refs[case]) for case in sorted(refs)]


@dataclass(frozen=True)
class Scoring:
    """What is scored: classes {key: name}, the label values making up each (regions; None: the key's own
    value) and the ignore label, whose reference voxels count in no class."""

    names: dict[int, str]
    members: dict[int, tuple[int, ...]] | None = None
    ignore_label: int | None = None

    @property
    def values(self) -> set[int]:
        """Every label value a scored file may hold."""
        found = set().union(*self.members.values()) if self.members is not None else set(self.names)
        return found | ({self.ignore_label} if self.ignore_label is not None else set())


def load_labels(spec: str | Path | Mapping, per_label: bool = False) -> Scoring:
    """The classes to score, from a mapping {value: name}, or from an MSD (``{"1": "liver"}``) or nnU-Net v2
    (``{"liver": 1}``, regions and ``ignore`` included) dataset.json (the file or its folder). Background (0)
    is left out; a class named ``ignore`` marks unannotated voxels. ``per_label``: with regions, each label
    value is scored too (after the regions, named ``label_<value>``)."""
    try:
        scheme = scheme_from_values({int(k): str(v) for k, v in spec.items()}) if isinstance(spec, Mapping) \
            else _scheme_from_json(Path(spec))
    except DatasetError as e:
        raise ConfigError(f"labels {spec}: {'; '.join(e.problems)}") from None
    names, members = scheme_targets(scheme)
    if per_label and scheme.has_regions:
        for value in scheme.values[1:]:
            key = len(names) + 1
            names[key], members[key] = scheme.labels[value], (value,)
    if not names:
        raise ConfigError(f"labels {spec}: no foreground classes")
    if len(set(names.values())) != len(names):
        raise ConfigError(f"labels {spec}: class names must be unique, got {names}")
    return Scoring(names, members if scheme.has_regions else None, scheme.ignore_label)


def _scheme_from_json(path: Path) -> LabelScheme:
    path = path / "dataset.json" if path.is_dir() else path
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"labels: {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"labels: {path} is not valid JSON ({e})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict):
        raise ConfigError(f"labels: {path} has no 'labels' mapping")
    if all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: value -> name
        return scheme_from_values({int(k): str(v) for k, v in labels.items()})
    return scheme_from_nnunet(labels, meta.get("regions_class_order"), str(path))  # nnU-Net v2: name -> value


def check_output(output: Path, ref_dir: Path) -> None:
    o, r = output.resolve(), ref_dir.resolve()
    if o == r or o.is_relative_to(r):
        raise MedsegError(f"output {output} is inside the reference folder {ref_dir}; medseg never writes there")


# --- one case (runs in a worker process) ----------------------------------------------------------------------

def _read(path: Path) -> tuple[np.ndarray, Geometry]:
    try:
        return read_label(path)
    except (OSError, ValueError, RuntimeError, ImageFileError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MedsegError(message if str(path) in message else f"{path}: cannot read ({message})") from None


def _world(geo: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin, direction) in one frame (RAS) whatever the format: ITK files are in LPS."""
    affine = LPS_TO_RAS @ geo.affine if geo.kind == "itk" else geo.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return spacing, affine[:3, 3], affine[:3, :3] / spacing


def check_same_grid(pred_path: Path, pred_geo: Geometry, ref_path: Path, ref_geo: Geometry) -> None:
    """Refuse a prediction that does not lie on its reference's voxel grid, naming the file and what differs."""
    if pred_geo.shape != ref_geo.shape:
        raise MedsegError(f"{pred_path}: shape {pred_geo.shape} differs from the reference {ref_path} "
                          f"{ref_geo.shape} (z, y, x)")
    for what, a, b, atol in zip(("spacing", "origin", "direction"), _world(pred_geo), _world(ref_geo),
                                (SPACING_ATOL_MM, ORIGIN_ATOL_MM, DIRECTION_ATOL)):
        if not np.allclose(a, b, rtol=0, atol=atol):
            raise MedsegError(f"{pred_path}: {what} {np.round(a, 6).tolist()} differs from the reference "
                              f"{ref_path} {np.round(b, 6).tolist()} (tolerance {atol})")


def _values(label: np.ndarray) -> frozenset[int]:
    """Foreground values present; bincount is linear where np.unique sorts, which matters on CT volumes."""
    if label.size and label.min() >= 0:
        return frozenset(int(v) for v in np.flatnonzero(np.bincount(label.ravel())) if v != 0)
    return frozenset(int(v) for v in np.unique(label) if v != 0)


def evaluate_case(job: CaseJob) -> CaseResult:
    pred, pred_geo = _read(job.pred)
    ref, ref_geo = _read(job.ref)
    check_same_grid(job.pred, pred_geo, job.ref, ref_geo)
    ref_values, pred_values = _values(ref), _values(pred)
    scoring = job.labels if job.labels is not None else \
        Scoring({c: str(c) for c in sorted(ref_values | pred_values)})
    names = scoring.names
    # without labels= this case sees only its own classes: keep the tolerance entries for those (the caller
    # checks the mapping against the full class list)
    tolerance = job.tolerance_mm
    if isinstance(tolerance, Mapping):
        known = {str(c) for c in names} | set(names.values())
        tolerance = {k: v for k, v in tolerance.items() if str(k) in known}
    scores = case_metrics(pred, ref, names, ref_geo.spacing, tolerance, scoring.members, scoring.ignore_label)
    return CaseResult(job.case_id, scores, ref_values, pred_values)


# --- all cases ------------------------------------------------------------------------------------------------

def _one_thread() -> None:
    # one process per case already fills the cores; intra-op threads would only oversubscribe them
    import torch

    torch.set_num_threads(1)


def _run_all(jobs: list[CaseJob], num_processes: int, progress: bool) -> list[CaseResult]:
    # MONAI takes seconds to import: loaded once here, it is not charged to the first case's progress and
    # forked workers inherit it instead of each importing it again
    import monai.metrics  # noqa: F401

    bar = tqdm(total=len(jobs), desc="evaluate", disable=not progress, file=sys.stderr)
    if num_processes <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(evaluate_case(job))
            bar.update()
        bar.close()
        return results
    # fork starts workers at once with MONAI loaded, where spawn would import it again in each; workers switch
    # torch to one thread before any work, so they never use an intra-op pool inherited from the parent
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(min(num_processes, len(jobs)), mp_context=context, initializer=_one_thread)
    try:
        futures = [pool.submit(evaluate_case, job) for job in jobs]
        results = []
        for future in futures:
            results.append(future.result())
            bar.update()
        return results
    finally:
        # on the first error, queued cases are dropped instead of computed for nothing
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _row(result: CaseResult, classes: Mapping[int, str]) -> dict:
    """A class missing from a case's scores was in neither of its files: NaN for every metric."""
    nan = float("nan")
    return {"case_id": result.case_id,
            **{f"{m}_{name}": result.scores.get(f"{m}_{name}", nan) for m in METRICS for name in classes.values()}}


def evaluate_folders(pred_dir: str | Path, ref_dir: str | Path, labels: Mapping[int, str] | str | Path | None = None,
                     tolerance_mm: Tolerance = DEFAULT_TOLERANCE_MM, num_processes: int = 2,
                     output: str | Path | None = None, progress: bool = False, per_label: bool = False,
                     ) -> tuple[list[dict], dict]:
    """Score every prediction in ``pred_dir`` against the same-named reference in ``ref_dir``.

    ``labels``: {value: name}, or a dataset.json (MSD or nnU-Net v2) to read it from; default: every
    non-zero value found in the references, named by its value (other values found, such as ones only ever
    predicted, are listed as ``unscored_label_values``). ``tolerance_mm``: surface-Dice tolerance, one number or
    {class: mm}. ``per_label``: see ``load_labels``.
    Writes ``<output>/per_case.csv`` and ``<output>/summary.json`` (default output: ``<pred_dir>/evaluation``,
    never inside ``ref_dir``); returns (per-case rows, summary).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    output = Path(output) if output is not None else default_output(pred_dir)
    check_output(output, ref_dir)
    if per_label and labels is None:
        raise ConfigError("per_label=true needs labels=<dataset.json> declaring the regions")
    scoring = load_labels(labels, per_label) if labels is not None else None
    if scoring is not None:
        class_tolerances(scoring.names, tolerance_mm)  # a misspelt class in the tolerances fails before any work
    pairs = pair_cases(pred_dir, ref_dir)
    jobs = [CaseJob(case, pred, ref, scoring, tolerance_mm) for case, pred, ref in pairs]
    results = _run_all(jobs, num_processes, progress)

    ref_values = set().union(*(r.ref_values for r in results))
    pred_values = set().union(*(r.pred_values for r in results))
    classes = scoring.names if scoring is not None else {c: str(c) for c in sorted(ref_values)}
    if not classes:
        raise MedsegError(f"the references in {ref_dir} hold no foreground label; name the classes with labels=")
    tolerances = class_tolerances(classes, tolerance_mm)
    unscored = sorted((pred_values | ref_values) - (scoring.values if scoring is not None else set(classes)))
    if unscored:
        log.warning("label values %s are not classes (found only in predictions, or not in labels=): not scored",
                    unscored)

    rows = [_row(r, classes) for r in results]
    summary = {"pred": str(pred_dir), "ref": str(ref_dir), "classes": {str(c): n for c, n in classes.items()},
               "nsd_tolerance_mm": {classes[c]: t for c, t in tolerances.items()},
               "unscored_label_values": unscored, **summarize(rows, classes)}
    write_case_csv(rows, output / "per_case.csv")
    write_json(output / "summary.json", summary)  # strict JSON: NaN as null
    return rows, summary


def format_table(summary: dict) -> str:
    """Markdown: mean ± std per class and metric, the mean over classes, and presence counts."""
    tol = summary.get("nsd_tolerance_mm", {})
    tol_text = f"{sorted(set(tol.values()))[0]:g} mm" if len(set(tol.values())) == 1 else "per class"
    lines = [f"| class | Dice | HD95 (mm) | NSD @ {tol_text} | cases in both / one only / neither |",
             "|---|---|---|---|---|"]

    def cell(s: dict) -> str:
        return "n/a" if s["n"] == 0 else f"{s['mean']:.4f} ± {s['std']:.4f}"

    for name, stats in summary["per_class"].items():
        c = stats["cases"]
        lines.append(f"| {name} | {' | '.join(cell(stats[m]) for m in METRICS)} | "
                     f"{c['in_both']} / {c['in_one_only']} / {c['in_neither']} |")
    # also a summary read back from summary.json, where a mean over no cases is null
    means = " | ".join("n/a" if math.isnan(number(summary[f"{m}_mean"])) else f"{summary[f'{m}_mean']:.4f}"
                       for m in METRICS)
    lines.append(f"| mean over classes | {means} | {summary['num_cases']} cases |")
    return "\n".join(lines)
