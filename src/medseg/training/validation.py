"""End-of-fold validation: predict every held-out case from its original files, export, score."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.datasets.io import image_suffix, read_image, read_label, write_label
from medseg.datasets.manifest import Manifest
from medseg.atomic import dumps_json, number, write_json
from medseg.evaluation.metrics import (DEFAULT_TOLERANCE_MM, case_metrics, scheme_targets, summarize,
                                      write_case_csv)
from medseg.evaluation.postprocessing import CANDIDATES_FILE, candidate_rows
from medseg.inference.predictor import Predictor
from medseg.inference.probability_files import probability_file, write_compact_probabilities
from medseg.layout import METRICS, PER_CASE, VALIDATION
from medseg.training.cascade import NextStageExport

log = logging.getLogger(__name__)
JOURNAL = "progress.jsonl"  # in validation/: one line per scored case, removed once metrics.json is written


def _checkpoint_identity(source: str) -> str:
    """Which weights the journal's cases were predicted with: a journal of other weights is not continued."""
    try:
        st = os.stat(source)
        return f"{source}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return str(source)


def _nulls_to_nan(row: dict) -> dict:
    return {k: number(v) if v is None else v for k, v in row.items()}


def _read_journal(path: Path, identity: str, out_dir: Path) -> dict[str, dict]:
    """case id -> {"row", "candidates", "seconds"} of the cases already scored with these weights (and whose
    exported prediction is still there); a journal of other weights or an unreadable one starts over."""
    if not path.is_file():
        return {}
    done: dict[str, dict] = {}
    with open(path) as f:
        lines = f.read().splitlines()
    try:
        if not lines or json.loads(lines[0]).get("checkpoint") != identity:
            return {}
        for line in lines[1:]:
            entry = json.loads(line)  # a line cut short by the interruption ends the journal
            if (out_dir / entry.get("file", f"{entry['row']['case_id']}.nii.gz")).is_file():
                done[entry["row"]["case_id"]] = entry
    except (ValueError, KeyError, TypeError):
        pass
    return done


def validate_fold(predictor: Predictor, manifest: Manifest, case_ids: list[str], fold_dir: Path,
                  fold: int | str, progress: bool = True, extra: dict | None = None,
                  next_stage: NextStageExport | None = None, save_probabilities: bool = False) -> dict:
    """Writes fold_dir/validation/<case><the label file's suffix>, validation/per_case.csv and metrics.json;
    returns metrics. ``next_stage`` (a 3d_lowres fold in a cascade): each prediction also on the next stage's grid.
    ``save_probabilities``: each case's class probabilities too (validation/<case>_probabilities.npz, compact:
    medseg.inference.probability_files), which configuration selection ensembles from.
    Each scored case is journaled, so an interrupted validation continues where it stopped."""
    scheme = manifest.label_scheme
    names, members = scheme_targets(scheme)
    out_dir = fold_dir / VALIDATION
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = out_dir / JOURNAL
    identity = ";".join(_checkpoint_identity(str(m.source)) for m in getattr(predictor, "models", []))
    done = _read_journal(journal, identity, out_dir)
    if next_stage is not None:  # a case counts as done once its next-stage file is written too
        done = {k: v for k, v in done.items() if next_stage.done(k)}
    if save_probabilities:  # ... and once its probabilities are
        done = {k: v for k, v in done.items() if probability_file(out_dir, k).is_file()}
    if done:
        log.info("validation of fold %s continues: %d of %d cases were scored before", fold, len(done), len(case_ids))
    with open(journal, "w") as f:  # rewritten: only the entries still valid, then the new ones
        f.write(dumps_json({"checkpoint": identity}) + "\n")
        for entry in done.values():
            f.write(dumps_json(entry) + "\n")
    rows = []
    candidates = []  # Dice with and without keep-largest-component, for medseg-postprocess
    predict_s = []  # per case: preprocessing, sliding window (mirroring included), back to input geometry; no file I/O
    for case_id in tqdm(case_ids, desc=f"validate fold {fold}", disable=not progress):
        if case_id in done:
            rows.append(_nulls_to_nan(done[case_id]["row"]))
            candidates.append(_nulls_to_nan(done[case_id]["candidates"]))
            predict_s.append(done[case_id]["seconds"])
            continue
        case = manifest.case(case_id)
        image, geometry = read_image(case.images)
        assert case.label is not None  # validation cases are training cases, which have labels
        reference, _ = read_label(case.label)
        start = time.perf_counter()
        prediction = predictor.predict(image, geometry.spacing, probabilities=True) if save_probabilities else None
        pred = prediction.label if prediction is not None else predictor.predict_label(image, geometry.spacing)
        predict_s.append(time.perf_counter() - start)
        if prediction is not None and prediction.probabilities is not None:  # before the label map, which marks
            write_compact_probabilities(probability_file(out_dir, case_id), prediction.probabilities,  # the case done
                                        prediction.labels, scheme.has_regions)
        # the dataset's own format (a PNG dataset validates to PNG files), NIfTI where the label's is not writable
        output = out_dir / f"{case_id}{image_suffix(case.label) or '.nii.gz'}"
        write_label(pred, geometry, output)
        if next_stage is not None:
            next_stage.write(case_id, image, geometry.spacing, pred)
        scores = case_metrics(pred, reference, names, geometry.spacing, members=members,
                              ignore_label=scheme.ignore_label)
        rows.append({"case_id": case_id, "fold": fold, **scores})
        candidate = candidate_rows(case_id, pred, reference, names, scheme.ignore_label,
                                   members if scheme.has_regions else None)
        candidates.append(candidate)
        with open(journal, "a") as f:
            f.write(dumps_json({"row": rows[-1], "candidates": candidate, "seconds": predict_s[-1],
                                "file": output.name}) + "\n")
    write_case_csv(rows, out_dir / PER_CASE)
    write_case_csv(candidates, out_dir / CANDIDATES_FILE)
    metrics = {"fold": fold, **(extra or {}), **summarize(rows, names), "nsd_tolerance_mm": DEFAULT_TOLERANCE_MM}
    metrics["timing"] = {**metrics.get("timing", {}),
                         "inference_s_per_case": float(np.mean(predict_s)) if predict_s else None,
                         "inference_s_median": float(np.median(predict_s)) if predict_s else None}
    write_json(fold_dir / METRICS, metrics)
    journal.unlink(missing_ok=True)
    return metrics


def missing_probability_cases(fold_dir: Path, case_ids: list[str]) -> list[str]:
    return [c for c in case_ids if not probability_file(fold_dir / VALIDATION, c).is_file()]


def write_missing_probabilities(predictor: Predictor, manifest: Manifest, case_ids: list[str], fold_dir: Path) -> None:
    """The class probabilities of held-out cases validated without them, predicted as the validation did."""
    scheme = manifest.label_scheme
    for case_id in case_ids:
        image, geometry = read_image(manifest.case(case_id).images)
        prediction = predictor.predict(image, geometry.spacing, probabilities=True)
        assert prediction.probabilities is not None  # asked for
        write_compact_probabilities(probability_file(fold_dir / VALIDATION, case_id), prediction.probabilities,
                                    prediction.labels, scheme.has_regions)
