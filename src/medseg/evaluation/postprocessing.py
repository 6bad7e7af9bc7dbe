"""The cross-validated post-processing decision, as nnU-Net makes it.

During validation each case is scored without post-processing, with the largest component of all foreground
kept, and with each class's largest component kept (on both of those); ``decide`` then turns on the
all-foreground step if it raises the mean foreground Dice and hurts no class, and, on top of that choice, the
per-class step for each class whose mean Dice rises. The decision reads only those scores, so it needs no images.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.datasets.labels import IGNORE_NAME
from medseg.evaluation.metrics import dice_per_class
from medseg.inference.postprocessing import PostprocessingSpec, bounding_box, keep_largest_component
from medseg.layout import CANDIDATES as CANDIDATES_FILE
from medseg.layout import METRICS, PLAN, VALIDATION, fold_dirs

_CANDIDATES = ("none", "allfg", "lcc", "allfg_lcc")  # column prefixes, see candidate_rows


# ---- per-case candidates and the cross-validation decision ---------------------------------------------

def candidate_rows(case_id: str, pred: np.ndarray, reference: np.ndarray, labels: dict[int, str],
                   ignore_label: int | None = None) -> dict:
    """One case's Dice per class under each candidate, columns ``<candidate>_dice_<class name>``:
    none (raw prediction), allfg (all-foreground largest component), lcc (that class's largest component)
    and allfg_lcc (both, in apply_postprocessing's order). Keeping one class's component changes only that
    class's Dice, so the lcc and allfg_lcc columns of a class are that class's Dice with only its own step.
    Voxels whose reference is ``ignore_label`` are scored in no class (components still connect through them)."""
    names = {c: n for c, n in labels.items() if c != 0 and c != ignore_label}
    classes = sorted(names)
    # every candidate only removes predicted voxels, so all Dice values are the same on the box around
    # prediction and reference together, which is usually far smaller than the scan
    box = bounding_box((pred != 0) | (reference != 0))
    if box is not None:
        pred, reference = pred[box], reference[box]
    valid = None if ignore_label is None else reference != ignore_label
    allfg = keep_largest_component(pred, all_foreground=True)
    none_dice = dice_per_class(pred, reference, classes, valid)
    allfg_dice = dice_per_class(allfg, reference, classes, valid)
    row: dict[str, str | float] = {"case_id": case_id}
    for c in classes:
        lcc = dice_per_class(keep_largest_component(pred, [c]), reference, [c], valid)[c]
        # the all-foreground step only removes voxels: where it removed none of this class, the class's own
        # step gives the same result on either input, so label only once
        untouched = np.count_nonzero(allfg == c) == np.count_nonzero(pred == c)
        allfg_lcc = lcc if untouched else dice_per_class(keep_largest_component(allfg, [c]), reference, [c],
                                                         valid)[c]
        for candidate, dice in zip(_CANDIDATES, (none_dice[c], allfg_dice[c], lcc, allfg_lcc)):
            row[f"{candidate}_dice_{names[c]}"] = dice
    return row


def _mean(rows: list[dict], column: str) -> float:
    values = [float(r[column]) for r in rows if not math.isnan(float(r[column]))]
    return float(np.mean(values)) if values else float("nan")


def _finite_mean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _better(after: float, before: float) -> bool:
    """Strictly better; a class scored NaN on either side gives no evidence, so no."""
    return not (math.isnan(after) or math.isnan(before)) and after > before


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def decide(rows: list[dict], labels: dict[int, str]) -> tuple[PostprocessingSpec, dict]:
    """nnU-Net's rule on the candidate rows of all validation cases (NaNs skipped, ties mean off)."""
    names = {c: n for c, n in sorted(labels.items()) if c != 0}
    none = {n: _mean(rows, f"none_dice_{n}") for n in names.values()}
    allfg = {n: _mean(rows, f"allfg_dice_{n}") for n in names.values()}
    fg_none, fg_allfg = _finite_mean(none.values()), _finite_mean(allfg.values())
    # a higher mean can hide a class that got worse (e.g. a structure made of two parts): that vetoes it
    worse = [n for n in names.values() if _better(none[n], allfg[n])]
    all_foreground = _better(fg_allfg, fg_none) and not worse

    base, prefix = (allfg, "allfg_lcc") if all_foreground else (none, "lcc")
    per_class, classes = {}, []
    for c, n in names.items():
        after = _mean(rows, f"{prefix}_dice_{n}")
        enabled = _better(after, base[n])
        classes += [c] if enabled else []
        per_class[n] = {"label": c, "before": _json_number(base[n]), "after": _json_number(after),
                        "enabled": enabled}
    evidence = {
        "num_cases": len(rows),
        "all_foreground": {"enabled": all_foreground,
                           "foreground_mean_before": _json_number(fg_none),
                           "foreground_mean_after": _json_number(fg_allfg),
                           "before": {n: _json_number(v) for n, v in none.items()},
                           "after": {n: _json_number(v) for n, v in allfg.items()},
                           "classes_worse": worse},
        "per_class": per_class,
    }
    return PostprocessingSpec(all_foreground=all_foreground, classes=classes), evidence


# ---- a run directory ------------------------------------------------------------------------------------

def _run_labels(fold_dir: Path) -> dict[int, str]:
    """The run's labels that post-processing decides on (the ignore label is none of them); a run with
    region-based labels is refused: its candidates are not scored yet."""
    path = fold_dir / PLAN
    try:
        plan = json.loads(path.read_text())
        labels = {int(k): v for k, v in plan["labels"].items() if v != IGNORE_NAME}
    except (OSError, ValueError, KeyError) as e:
        raise MedsegError(f"{path}: cannot read the labels of the run ({e})") from e
    if plan.get("regions"):
        raise MedsegError(f"{fold_dir.parent}: the run has region-based labels; post-processing is decided for "
                          "ordinary labels only, so its predictions are used as they are")
    return labels


def decide_for_run(run_dir: str | Path) -> tuple[PostprocessingSpec, dict]:
    """Decide from the candidates of every finished fold (fold_*/metrics.json) of a <model>__<loss> run."""
    run_dir = Path(run_dir)
    finished = [d for d in fold_dirs(run_dir) if (d / METRICS).is_file()]
    if finished:
        _run_labels(finished[0])  # a run with regions is refused before its missing candidates are reported
    folds = [d for d in finished if (d / VALIDATION / CANDIDATES_FILE).is_file()]
    if not folds:
        raise MedsegError(f"{run_dir}: no finished fold has validation/{CANDIDATES_FILE}; train (or re-validate) "
                          f"at least one fold with this version of medseg first")
    rows = []
    for fold in folds:
        with open(fold / VALIDATION / CANDIDATES_FILE, newline="") as f:
            rows += list(csv.DictReader(f))
    try:
        spec, evidence = decide(rows, _run_labels(folds[0]))
    except KeyError as e:
        raise MedsegError(f"{run_dir}: {CANDIDATES_FILE} lacks column {e}; "
                          f"were the folds trained with other labels?") from e
    evidence["folds"] = [d.name for d in folds]
    return spec, evidence


def _on_off(enabled: bool) -> str:
    return "on" if enabled else "off"


def _number(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_decision(spec: PostprocessingSpec, evidence: dict) -> str:
    """The decision and a markdown table of the mean Dice it rests on."""
    fg = evidence["all_foreground"]
    worse = f"; worse for {', '.join(fg['classes_worse'])}" if fg["classes_worse"] else ""
    per_class = ", ".join(n for n, p in evidence["per_class"].items() if p["enabled"]) or "none"
    lines = [f"post-processing from {evidence['num_cases']} validation cases ({', '.join(evidence.get('folds', []))}):",
             f"  keep largest foreground component: {_on_off(spec.all_foreground)} (mean foreground Dice "
             f"{_number(fg['foreground_mean_before'])} -> {_number(fg['foreground_mean_after'])}{worse})",
             f"  keep largest component per class: {per_class}",
             "", "| step | class | mean Dice before | after | enabled |", "|---|---|---|---|---|"]
    lines += [f"| all foreground | {n} | {_number(fg['before'][n])} | {_number(fg['after'][n])} "
              f"| {_on_off(spec.all_foreground)} |" for n in fg["before"]]
    lines += [f"| per class | {n} | {_number(p['before'])} | {_number(p['after'])} | {_on_off(p['enabled'])} |"
              for n, p in evidence["per_class"].items()]
    return "\n".join(lines)
