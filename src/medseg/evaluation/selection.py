"""Which trained model to deploy: the best run of an experiment, or the best ensemble of two runs, chosen from
out-of-fold predictions only (nnU-Net's ``nnUNetv2_find_best_configuration``, over any configuration, model and
loss medseg trained).

Candidates: every run whose cross-validation is complete (every fold finished), and every pair of such runs that
kept their held-out probabilities (``validation.save_probabilities=true``), ensembled as medseg-predict would
(medseg.inference.ensemble: probabilities averaged on each case's own grid). A run's own score is that of the
label maps its validation wrote (``per_case.csv``, what ``medseg-predict`` reproduces); a pair's is computed here
from the stored probabilities. The score is the mean over cases of each case's mean foreground Dice (regions where
the dataset has them); an ensemble must beat the best single run to be chosen. Each candidate is compared with
the best single run on the cases both have (bootstrap interval, Wilcoxon, Holm, as the leaderboard does).
Post-processing is then decided for the winner as medseg-postprocess decides it for a run.

Runs with missing folds, missing probability files or other labels are listed, not fatal.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from medseg import layout
from medseg.atomic import write_json, write_text
from medseg.datasets.io import read_label
from medseg.datasets.labels import LabelScheme
from medseg.datasets.manifest import Manifest
from medseg.errors import MedsegError
from medseg.evaluation.cv_summary import case_value, expected_folds, nanmean
from medseg.evaluation.leaderboard import (RunResults, adjust_holm, fmt, fmt_p, load_run, paired_comparison,
                                           run_costs, training_notes)
from medseg.evaluation.metrics import case_dice, scheme_targets
from medseg.evaluation.postprocessing import candidate_rows, decide, decide_for_run
from medseg.inference.ensemble import average_probabilities
from medseg.inference.probability_files import probability_file, read_probabilities
from medseg.planning.plan import Plan
from medseg.preprocessing.prepare import dataset_folder, load_manifest

log = logging.getLogger(__name__)

SELECTION_JSON = "selection.json"
SELECTION_MD = "selection.md"
POSTPROCESSING_FILE = "selection_postprocessing.json"


@dataclass
class Run:
    results: RunResults
    expected_folds: int
    scheme: LabelScheme
    case_fold: dict[str, int]  # held-out case -> the fold that held it out
    dice: dict[str, dict[str, float]]  # case -> class name -> Dice, from the validation's own label maps
    missing_probabilities: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.results.name

    @property
    def path(self) -> Path:
        return self.results.path


@dataclass
class Candidate:
    runs: tuple[str, ...]  # one run, or the runs of an ensemble (in the order their probabilities are summed)
    dice: dict[str, dict[str, float]]  # case -> class name -> Dice

    @property
    def name(self) -> str:
        return " + ".join(self.runs)

    def case_means(self) -> dict[str, float]:
        return {case: nanmean(list(d.values())) for case, d in self.dice.items()}

    def score(self) -> float:
        values = [v for v in self.case_means().values() if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan


@dataclass
class Selection:
    experiment: Path
    classes: list[str]
    candidates: list[dict]  # ranked, best first
    winner: dict
    postprocessing: dict
    recipe: dict
    notes: list[str]
    settings: dict


# ---- reading the experiment -----------------------------------------------------------------------------

def _plan(run: RunResults) -> Plan:
    fold = layout.fold_dir(run.path, run.folds[0])
    try:
        return Plan.load(fold / layout.PLAN)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MedsegError(f"{fold / layout.PLAN}: cannot read the run's plan ({e})") from e


def _read_run(results: RunResults, notes: list[str]) -> Run | None:
    """The run as a candidate, or None (with a note) where its cross-validation is incomplete."""
    expected = expected_folds(results.path) or (max(results.folds + results.unfinished, default=-1) + 1)
    missing = sorted(set(range(expected)) - set(results.folds))
    if missing:
        notes.append(f"{results.name}: fold(s) {', '.join(map(str, missing))} of {expected} not finished; "
                     "not a candidate")
        return None
    scheme = _plan(results).label_scheme
    names, _ = scheme_targets(scheme)
    columns = [f"dice_{n}" for n in names.values()]
    dice = {r["case_id"]: {c[len("dice_"):]: case_value(r, c) for c in columns} for r in results.rows}
    case_fold = {r["case_id"]: int(r["fold"]) for r in results.rows}
    run = Run(results, expected, scheme, case_fold, dice)
    run.missing_probabilities = [c for c, k in sorted(case_fold.items())
                                 if not probability_file(layout.fold_dir(results.path, k) / layout.VALIDATION,
                                                         c).is_file()]
    if run.missing_probabilities:
        notes.append(f"{results.name}: no stored probabilities for {len(run.missing_probabilities)} of {len(dice)} "
                     f"case(s) (e.g. {run.missing_probabilities[0]}); ranked alone, not ensembled (train with "
                     "validation.save_probabilities=true: a finished fold then writes the missing files)")
    return run


def _manifest(run: Run) -> Manifest:
    """The dataset the run was trained on (references of the held-out cases), from its fold's config."""
    fold = layout.fold_dir(run.path, min(run.case_fold.values()))
    cfg = OmegaConf.load(fold / layout.CONFIG)
    assert isinstance(cfg, DictConfig)  # a composed training config
    try:
        return load_manifest(cfg.data, dataset_folder(cfg))
    except (OSError, MedsegError) as e:
        raise MedsegError(f"{fold / layout.CONFIG}: the run's dataset cannot be read to score ensembles ({e})") from e


# ---- ensembles from stored probabilities ------------------------------------------------------------------

def _ensemble_label(runs: list[Run], case_id: str, cache: dict[str, np.ndarray]) -> np.ndarray:
    parts = []
    for run in runs:
        if run.name not in cache:
            folder = layout.fold_dir(run.path, run.case_fold[case_id]) / layout.VALIDATION
            cache[run.name] = read_probabilities(probability_file(folder, case_id)).values
        parts.append(cache[run.name])
    mean = average_probabilities(parts)
    return np.asarray(runs[0].scheme.to_labels(mean, dim=0)).astype(np.int16)


def _score_pairs(pairs: list[tuple[Run, Run]], manifest: Manifest) -> dict[tuple[str, str], dict]:
    """Per pair, case -> class -> Dice of the averaged probabilities; one pass over the cases, each case's
    reference and probability files read once."""
    scheme = pairs[0][0].scheme
    names, members = scheme_targets(scheme)
    cases = sorted(set.intersection(*[set(r.case_fold) for pair in pairs for r in pair]))
    out: dict[tuple[str, str], dict] = {(a.name, b.name): {} for a, b in pairs}
    for case_id in cases:
        reference, _ = read_label(_reference(manifest, case_id))
        cache: dict[str, np.ndarray] = {}
        for a, b in pairs:
            label = _ensemble_label([a, b], case_id, cache)
            if label.shape != reference.shape:
                raise MedsegError(f"{case_id}: stored probabilities of {a.name} / {b.name} have shape {label.shape}, "
                                  f"the reference {reference.shape}; were the runs trained on other data?")
            out[(a.name, b.name)][case_id] = {names[c]: d for c, d in case_dice(
                label, reference, names, members, scheme.ignore_label).items()}
    return out


def _reference(manifest: Manifest, case_id: str):
    case = manifest.case(case_id)
    if case.label is None:
        raise MedsegError(f"{case_id}: the dataset has no reference label for this held-out case")
    return case.label


def _ensemble_postprocessing(runs: list[Run], manifest: Manifest) -> tuple[dict, dict]:
    scheme = runs[0].scheme
    names, members = scheme_targets(scheme)
    rows = []
    for case_id in sorted(runs[0].case_fold):
        reference, _ = read_label(_reference(manifest, case_id))
        label = _ensemble_label(runs, case_id, {})
        rows.append(candidate_rows(case_id, label, reference, names, scheme.ignore_label,
                                   members if scheme.has_regions else None))
    spec, evidence = decide(rows, names, members if scheme.has_regions else None)
    return spec.to_dict(), evidence


# ---- ranking and statistics -------------------------------------------------------------------------------

def _compare(candidates: list[Candidate], best: Candidate, n_resamples: int, confidence: float, alpha: float,
             seed: int) -> list[dict]:
    """Each candidate against the best single run on the cases both have, as the leaderboard compares runs."""
    base = best.case_means()
    rows = []
    for cand in candidates:
        means = cand.case_means()
        row: dict = {"candidate": cand.name, "runs": list(cand.runs), "cases": len(means),
                     "dice_mean": cand.score(),
                     "dice_per_class": {n: nanmean([d.get(n, math.nan) for d in cand.dice.values()])
                                        for n in next(iter(cand.dice.values()), {})}}
        if cand is not best:
            row.update(paired_comparison(means, base, "", n_resamples, confidence, seed))
        rows.append(row)
    adjust_holm(rows, "", alpha)
    return rows


def _rank_key(c: Candidate):
    score = c.score()
    return (-score if not math.isnan(score) else math.inf, len(c.runs), c.name)


def _costs(runs: list[Run]) -> dict:
    """Costs of a candidate: its runs' sums. Inference: a validation case is predicted by one fold's model; the
    deployed fold ensemble runs every fold, so its seconds per case are the folds times that."""
    per_run = [(run, run_costs(run.results), run.results.model_summary or {}) for run in runs]

    def total(values):
        values = [v for v in values if v is not None]
        return float(sum(values)) if len(values) == len(per_run) else None

    return {"parameters": total(s.get("parameters") for _, _, s in per_run),
            "gflops": total(s.get("gflops") for _, _, s in per_run),
            "train_h_total": total(c["train_h_total"] for _, c, _ in per_run),
            "peak_gpu_memory_gb": max((c["peak_gpu_memory_gb"] for _, c, _ in per_run
                                       if c["peak_gpu_memory_gb"] is not None), default=None),
            "peak_rss_gb": max((c["peak_rss_gb"] for _, c, _ in per_run if c["peak_rss_gb"] is not None),
                               default=None),
            "inference_s_per_case_one_model": total(c["inference_s_per_case"] for _, c, _ in per_run),
            "inference_s_per_case_deployed": total(c["inference_s_per_case"] * r.expected_folds
                                                   if c["inference_s_per_case"] is not None else None
                                                   for r, c, _ in per_run)}


# ---- the recipe -------------------------------------------------------------------------------------------

def _mirror_setting(runs: list[Run]) -> tuple[str, str | None]:
    """The predict mirror_axes that repeats the validations' test-time mirroring, and a note where no single
    setting can."""
    chosen = []
    for run in runs:
        rec = run.results.record
        axes = list(rec.validation.get("mirror_axes") or []) if rec is not None else None
        dims = rec.spatial_dims if rec is not None else None
        chosen.append("all" if axes is not None and dims is not None and axes == list(range(dims))
                      else json.dumps(axes) if axes is not None else "all")
    if len(set(chosen)) == 1:
        return chosen[0].replace(" ", ""), None
    return "all", ("the runs were validated with different test-time mirroring (" + ", ".join(
        f"{r.name}: {c}" for r, c in zip(runs, chosen)) + "); medseg-predict applies one setting to all")


def _overlap(runs: list[Run]) -> float:
    rec = runs[0].results.record
    return float(rec.validation.get("overlap", 0.5)) if rec is not None else 0.5


def _train_overrides(run: Run) -> list[str] | None:
    """The command-line overrides the run's first fold was trained with (Hydra's record), without fold=."""
    fold = layout.fold_dir(run.path, min(run.case_fold.values()))
    # the fold's record of them, else (folds trained before it) Hydra's own in a single run's output folder
    found = [fold / layout.OVERRIDES] if (fold / layout.OVERRIDES).is_file() \
        else sorted(fold.glob("hydra/*/.hydra/overrides.yaml"))
    if not found:
        return None
    try:
        overrides = yaml.safe_load(found[-1].read_text()) or []
    except (OSError, yaml.YAMLError):
        return None
    return [o for o in overrides if not str(o).startswith(("fold=", "hydra.", "overwrite="))]


def _recipe(runs: list[Run], experiment: Path, postprocessing_file: Path) -> dict:
    paths = [str(r.path.resolve()) for r in runs]
    mirror, mirror_note = _mirror_setting(runs)
    ckpt = paths[0] if len(paths) == 1 else "[" + ",".join(paths) + "]"
    args = [f"ckpt_dir={ckpt}", "input=<images>", "output=<predictions>", f"overlap={_overlap(runs)}",
            f"mirror_axes={mirror}",
            f"postprocessing={postprocessing_file}"]
    predict = "medseg-predict " + " ".join(shlex.quote(a) if "[" in a else a for a in args)
    all_data = [layout.fold_dir(r.path, layout.ALL_FOLD) for r in runs]
    trained_all = [d for d in all_data if layout.checkpoint(d).is_file()]
    train_all = []
    for run in runs:
        overrides = _train_overrides(run)
        if overrides is not None:
            train_all.append("medseg-train " + " ".join(shlex.quote(o) for o in overrides + ["fold=all"]))
    folds = max(r.expected_folds for r in runs)
    notes = [mirror_note] if mirror_note else []
    recipe: dict = {
        "predict": predict,
        "export": (f"medseg-export run_dir={paths[0]} output=<model>.zip" if len(runs) == 1 else None),
        "recommendation": "fold_ensemble",
        "why": (f"the {folds}-fold ensemble is the model whose accuracy cross-validation measured (every case was "
                "scored by a fold that had not seen it); an all-data model (fold=all) trains on every case and "
                f"predicts {folds} times faster, but nothing measures it: use it where inference time matters more "
                "than a validated estimate"),
        "all_data_predict": ("medseg-predict ckpt_dir=" + (str(trained_all[0]) if len(trained_all) == 1 else
                                                          "[" + ",".join(map(str, trained_all)) + "]")
                             + " input=<images> output=<predictions>" if len(trained_all) == len(runs) else None),
        "all_data_train": train_all or None,
        "notes": notes,
    }
    if len(trained_all) < len(runs):
        notes.append("no all-data model (fold_all) is trained for " + ", ".join(
            r.name for r, d in zip(runs, all_data) if d not in trained_all))
    return recipe


# ---- the whole selection --------------------------------------------------------------------------------

def select(experiment_dir: str | Path, n_resamples: int = 10000, confidence: float = 0.95, alpha: float = 0.05,
           seed: int = 0, ensembles: bool = True) -> Selection:
    experiment = Path(experiment_dir)
    if not experiment.is_dir():
        raise MedsegError(f"{experiment}: no such directory")
    notes: list[str] = []
    runs = []
    for folder in layout.find_runs(experiment):
        results = load_run(folder)
        if not results.folds:
            notes.append(f"{results.name}: no finished fold; not a candidate")
        elif (run := _read_run(results, notes)) is not None:
            runs.append(run)
    if not runs:
        raise MedsegError(f"{experiment}: no run with every cross-validation fold finished (fold_<k>/metrics.json); "
                          + ("; ".join(notes) if notes else "nothing trained there"))
    reference_scheme = runs[0].scheme
    for run in runs[1:]:
        if run.scheme != reference_scheme:
            notes.append(f"{run.name}: other labels than {runs[0].name}; not a candidate")
    runs = [r for r in runs if r.scheme == reference_scheme]
    names, _ = scheme_targets(reference_scheme)
    by_name = {r.name: r for r in runs}
    singles = [Candidate((r.name,), r.dice) for r in runs]
    pairs = [(a, b) for a, b in itertools.combinations(runs, 2)
             if ensembles and not a.missing_probabilities and not b.missing_probabilities]
    manifest = _manifest(runs[0]) if pairs else None
    ensembles_scored = _score_pairs(pairs, manifest) if pairs and manifest is not None else {}
    candidates = singles + [Candidate(key, dice) for key, dice in ensembles_scored.items()]
    candidates.sort(key=_rank_key)
    best_single = min(singles, key=_rank_key)
    rows = _compare(candidates, best_single, n_resamples, confidence, alpha, seed)
    for rank, (cand, row) in enumerate(zip(candidates, rows), 1):
        members = [by_name[n] for n in cand.runs]
        row["rank"] = rank
        row["per_fold"] = {str(k): float(np.nanmean([m for c, m in cand.case_means().items()
                                                   if members[0].case_fold.get(c) == k]))
                           for k in sorted({members[0].case_fold[c] for c in cand.dice})}
        row.update(_costs(members))
    winner = candidates[0]
    winner_runs = [by_name[n] for n in winner.runs]
    if len(winner_runs) == 1:
        spec, evidence = decide_for_run(winner_runs[0].path)
        decision = {**spec.to_dict(), "evidence": evidence}
    else:
        assert manifest is not None  # an ensemble won, so ensembles were scored
        spec_dict, evidence = _ensemble_postprocessing(winner_runs, manifest)
        decision = {**spec_dict, "evidence": evidence}
    notes += training_notes([r.results for r in runs])
    recipe = _recipe(winner_runs, experiment, experiment.resolve() / POSTPROCESSING_FILE)
    return Selection(experiment, list(names.values()), rows, rows[0], decision, recipe, notes,
                     {"n_resamples": n_resamples, "confidence": confidence, "alpha": alpha, "seed": seed,
                      "best_single": best_single.name})


def write_selection(selection: Selection) -> str:
    """selection.json, selection.md and selection_postprocessing.json (the winner's decision) in the
    experiment folder, each written atomically; returns the markdown."""
    experiment = selection.experiment
    # always written (a decision that enables nothing included), so the recipe's file is this selection's
    write_json(experiment / POSTPROCESSING_FILE, selection.postprocessing)
    write_json(experiment / SELECTION_JSON, {
        "experiment": str(experiment), "classes": selection.classes, "settings": selection.settings,
        "winner": selection.winner["candidate"], "ranking": selection.candidates,
        "postprocessing": selection.postprocessing, "recipe": selection.recipe, "notes": selection.notes})
    markdown = selection_markdown(selection)
    write_text(experiment / SELECTION_MD, markdown)
    return markdown


# ---- report -------------------------------------------------------------------------------------------------

def selection_markdown(s: Selection) -> str:
    pct = f"{s.settings['confidence']:.0%}"
    out = [f"# Selection: {s.experiment.name}", "",
           f"Chosen: **{s.winner['candidate']}** (mean foreground Dice {fmt(s.winner['dice_mean'])} over "
           f"{s.winner['cases']} out-of-fold cases).", "",
           "Out-of-fold predictions only. Dice: the mean over cases of each case's mean over "
           f"{', '.join(s.classes)}. ΔDice: against the best single run `{s.settings['best_single']}` on the cases "
           f"both have, {pct} percentile bootstrap ({s.settings['n_resamples']} resamples, seed {s.settings['seed']}); "
           f"p: Wilcoxon signed-rank; Holm across the comparisons; * significant at {s.settings['alpha']}. "
           "An ensemble averages its runs' probabilities. Cost: sums over an ensemble's runs (memory: the largest); "
           "training hours over all folds; inference: seconds per case of the deployed fold ensemble (the "
           "validation's seconds per case, one fold's model, times the folds).", ""]
    header = ["rank", "candidate", "cases", "Dice mean", *(f"Dice {c}" for c in s.classes), f"ΔDice [{pct} CI]",
              "p", "p Holm", "parameters (M)", "GFLOPs", "training (h)", "peak GPU memory / RSS (GB)",
              "inference (s/case, deployed)"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in s.candidates:
        diff = ("best single run" if "dice_diff" not in r else
                f"{r['dice_diff']:+.4f} [{r['dice_diff_low']:+.4f}, {r['dice_diff_high']:+.4f}]"
                + (" *" if r.get("significant") else ""))
        out.append("| " + " | ".join([
            str(r["rank"]), f"`{r['candidate']}`", str(r["cases"]), fmt(r["dice_mean"]),
            *(fmt(r["dice_per_class"].get(c)) for c in s.classes), diff, fmt_p(r.get("p_value")),
            fmt_p(r.get("p_holm")), fmt(r["parameters"] / 1e6 if r["parameters"] else None, 2), fmt(r["gflops"], 2),
            fmt(r["train_h_total"], 2), f"{fmt(r['peak_gpu_memory_gb'], 2)} / {fmt(r['peak_rss_gb'], 2)}",
            fmt(r["inference_s_per_case_deployed"], 2)]) + " |")
    pp = s.postprocessing
    ev = pp["evidence"]["all_foreground"]
    out += ["", "## Post-processing of the chosen model", "",
            f"Keep the largest foreground component: {'on' if pp['all_foreground'] else 'off'} (mean foreground Dice "
            f"{fmt(ev['foreground_mean_before'])} -> {fmt(ev['foreground_mean_after'])}); per class: "
            + (", ".join(map(str, pp["classes"])) if pp["classes"] else "none") + "."]
    rec = s.recipe
    out += ["", "## Inference recipe", "", "```bash", rec["predict"], "```", "",
            f"Recommended: the fold ensemble. Why: {rec['why']}."]
    if rec.get("export"):
        out += ["", "As a shareable archive: `" + rec["export"] + "`."]
    if rec.get("all_data_predict"):
        out += ["", "The all-data model: `" + rec["all_data_predict"] + "`."]
    if rec.get("all_data_train"):
        out += ["", "To train the all-data model:", "", "```bash", *rec["all_data_train"], "```"]
    if rec.get("notes"):
        out += ["", *(f"- {n}" for n in rec["notes"])]
    if s.notes:
        out += ["", "## Not considered, or to keep in mind", "", *(f"- {n}" for n in s.notes)]
    return "\n".join(out) + "\n"
