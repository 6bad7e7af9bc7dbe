"""Summarise a parity run (scripts/gpu/parity_hippocampus.sh): per framework and mode (eager, compiled) the epoch
times, data wait, peak GPU memory and validation Dice, and the medseg / nnU-Net ratios of like against like.
Reads the logs and result files the script saved in OUT; several OUT folders (runs spread over several calls)
are reported together, a later folder's run replacing an earlier one's. Prints markdown.

Usage: python parity_report.py OUT [OUT ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

FRAMEWORKS = {"medseg": "medseg", "nnunet": "nnunetv2"}
MODES = ("eager", "compiled")
MEDSEG_EPOCH = re.compile(r"epoch (\d+)/\d+, .*?([\d.]+) s \(train ([\d.]+) s"
                          r"(?:, [\d.]+ it/s, waiting for data ([\d.]+) s)?")
NNUNET_EPOCH = re.compile(r"Epoch time: ([\d.]+) s")
NNUNET_TIMING = re.compile(r"timing: epoch \d+ train ([\d.]+) s, waiting for data ([\d.]+) s")
NNUNET_PEAK = re.compile(r"timing: peak GPU memory allocated (?:([\d.]+) GB|n/a)")
NNUNET_WORKERS = re.compile(r"timing: loader workers running after training: train (\d+), val (\d+)")
NNUNET_NO_COMPILE = re.compile(r"torch\.compile disabled because ([^\n.]*)")
# the trainer's line; nnUNetPredictor prints "Using torch.compile" (no dots) when it compiles for the final
# validation a network that training left uncompiled
NNUNET_COMPILED = re.compile(r"Using torch\.compile\.\.\.")
NNUNET_PREDICTOR_COMPILED = re.compile(r"^Using torch\.compile$", re.M)
WALL = re.compile(r"^(?:medseg|nnunet) \w+ wall ([\d.]+) s", re.M)
FAILED = re.compile(r"^(?:medseg|nnU-Net) \w+(?: failed|: not run.*)$", re.M)
NAN = float("nan")


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else NAN


def _steady(values: list[float]) -> list[float]:
    """From the second epoch on (the first carries start-up and compilation), where there is one."""
    return values[1:] if len(values) > 1 else values


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def medseg(out: Path, mode: str) -> dict:
    text = _read(out / f"medseg_{mode}.log")
    epochs = [(float(m.group(2)), float(m.group(3)), float(m.group(4) or "nan")) for m in MEDSEG_EPOCH.finditer(text)]
    metrics = _json(out / f"medseg_{mode}_metrics.json")
    config = re.search(r"^compile: (\w+)", _read(out / f"medseg_{mode}_config.yaml"), re.M)
    ran = ("compiled" if config.group(1) == "true" else "eager") if config else None
    peak = (metrics.get("timing") or {}).get("peak_gpu_memory_gb")
    return {"log": bool(text), "ok": bool(metrics) and not FAILED.search(text), "ran": ran, "note": None,
            "epoch_s": [e for e, _, _ in epochs], "train_s": [t for _, t, _ in epochs],
            "wait_s": [w for _, _, w in epochs], "peak_gb": peak, "dice": metrics.get("dice", {}),
            "dice_mean": metrics.get("dice_mean"), "wall_s": _wall(text), "workers_left": None}


def nnunet(out: Path, mode: str, labels: dict[str, str]) -> dict:
    text = _read(out / f"nnunet_{mode}.log")
    timing = [(float(m.group(1)), float(m.group(2))) for m in NNUNET_TIMING.finditer(text)]
    summary = _json(out / f"nnunet_{mode}_summary.json")
    dice = {labels.get(k, k): v["Dice"] for k, v in summary.get("mean", {}).items()}
    mean = summary["foreground_mean"]["Dice"] if summary else None
    peak = NNUNET_PEAK.search(text)
    workers = NNUNET_WORKERS.search(text)
    no_compile = NNUNET_NO_COMPILE.search(text)
    ran = "compiled" if NNUNET_COMPILED.search(text) else ("eager" if text else None)
    note = f"nnU-Net: torch.compile disabled because {no_compile.group(1)}" if no_compile else None
    if note and NNUNET_PREDICTOR_COMPILED.search(text):
        note += " (its final validation compiled the network all the same)"
    return {"log": bool(text), "ok": bool(summary) and not FAILED.search(text), "ran": ran, "note": note,
            "epoch_s": [float(m.group(1)) for m in NNUNET_EPOCH.finditer(text)],
            "train_s": [t for t, _ in timing], "wait_s": [w for _, w in timing],
            "peak_gb": float(peak.group(1)) if peak and peak.group(1) else None, "dice": dice, "dice_mean": mean,
            "wall_s": _wall(text), "workers_left": (int(workers.group(1)), int(workers.group(2))) if workers else None}


def _wall(text: str) -> float:
    m = WALL.search(text)
    return float(m.group(1)) if m else NAN


def _labels(outs: list[Path]) -> dict[str, str]:
    """nnU-Net's summary names classes by label value; the MSD dataset.json gives their names."""
    for out in outs:
        msd = _json(out / "dataset.json")
        if msd.get("labels"):
            return {str(k): str(v) for k, v in msd["labels"].items()}
    return {}


def collect(outs: list[Path]) -> tuple[dict, dict, list[str], dict]:
    labels = _labels(outs)
    runs: dict[tuple[str, str], dict] = {}
    skipped: dict[str, str] = {}
    env: list[str] = []
    settings: dict = {}
    for out in outs:
        e = _read(out / "environment.txt").strip()
        if e and e not in env:
            env.append(e)
        settings = settings or _json(out / "settings.json")
        for mode in MODES:
            reason = _read(out / f"{mode}.skipped").strip()
            if reason:
                skipped[mode] = reason
            for fw in FRAMEWORKS:
                r = medseg(out, mode) if fw == "medseg" else nnunet(out, mode, labels)
                if r["log"]:
                    runs[(fw, mode)] = r
    return runs, skipped, env, settings


def _f(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def report(outs: list[Path]) -> tuple[str, dict]:
    runs, skipped, env, settings = collect(outs)
    classes: list[str] = []
    for r in runs.values():
        classes += [c for c in r["dice"] if c not in classes]
    epochs = settings.get("epochs") or "?"
    iterations = settings.get("nnunet_iterations") or "250"
    lines = ["# Hippocampus 3d_fullres fold 0: medseg against nnunetv2, eager and compiled", ""]
    lines += [f"{e}  " for e in env] or ["environment unknown  "]
    lines += [f"Epochs per run: {epochs}; nnU-Net {settings.get('nnunet_trainer', '?')}, {iterations} iterations per "
              f"epoch, device {settings.get('nnunet_device', '?')}; medseg overrides: "
              f"`{settings.get('medseg_extra') or 'none'}` (250 iterations per epoch unless they say otherwise)", ""]
    lines.append("Epoch times include each framework's per-epoch validation; medians from the 2nd epoch on (the "
                 "first carries start-up and compilation). Data wait: the part of the training time spent waiting "
                 "for the loader. Peak GPU memory: torch.cuda.max_memory_allocated over training (tensors only). "
                 "Wall: the whole run, final validation included (the first medseg run's also its preprocessing; "
                 "nnU-Net's plan and preprocess are timed apart, in nnunet_plan.log).")
    lines.append("")
    head = ["framework", "mode", "ran", "epochs", "first epoch s", "median epoch s", "median train s",
            "median data wait s", "peak GPU memory GB", *[f"Dice {c}" for c in classes], "mean Dice", "wall s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    table: dict = {}
    for mode in MODES:
        for fw, name in FRAMEWORKS.items():
            r = runs.get((fw, mode))
            if r is None:
                status = f"skipped: {skipped[mode]}" if mode in skipped else "not run"
                lines.append(f"| {name} | {mode} | {status} |" + " |" * (len(head) - 3))
                table[f"{fw}_{mode}"] = {"status": status}
                continue
            e = r["epoch_s"]
            ran = r["ran"] or "?"
            if r["ran"] and r["ran"] != mode:
                ran = f"{r['ran']} (asked: {mode})"
                notes.append(f"{name} {mode} ran {r['ran']}" + (f": {r['note']}" if r["note"] else ""))
            if not r["ok"]:
                ran = f"FAILED, {ran}"
                notes.append(f"{name} {mode}: failed, see {fw}_{mode}.log")
            if r["workers_left"] and any(r["workers_left"]):
                notes.append(f"{name} {mode}: loader workers still running after training (train, val): "
                             f"{r['workers_left']}")
            peak = _f(r["peak_gb"]) if r["peak_gb"] is not None else ("n/a (cpu)" if r["ok"] else "-")
            row = {"ran": r["ran"], "ok": r["ok"], "epochs": len(e), "first_epoch_s": e[0] if e else None,
                   "median_epoch_s": _median(_steady(e)), "median_train_s": _median(_steady(r["train_s"])),
                   "median_wait_s": _median(_steady(r["wait_s"])), "peak_gpu_memory_gb": r["peak_gb"],
                   "dice": r["dice"], "dice_mean": r["dice_mean"], "wall_s": r["wall_s"], "epoch_s": e}
            table[f"{fw}_{mode}"] = row
            lines.append("| " + " | ".join([
                name, mode, ran, str(len(e)), _f(row["first_epoch_s"], 1), _f(row["median_epoch_s"]),
                _f(row["median_train_s"]), _f(row["median_wait_s"]), peak,
                *[_f(r["dice"].get(c), 4) for c in classes], _f(r["dice_mean"], 4), _f(r["wall_s"], 0)]) + " |")
    lines += ["", "medseg / nnunetv2, like against like:", "",
              "| mode | median epoch time ratio (target at most 0.67) "
              "| mean Dice medseg - nnunetv2 (target at least -0.005) |",
              "|---|---|---|"]
    for mode in MODES:
        m, n = table.get(f"medseg_{mode}", {}), table.get(f"nnunet_{mode}", {})
        if "status" in m or "status" in n:
            lines.append(f"| {mode} | {m.get('status') or n.get('status')} | |")
            continue
        if not (m["ok"] and n["ok"]):
            failed = ", ".join(k for k, r in (("medseg", m), ("nnunetv2", n)) if not r["ok"])
            lines.append(f"| {mode} | failed: {failed} | |")
            continue
        ratio = m["median_epoch_s"] / n["median_epoch_s"] if n["median_epoch_s"] else NAN
        gap = m["dice_mean"] - n["dice_mean"] if m["dice_mean"] is not None and n["dice_mean"] is not None else None
        if m["ran"] != n["ran"]:
            notes.append(f"{mode}: medseg ran {m['ran']}, nnunetv2 ran {n['ran']}: not like against like")
        table[f"ratio_{mode}"] = {"epoch_time": ratio, "dice_mean_gap": gap}
        lines.append(f"| {mode} | {_f(ratio, 3)} | {'-' if gap is None else f'{gap:+.4f}'} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    text, table = report(args.out)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
