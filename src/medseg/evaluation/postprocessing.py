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

from medseg.datasets.labels import LabelScheme
from medseg.errors import MedsegError
from medseg.evaluation.metrics import dice_of_masks, scheme_targets
from medseg.inference.postprocessing import (PostprocessingSpec, Target, bounding_box, keep_largest_component,
                                             target_mask)
from medseg.layout import CANDIDATES as CANDIDATES_FILE
from medseg.layout import METRICS, PLAN, VALIDATION, fold_dirs

_CANDIDATES = ("none", "allfg", "lcc", "allfg_lcc")  # column prefixes, see candidate_rows


# ---- per-case candidates and the cross-validation decision ---------------------------------------------

def candidate_rows(case_id: str, pred: np.ndarray, reference: np.ndarray, labels: dict[int, str],
                   ignore_label: int | None = None, members: dict[int, tuple[int, ...]] | None = None) -> dict:
    """One case's Dice per class under each candidate, columns ``<candidate>_dice_<class name>``:
    none (raw prediction), allfg (all-foreground largest component), lcc (that class's largest component)
    and allfg_lcc (both, in apply_postprocessing's order). Keeping one class's component changes only that
    class's Dice, so the lcc and allfg_lcc columns of a class are that class's Dice with only its own step.
    ``members``: the label values of each class (regions, keyed as ``labels``; default: the class's own value).
    Voxels whose reference is ``ignore_label`` are scored in no class (components still connect through them)."""
    names = {c: n for c, n in labels.items() if c != 0 and c != ignore_label}
    targets = {c: list(members[c]) if members is not None else c for c in names}
    # every candidate only removes predicted voxels, so all Dice values are the same on the box around
    # prediction and reference together, which is usually far smaller than the scan
    box = bounding_box((pred != 0) | (reference != 0))
    if box is not None:
        pred, reference = pred[box], reference[box]
    valid = None if ignore_label is None else reference != ignore_label

    def dice(label: np.ndarray, c: int) -> float:
        p, r = target_mask(label, targets[c]), target_mask(reference, targets[c])
        if valid is not None:
            p, r = p & valid, r & valid
        return dice_of_masks(p, r)

    allfg = keep_largest_component(pred, all_foreground=True)
    row: dict[str, str | float] = {"case_id": case_id}
    for c in sorted(names):
        lcc = dice(keep_largest_component(pred, [targets[c]]), c)
        # the all-foreground step only removes voxels: where it removed none of this class, the class's own
        # step gives the same result on either input, so label only once
        untouched = np.count_nonzero(target_mask(allfg, targets[c])) == np.count_nonzero(target_mask(pred, targets[c]))
        allfg_lcc = lcc if untouched else dice(keep_largest_component(allfg, [targets[c]]), c)
        for candidate, value in zip(_CANDIDATES, (dice(pred, c), dice(allfg, c), lcc, allfg_lcc)):
            row[f"{candidate}_dice_{names[c]}"] = value
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


def decide(rows: list[dict], labels: dict[int, str], members: dict[int, tuple[int, ...]] | None = None,
           ) -> tuple[PostprocessingSpec, dict]:
    """nnU-Net's rule on the candidate rows of all validation cases (NaNs skipped, ties mean off). ``members``:
    the label values of each class where the classes are regions (the spec then names regions by their values)."""
    names = {c: n for c, n in sorted(labels.items()) if c != 0}
    none = {n: _mean(rows, f"none_dice_{n}") for n in names.values()}
    allfg = {n: _mean(rows, f"allfg_dice_{n}") for n in names.values()}
    fg_none, fg_allfg = _finite_mean(none.values()), _finite_mean(allfg.values())
    # a higher mean can hide a class that got worse (e.g. a structure made of two parts): that vetoes it
    worse = [n for n in names.values() if _better(none[n], allfg[n])]
    all_foreground = _better(fg_allfg, fg_none) and not worse

    base, prefix = (allfg, "allfg_lcc") if all_foreground else (none, "lcc")
    per_class: dict = {}
    classes: list[Target] = []
    for c, n in names.items():
        after = _mean(rows, f"{prefix}_dice_{n}")
        enabled = _better(after, base[n])
        target: Target = list(members[c]) if members is not None else c
        classes += [target] if enabled else []
        per_class[n] = {"label": target, "before": _json_number(base[n]), "after": _json_number(after),
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

def _run_targets(fold_dir: Path) -> tuple[dict[int, str], dict[int, tuple[int, ...]] | None]:
    """The classes post-processing decides on (the ignore label is none of them): the run's regions with their
    values, or its labels."""
    path = fold_dir / PLAN
    try:
        scheme = LabelScheme.from_dict(json.loads(path.read_text()))  # the plan's labels, regions and their order
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MedsegError(f"{path}: cannot read the labels of the run ({e})") from e
    names, members = scheme_targets(scheme)
    return names, members if scheme.has_regions else None


def decide_for_run(run_dir: str | Path) -> tuple[PostprocessingSpec, dict]:
    """Decide from the candidates of every finished fold (fold_*/metrics.json) of a <model>__<loss> run."""
    run_dir = Path(run_dir)
    folds = [d for d in fold_dirs(run_dir) if (d / METRICS).is_file()
             and (d / VALIDATION / CANDIDATES_FILE).is_file()]
    if not folds:
        raise MedsegError(f"{run_dir}: no finished fold has validation/{CANDIDATES_FILE}; train (or re-validate) "
                          f"at least one fold with this version of medseg first")
    rows = []
    for fold in folds:
        with open(fold / VALIDATION / CANDIDATES_FILE, newline="") as f:
            rows += list(csv.DictReader(f))
    try:
        spec, evidence = decide(rows, *_run_targets(folds[0]))
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
