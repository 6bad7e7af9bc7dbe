"""Summarise a parity run (scripts/gpu/parity_hippocampus.sh): epoch times and validation Dice of medseg and
nnU-Net, from the logs and result files the script saved in OUT. Prints markdown."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

MEDSEG_EPOCH = re.compile(r"epoch (\d+)/\d+, .*?([\d.]+) s \(train ([\d.]+) s(?:, [\d.]+ it/s, waiting for data ([\d.]+) s)?")
NNUNET_EPOCH = re.compile(r"Epoch time: ([\d.]+) s")
NNUNET_TIMING = re.compile(r"timing: epoch \d+ train ([\d.]+) s, waiting for data ([\d.]+) s")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def medseg(out: Path) -> dict:
    text = (out / "medseg.log").read_text() if (out / "medseg.log").is_file() else ""
    epochs = [(float(m.group(2)), float(m.group(3)), float(m.group(4) or "nan")) for m in MEDSEG_EPOCH.finditer(text)]
    metrics_file = out / "medseg_metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {"epoch_s": [e for e, _, _ in epochs], "train_s": [t for _, t, _ in epochs],
            "wait_s": [w for _, _, w in epochs], "dice": metrics.get("dice", {}), "dice_mean": metrics.get("dice_mean")}


def nnunet(out: Path) -> dict:
    text = (out / "nnunet.log").read_text() if (out / "nnunet.log").is_file() else ""
    epochs = [float(m.group(1)) for m in NNUNET_EPOCH.finditer(text)]
    timing = [(float(m.group(1)), float(m.group(2))) for m in NNUNET_TIMING.finditer(text)]
    summary_file = out / "nnunet_summary.json"
    dice, mean = {}, None
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        dice = {k: v["Dice"] for k, v in summary["mean"].items()}
        mean = summary["foreground_mean"]["Dice"]
    return {"epoch_s": epochs, "train_s": [t for t, _ in timing], "wait_s": [w for _, w in timing], "dice": dice,
            "dice_mean": mean}


def main(out: Path) -> None:
    env = (out / "environment.txt").read_text().strip() if (out / "environment.txt").is_file() else "?"
    m, n = medseg(out), nnunet(out)
    rows = [("medseg", m), ("nnunetv2", n)]
    print(f"# Hippocampus 3d_fullres fold 0, 10 epochs x 250 iterations\n\n{env}\n")
    print("| framework | epochs | first epoch s | median epoch s (from 2nd) | median train-only s | "
          "median waiting for data s | val Dice per class | mean |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        e = r["epoch_s"]
        train = _median(r["train_s"][1:])
        wait = _median(r["wait_s"][1:])
        dice = ", ".join(f"{k} {v:.4f}" for k, v in r["dice"].items())
        mean = f"{r['dice_mean']:.4f}" if r["dice_mean"] is not None else "-"
        print(f"| {name} | {len(e)} | {e[0] if e else float('nan'):.1f} | {_median(e[1:]):.2f} | {train:.2f} | "
              f"{wait:.2f} | {dice} | {mean} |")
    ratio = _median(m["epoch_s"][1:]) / _median(n["epoch_s"][1:]) if m["epoch_s"] and n["epoch_s"] else float("nan")
    print(f"\nmedian epoch time ratio medseg / nnunetv2: {ratio:.3f} (target at most 0.67)")
    if m["dice_mean"] is not None and n["dice_mean"] is not None:
        gap = m["dice_mean"] - n["dice_mean"]
        print(f"mean Dice medseg - nnunetv2 after the same iterations: {gap:+.4f} (target at least -0.005)")
    print(json.dumps({"medseg": m, "nnunetv2": n, "epoch_ratio": ratio}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
