"""End-of-fold validation: predict every held-out case from its original files, export, score."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.datasets.io import read_image, read_label, write_label
from medseg.datasets.manifest import Manifest
from medseg.atomic import write_json
from medseg.evaluation.metrics import DEFAULT_TOLERANCE_MM, case_metrics, summarize, write_case_csv
from medseg.evaluation.postprocessing import CANDIDATES_FILE, candidate_rows
from medseg.inference.predictor import Predictor

log = logging.getLogger(__name__)


def validate_fold(predictor: Predictor, manifest: Manifest, case_ids: list[str], fold_dir: Path,
                  fold: int, progress: bool = True, extra: dict | None = None) -> dict:
    """Writes fold_dir/validation/<case>.nii.gz, validation/per_case.csv and metrics.json; returns metrics."""
    names = {c: n for c, n in manifest.labels.items() if c != 0}
    rows = []
    candidates = []  # Dice with and without keep-largest-component, for medseg-postprocess
    predict_s = []  # per case: preprocessing, sliding window (mirroring included), back to input geometry; no file I/O
    for case_id in tqdm(case_ids, desc=f"validate fold {fold}", disable=not progress):
        case = manifest.case(case_id)
        image, geometry = read_image(case.images)
        reference, _ = read_label(case.label)
        start = time.perf_counter()
        pred = predictor.predict_label(image, geometry.spacing)
        predict_s.append(time.perf_counter() - start)
        write_label(pred, geometry, fold_dir / "validation" / f"{case_id}.nii.gz")
        scores = case_metrics(pred, reference, dict(sorted(names.items())), geometry.spacing)
        rows.append({"case_id": case_id, "fold": fold, **scores})
        candidates.append(candidate_rows(case_id, pred, reference, manifest.labels))
    write_case_csv(rows, fold_dir / "validation" / "per_case.csv")
    write_case_csv(candidates, fold_dir / "validation" / CANDIDATES_FILE)
    metrics = {"fold": fold, **(extra or {}), **summarize(rows, names), "nsd_tolerance_mm": DEFAULT_TOLERANCE_MM}
    metrics["timing"] = {**metrics.get("timing", {}),
                         "inference_s_per_case": float(np.mean(predict_s)) if predict_s else None,
                         "inference_s_median": float(np.median(predict_s)) if predict_s else None}
    write_json(fold_dir / "metrics.json", metrics)
    return metrics
