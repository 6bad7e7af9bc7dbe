"""Variant leaderboard: the finished runs (``<model>__<loss>``) of one experiment side by side.

Per run, over the validation cases of all its finished folds: mean and std of Dice, HD95 and surface Dice per
class and of their per-case mean over classes (as the CV summary); parameters and forward GFLOPs of one patch
(``fold_<k>/model_summary.json``); the budget (epochs x iterations per epoch x batch) and the costs each fold records in
``metrics.json`` under ``timing`` (medseg.training.timing): median epoch time, training wall time summed over
folds, peak GPU memory and process RSS (maximum over folds), inference seconds per case.

Each run is compared with a baseline run on the cases both have (paired by case id; ``n`` says how many):
the per-case mean Dice difference (run - baseline), a seeded percentile-bootstrap confidence interval of its
mean, the Wilcoxon signed-rank p-value, and Holm's adjustment of those p-values across all the runs compared.
A comparison is significant when the adjusted p is at most ``alpha``.

A run whose model has an ablation control in the experiment (model ``<model>_control``: the same network with
the family's distinctive block replaced by identity; same loss and configuration) is also compared with that
control the same way (run - control; Holm across the control comparisons only): "family vs its own control"
says whether the block earns its cost, apart from "family vs U-Net", where the whole network differs.

Runs or folds that are missing or unfinished are listed in the report, not fatal: the means of a run cover
the folds it has, and the paired tests only the cases both runs have. So are unequal budgets (epochs x
iterations per epoch x batch, from each fold's config.yaml and plan.json) and unequal optimisers or schedulers
(from each run's run.json), naming what each run used, and a family and control not trained alike.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medseg.errors import MedsegError
from medseg.evaluation.cv_summary import case_value, metric_columns, nanmean, read_case_rows
from medseg.layout import RUN_RECORD, find_runs, indexed_fold_dirs, is_finished
from medseg.record import Component, RunRecord
from medseg.evaluation.metrics import METRICS, metric_stats
from medseg.evaluation.statistics import bootstrap_ci, holm, paired_wilcoxon

DEFAULT_BASELINE = "unet__dice_ce"
METRIC_LABELS = {"dice": "Dice", "hd95": "HD95 (mm)", "nsd": "surface Dice"}
PLOT_DICE = "leaderboard_dice.png"
PLOT_COST = "leaderboard_cost.png"
# a family's ablation control is the model "<family>_control" (medseg.models.registry.CONTROL_SUFFIX; not imported
# from there, which would load every model family into the report tool)
CONTROL_SUFFIX = "_control"


@dataclass
class RunResults:
    name: str
    path: Path
    folds: list[int] = field(default_factory=list)  # finished: metrics.json and validation/per_case.csv
    unfinished: list[int] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # per-case rows of the finished folds
    metrics: dict[int, dict] = field(default_factory=dict)  # metrics.json per finished fold
    model_summary: dict | None = None  # the first finished fold's model_summary.json
    budgets: set[tuple] = field(default_factory=set)  # (epochs, iterations per epoch, batch) of finished folds
    record: RunRecord | None = None  # the first finished fold's run record (runs of older versions have none)

    @property
    def model(self) -> str:
        if self.record is not None:
            return self.record.model.name
        return self.name.split("__")[0]  # runs written before run records: <model>__<loss>[__<configuration>]

    @property
    def loss(self) -> str:
        if self.record is not None:
            return self.record.loss.name
        parts = self.name.split("__")
        return parts[1] if len(parts) > 1 else ""

    @property
    def configuration(self) -> str:
        if self.record is not None:
            return self.record.configuration
        parts = self.name.split("__")
        return parts[2] if len(parts) > 2 else "3d_fullres"  # the folder name leaves the default one out

    def case_mean_dice(self) -> dict[str, float]:
        """case id -> mean Dice over classes (NaN classes skipped)."""
        cols = metric_columns(self.rows).get("dice", [])
        return {r["case_id"]: nanmean([case_value(r, c) for c in cols]) for r in self.rows}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _record(fold_dir: Path) -> RunRecord | None:
    try:
        return RunRecord.load(fold_dir / RUN_RECORD) if (fold_dir / RUN_RECORD).is_file() else None
    except MedsegError:
        return None


def _budget(fold_dir: Path, metrics: dict) -> tuple:
    """(epochs, iterations per epoch, batch size) from the fold's run record, else (older runs) from its config
    and plan, else from metrics.json; None where unknown."""
    record = _record(fold_dir)
    if record is not None:
        return metrics.get("epochs", record.max_epochs), record.iterations_per_epoch, record.batch_size
    epochs, iterations = metrics.get("epochs"), (metrics.get("timing") or {}).get("iterations_per_epoch")
    batch = None
    try:
        cfg = OmegaConf.load(fold_dir / "config.yaml")
    except (OSError, ValueError, OmegaConfBaseException, yaml.YAMLError):
        return epochs, iterations, batch
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=epochs)
    iterations = OmegaConf.select(cfg, "sampling.iterations_per_epoch", default=iterations)
    batch = OmegaConf.select(cfg, "sampling.batch_size", default=None)
    if batch is None:  # null: the plan's batch size
        plan = _read_json(fold_dir / "plan.json") or {}
        configuration = OmegaConf.select(cfg, "configuration", default="3d_fullres")
        batch = plan.get("configurations", {}).get(configuration, {}).get("batch_size")
    return epochs, iterations, batch


def load_run(run_dir: Path) -> RunResults:
    run = RunResults(run_dir.name, run_dir)
    for k, fold_dir in indexed_fold_dirs(run_dir):
        metrics = _read_json(fold_dir / "metrics.json") if is_finished(fold_dir) else None
        if metrics is None:
            run.unfinished.append(k)
            continue
        run.folds.append(k)
        run.metrics[k] = metrics
        run.rows += read_case_rows(fold_dir)
        run.budgets.add(_budget(fold_dir, metrics))
        if run.model_summary is None:
            run.model_summary = _read_json(fold_dir / "model_summary.json")
        if run.record is None:
            run.record = _record(fold_dir)
    return run


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def run_costs(run: RunResults) -> dict:
    """Cost figures over the run's finished folds; None where no fold recorded them."""
    timings = [(m.get("timing") or {}, m.get("num_cases", 0)) for m in run.metrics.values()]

    def values(key):
        return _finite(t.get(key) for t, _ in timings)

    epoch_s, train_s = values("epoch_s_median"), values("train_s")
    gpu, rss = values("peak_gpu_memory_gb"), values("peak_rss_gb")
    inference = [(t["inference_s_per_case"], n) for t, n in timings
                 if t.get("inference_s_per_case") is not None and n]
    return {
        "epoch_s_median": float(np.median(epoch_s)) if epoch_s else None,
        "train_h_total": sum(train_s) / 3600 if train_s else None,
        "train_h_per_fold": float(np.mean(train_s)) / 3600 if train_s else None,
        "peak_gpu_memory_gb": max(gpu) if gpu else None,
        "peak_rss_gb": max(rss) if rss else None,
        # weighted by each fold's case count: the mean over all validated cases
        "inference_s_per_case": float(np.average([s for s, _ in inference], weights=[n for _, n in inference]))
        if inference else None,
        "device": ", ".join(sorted({str(t["device"]) for t, _ in timings if t.get("device")})) or None,
    }


def _accuracy(run: RunResults, classes: list[str]) -> dict:
    out = {}
    columns = metric_columns(run.rows)
    for metric in METRICS:
        cols = columns.get(metric, [])
        s = metric_stats([nanmean([case_value(r, c) for c in cols]) for r in run.rows])
        out[f"{metric}_mean"], out[f"{metric}_mean_std"] = s["mean"], s["std"]
        for name in classes:
            s = metric_stats([case_value(r, f"{metric}_{name}") for r in run.rows])
            out[f"{metric}_{name}"], out[f"{metric}_{name}_std"] = s["mean"], s["std"]
    return out


@dataclass
class Leaderboard:
    experiment: str
    baseline: str
    classes: list[str]
    rows: list[dict]  # one per run with a finished fold, best mean Dice first
    runs: dict[str, RunResults]
    notes: list[str]
    confidence: float
    alpha: float
    n_resamples: int
    seed: int


def _classes(runs: list[RunResults]) -> list[str]:
    cols = metric_columns([r for run in runs for r in run.rows]).get("dice", [])
    return [c[len("dice_"):] for c in cols]


def _choose_baseline(names: list[str], baseline: str | None) -> str:
    if baseline:
        if baseline not in names:
            raise MedsegError(f"baseline {baseline!r} has no finished fold; runs with results: {names}")
        return baseline
    return DEFAULT_BASELINE if DEFAULT_BASELINE in names else names[0]


def _notes(runs: list[RunResults], finished: list[RunResults]) -> list[str]:
    notes = []
    all_folds = sorted({k for run in runs for k in run.folds + run.unfinished})
    for run in runs:
        if not run.rows:
            notes.append(f"{run.name}: no finished fold with validated cases (unfinished: "
                         f"{_fold_list(run.unfinished)}); not ranked")
            continue
        missing = [k for k in all_folds if k not in run.folds]
        if missing:
            unfinished = [k for k in missing if k in run.unfinished]
            detail = f" ({_fold_list(unfinished)} unfinished)" if unfinished else ""
            notes.append(f"{run.name}: fold(s) {_fold_list(missing)} missing{detail}; its figures cover "
                         f"{_fold_list(run.folds)} only")
    return notes + training_notes(finished)


# what each run's record says it trained with: (note word, the component, keys always shown)
_TRAINING: list[tuple[str, Callable[[RunRecord], Component | None], tuple[str, ...]]] = [
    ("optimisers", lambda record: record.optimizer, ("lr",)),
    ("schedulers", lambda record: record.scheduler, ())]


def _component_key(component: Component | None) -> str:
    return "" if component is None else json.dumps([component.name, component.kwargs], sort_keys=True, default=str)


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return str(value)


def _component_text(component: Component | None, keys: Sequence[str]) -> str:
    """'AdamW lr 0.001 betas [0.9, 0.999]': the target's last name and ``keys`` where it has them."""
    if component is None:
        return "none"
    name = component.name.rsplit(".", 1)[-1] or "?"
    return " ".join([name] + [f"{k} {_value_text(component.kwargs[k])}" for k in keys if k in component.kwargs])


def training_notes(finished: list[RunResults]) -> list[str]:
    """Unequal budgets, optimisers or schedulers across the ranked runs, each run with what it used (the keys that
    differ between runs, and the learning rate); runs without a run record are listed as unknown."""
    notes = []
    budgets = {b for run in finished for b in run.budgets}
    if len(budgets) > 1:
        per_run = "; ".join(f"{run.name} {budget_text(run)}" for run in finished)
        notes.append(f"unequal training budgets (epochs x iterations per epoch x batch): {per_run}")
    for word, get, always in _TRAINING:
        known = {run.name: get(run.record) for run in finished if run.record is not None}
        if len({_component_key(c) for c in known.values()}) < 2:
            continue
        kwargs = [c.kwargs if c is not None else {} for c in known.values()]
        # a key one run lacks differs from any value (None included) another run gives it
        differing = sorted({k for kw in kwargs for k in kw
                            if len({_value_text(x[k]) if k in x else None for x in kwargs}) > 1})
        keys = [*always, *(k for k in differing if k not in always)]
        per_run = "; ".join(f"{run.name} {_component_text(known[run.name], keys)}" if run.name in known
                            else f"{run.name} unknown (no run.json)" for run in finished)
        notes.append(f"unequal {word}: {per_run}")
    return notes


def _unmatched(run: RunResults, control: RunResults) -> list[str]:
    """What a run and its control were not trained alike in (budget, optimiser, scheduler)."""
    differs = ["budget"] if run.budgets != control.budgets else []
    if run.record is not None and control.record is not None:
        differs += [word[:-1] for word, get, _ in _TRAINING
                    if _component_key(get(run.record)) != _component_key(get(control.record))]
    return differs


def _control_pairs(finished: list[RunResults]) -> list[tuple[RunResults, RunResults]]:
    """(run, its control run) for every run whose model has a control run of the same loss and configuration."""
    by_key: dict[tuple[str, str, str], RunResults] = {}
    for run in sorted(finished, key=lambda r: r.name):
        by_key.setdefault((run.model, run.loss, run.configuration), run)
    pairs = []
    for run in finished:
        control = by_key.get((run.model + CONTROL_SUFFIX, run.loss, run.configuration))
        if control is not None:
            pairs.append((run, control))
    return pairs


def _control_notes(finished: list[RunResults], pairs: list[tuple[RunResults, RunResults]]) -> list[str]:
    notes = []
    paired = {control.name for _, control in pairs}
    for run in finished:
        if run.model.endswith(CONTROL_SUFFIX) and run.name not in paired:
            notes.append(f"{run.name}: a control without a {run.model[:-len(CONTROL_SUFFIX)]} run of the same loss "
                         f"and configuration ({run.loss}, {run.configuration}); not compared")
    for run, control in pairs:
        differs = _unmatched(run, control)
        if differs:
            notes.append(f"{run.name} vs its control {control.name}: unequal {', '.join(differs)}; the "
                         "comparison is not matched")
    return notes


def _fold_list(folds: list[int]) -> str:
    return ", ".join(str(k) for k in folds) or "none"


def budget_text(run: RunResults) -> str:
    return " / ".join(" x ".join("?" if v is None else str(v) for v in b)
                      for b in sorted(run.budgets, key=str)) or "unknown"


CONTROL_PREFIX = "control_"  # the columns of the comparison with the run's own control


def paired_comparison(dice: dict[str, float], other: dict[str, float], prefix: str, n_resamples: int,
                      confidence: float, seed: int) -> dict:
    """Per-case mean Dice of a run minus another's on the cases both have (paired by case id): the mean with a
    percentile-bootstrap interval and the Wilcoxon signed-rank test, under column names starting ``prefix``."""
    common = sorted(set(dice) & set(other))
    a = np.array([dice[c] for c in common])
    b = np.array([other[c] for c in common])
    ci = bootstrap_ci(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
    test = paired_wilcoxon(a, b)
    return {f"{prefix}paired_cases": ci.n, f"{prefix}dice_diff": ci.mean, f"{prefix}dice_diff_low": ci.low,
            f"{prefix}dice_diff_high": ci.high, f"{prefix}wilcoxon_stat": test.statistic,
            f"{prefix}p_value": test.pvalue}


def adjust_holm(rows: list[dict], prefix: str, alpha: float) -> None:
    """Holm's adjustment across the rows holding a ``prefix`` comparison, and whether each is significant."""
    compared = [r for r in rows if f"{prefix}p_value" in r]
    for r, p in zip(compared, holm([r[f"{prefix}p_value"] for r in compared])):
        r[f"{prefix}p_holm"] = float(p)
        r[f"{prefix}significant"] = bool(p <= alpha)


def build_leaderboard(experiment_dir: Path, baseline: str | None = None, n_resamples: int = 10000,
                      confidence: float = 0.95, alpha: float = 0.05, seed: int = 0) -> Leaderboard:
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise MedsegError(f"{experiment_dir}: no such directory")
    runs = [load_run(d) for d in find_runs(experiment_dir)]
    finished = [run for run in runs if run.rows]
    if not finished:
        raise MedsegError(f"{experiment_dir}: no finished folds (fold_<k>/metrics.json) found")
    by_name = {run.name: run for run in finished}
    base_name = _choose_baseline(list(by_name), baseline)
    classes = _classes(finished)

    base_dice = by_name[base_name].case_mean_dice()

    def paired(dice: dict[str, float], other: dict[str, float], prefix: str) -> dict:
        return paired_comparison(dice, other, prefix, n_resamples, confidence, seed)

    rows = []
    for run in finished:
        summary = run.model_summary or {}
        row = {"run": run.name, "model": run.model, "loss": run.loss, "folds": _fold_list(run.folds),
               "cases": len(run.rows), **_accuracy(run, classes),
               "parameters": summary.get("parameters"), "gflops": summary.get("gflops"),
               "patch": "x".join(str(s) for s in summary.get("input_shape", [])[2:]) or None,
               "budget": budget_text(run), **run_costs(run)}
        if run.name != base_name:
            row.update(paired(run.case_mean_dice(), base_dice, ""))
        rows.append(row)
    adjust_holm(rows, "", alpha)
    # each family against its own control, Holm across these comparisons
    pairs = _control_pairs(finished)
    by_run = {r["run"]: r for r in rows}
    for run, control in pairs:
        by_run[run.name]["control_run"] = control.name
        by_run[run.name].update(paired(run.case_mean_dice(), control.case_mean_dice(), CONTROL_PREFIX))
    adjust_holm(rows, CONTROL_PREFIX, alpha)
    rows.sort(key=lambda r: (-r["dice_mean"] if not math.isnan(r["dice_mean"]) else math.inf, r["run"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    notes = _notes(runs, finished) + _control_notes(finished, pairs)
    return Leaderboard(experiment_dir.name, base_name, classes, rows, by_name, notes, confidence, alpha,
                       n_resamples, seed)


# ---- report ----------------------------------------------------------------------------------------------

def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _pm(row: dict, key: str, digits: int = 4) -> str:
    if row.get(key) is None or math.isnan(row[key]):
        return "-"
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"


def fmt_p(value) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def _comparison(row: dict, board: Leaderboard, prefix: str = "") -> str:
    if not prefix and row["run"] == board.baseline:
        return "baseline"
    if not row.get(f"{prefix}paired_cases"):
        return "no common cases"
    mark = " *" if row[f"{prefix}significant"] else ""
    return (f"{row[f'{prefix}dice_diff']:+.4f} [{row[f'{prefix}dice_diff_low']:+.4f}, "
            f"{row[f'{prefix}dice_diff_high']:+.4f}]{mark}")


def _difference(row: dict, other: dict | None, key: str, scale: float, digits: int) -> str:
    if other is None or row.get(key) is None or other.get(key) is None:
        return "-"
    return f"{(row[key] - other[key]) * scale:+.{digits}f}"


def _control_section(board: Leaderboard) -> list[str]:
    rows = [r for r in board.rows if "control_run" in r]
    if not rows:
        return []
    pct = f"{board.confidence:.0%}"
    by_run = {r["run"]: r for r in board.rows}
    out = ["", "## Family vs its own control", "",
           "The control is the same network with the family's distinctive block (Mamba, mLSTM or transformer "
           "blocks) replaced by identity, trained with the same loss and configuration. ΔDice: per-case mean "
           f"Dice of the family minus its control's on the cases both have (positive: the block helps), {pct} "
           f"percentile-bootstrap interval; p: Wilcoxon signed-rank, two-sided; Holm: adjusted across the "
           f"{len(rows)} control comparison{'s' if len(rows) > 1 else ''}; * significant at {board.alpha} after "
           "Holm. Block cost: the family's parameters and GFLOPs minus the control's.", ""]
    out += _table(["family", "control", f"ΔDice [{pct} CI]", "paired cases", "p", "p Holm", "block parameters (M)",
                   "block GFLOPs"],
                  [[f"`{r['run']}`", f"`{r['control_run']}`", _comparison(r, board, CONTROL_PREFIX),
                    str(r["control_paired_cases"]), fmt_p(r["control_p_value"]), fmt_p(r["control_p_holm"]),
                    _difference(r, by_run.get(r["control_run"]), "parameters", 1e-6, 2),
                    _difference(r, by_run.get(r["control_run"]), "gflops", 1.0, 1)] for r in rows])
    return out


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def leaderboard_markdown(board: Leaderboard, plots: Sequence[str] = ()) -> str:
    pct = f"{board.confidence:.0%}"
    out = [f"# Leaderboard: {board.experiment}", "",
           f"Baseline `{board.baseline}`. Mean ± std over the validation cases of each run's finished folds; "
           "\"mean\" is the per-case mean over classes. ΔDice: per-case mean Dice of the run minus the baseline's "
           f"on the cases both have, with a {pct} percentile-bootstrap interval ({board.n_resamples} resamples, "
           f"seed {board.seed}); p: Wilcoxon signed-rank, two-sided; Holm: adjusted across the "
           f"{sum('p_value' in r for r in board.rows)} comparisons; * significant at {board.alpha} after Holm.", ""]
    out += _table(["rank", "run", "folds", "cases", "Dice mean", "HD95 mean (mm)", "surface Dice mean",
                   f"ΔDice [{pct} CI]", "paired cases", "p", "p Holm"],
                  [[str(r["rank"]), f"`{r['run']}`", r["folds"], str(r["cases"]), _pm(r, "dice_mean"),
                    _pm(r, "hd95_mean", 2), _pm(r, "nsd_mean"), _comparison(r, board),
                    str(r.get("paired_cases", "-")), fmt_p(r.get("p_value")), fmt_p(r.get("p_holm"))]
                   for r in board.rows])
    out += _control_section(board)
    out += ["", "## Per class", ""]
    header = ["run"] + [f"{METRIC_LABELS[m]} {c}" for m in METRICS for c in board.classes]
    out += _table(header, [[f"`{r['run']}`"] + [_pm(r, f"{m}_{c}", 2 if m == "hd95" else 4) for m in METRICS
                                                for c in board.classes] for r in board.rows])
    out += ["", "## Cost", "",
            "Parameters and forward GFLOPs of one patch (batch 1); budget: epochs x iterations per epoch x batch; "
            "epoch: median seconds (per-epoch validation included); training: wall hours summed over folds; "
            "peak GPU memory: torch's allocated peak; RSS: peak resident memory of the training process "
            "(maximum over folds); inference: seconds per validation case (sliding window, with the run's "
            "test-time mirroring).", ""]
    out += _table(["run", "parameters (M)", "GFLOPs", "patch", "budget", "epoch (s)", "training (h)",
                   "peak GPU memory (GB)", "peak RSS (GB)", "inference (s/case)", "device"],
                  [[f"`{r['run']}`", fmt(r["parameters"] / 1e6 if r["parameters"] else None, 2),
                    fmt(r["gflops"], 1), r["patch"] or "-", r["budget"], fmt(r["epoch_s_median"], 1),
                    fmt(r["train_h_total"], 2), fmt(r["peak_gpu_memory_gb"], 2), fmt(r["peak_rss_gb"], 2),
                    fmt(r["inference_s_per_case"], 2), r["device"] or "-"] for r in board.rows])
    if board.notes:
        out += ["", "## Missing or incomplete", "", *(f"- {n}" for n in board.notes)]
    if plots:
        out += ["", "## Plots", "", *(f"![{Path(p).stem}]({Path(p).name})" for p in plots)]
    return "\n".join(out) + "\n"


def _plot_dice(board: Leaderboard, path: Path) -> None:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone

    names = [r["run"] for r in board.rows]
    labels = [f"{n} *" if r.get("significant") else n for n, r in zip(names, board.rows)]

    def class_dice(c: str) -> Callable[[RunResults], list[float]]:
        return lambda run: [case_value(r, f"dice_{c}") for r in run.rows]

    panels: list[tuple[str, Callable[[RunResults], list[float]]]] = [
        ("mean over classes", lambda run: list(run.case_mean_dice().values()))]
    panels += [(c, class_dice(c)) for c in board.classes]
    fig = Figure(figsize=(max(4.0, 0.7 * len(names) + 2) * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, values) in zip(axes, panels):
        data = [_finite(values(board.runs[n])) or [math.nan] for n in names]
        boxes = ax.boxplot(data, patch_artist=True, showmeans=True, medianprops={"color": "black"})
        for name, box in zip(names, boxes["boxes"]):
            box.set_facecolor("#f4a261" if name == board.baseline else "#8ecae6")
        ax.set_xticks(range(1, len(names) + 1), labels, rotation=30, ha="right")
        ax.set_title(f"Dice: {title}")
        ax.set_ylabel("per-case Dice")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{board.experiment}: per-case Dice (baseline {board.baseline} orange; * significant vs it)")
    fig.savefig(path, dpi=100)


def _plot_cost(board: Leaderboard, path: Path) -> bool:
    from matplotlib import colormaps
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure

    axes_spec = [("parameters", 1e-6, "parameters (M)"), ("gflops", 1.0, "GFLOPs per patch"),
                 ("epoch_s_median", 1.0, "epoch (s, median)"), ("inference_s_per_case", 1.0, "inference (s/case)")]
    axes_spec = [a for a in axes_spec if any(r.get(a[0]) is not None for r in board.rows)]
    if not axes_spec:
        return False
    cols = min(2, len(axes_spec))
    rows = math.ceil(len(axes_spec) / cols)
    fig = Figure(figsize=(5 * cols + 2.5, 4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = colormaps["tab10"]
    for ax, (key, scale, label) in zip(axes, axes_spec):
        for i, r in enumerate(board.rows):
            if r.get(key) is not None:
                ax.errorbar(r[key] * scale, r["dice_mean"], yerr=r["dice_mean_std"], fmt="o", capsize=3,
                            color=colours(i % 10), label=r["run"])
        ax.set_xlabel(label)
        ax.set_ylabel("mean Dice (± std over cases)")
        ax.grid(alpha=0.3)
    for ax in axes[len(axes_spec):]:
        ax.set_visible(False)
    legend: dict[str, Artist] = {}  # a run missing from one panel's figures may still be in another
    for ax in axes[:len(axes_spec)]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside right upper")
    fig.suptitle(f"{board.experiment}: accuracy against cost")
    fig.savefig(path, dpi=100)
    return True


CSV_FIELDS = ["rank", "run", "model", "loss", "folds", "cases"]


def write_leaderboard(board: Leaderboard, output: Path, plots: bool = True) -> str:
    """Writes leaderboard.csv, leaderboard.md and (``plots``) the PNGs to ``output``; returns the markdown."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        _plot_dice(board, output / PLOT_DICE)
        written.append(PLOT_DICE)
        if _plot_cost(board, output / PLOT_COST):
            written.append(PLOT_COST)
    fields = CSV_FIELDS + [k for r in board.rows for k in r if k not in CSV_FIELDS]
    fields = list(dict.fromkeys(fields))
    with open(output / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(board.rows)
    markdown = leaderboard_markdown(board, written)
    (output / "leaderboard.md").write_text(markdown)
    return markdown
