"""Report of benchmarks/nnunet_parity_cpu.sh: per budget and framework, the final validation Dice per class over
seeds (mean, standard deviation, each seed's value) and how many seeds learned each class (Dice above
LEARNED), then medseg's mean minus nnU-Net's per budget. Reads <framework>_<budget>_<seed>.json files."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LEARNED = 0.1  # a class "learned" by a run: its Dice over the held-out cases exceeds this


def load(folder: Path) -> dict:
    runs: dict = defaultdict(dict)
    for path in sorted(folder.glob("*_*_*.json")):
        framework, budget, seed = path.stem.rsplit("_", 2)
        runs[(int(budget), framework)][seed] = json.loads(path.read_text())
    return runs


def _number(value) -> float:
    """medseg's metrics.json writes a Dice that does not exist (class in no held-out case) as null."""
    return float("nan") if value is None else float(value)


def _spread(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main(folder: Path) -> None:
    runs = load(folder)
    print("| iterations | framework | seeds | Dice per class: mean ± std (seeds that learned it) | mean Dice "
          "| per seed |")
    print("|---|---|---|---|---|---|")
    means: dict = {}
    for (budget, framework), seeds in sorted(runs.items()):
        classes = sorted(next(iter(seeds.values()))["dice"])
        per_class = []
        for c in classes:
            values = [_number(r["dice"][c]) for r in seeds.values()]
            learned = sum(v > LEARNED for v in values)
            per_class.append(f"{c} {_spread(values)} ({learned}/{len(values)})")
        mean_per_seed = {s: statistics.mean(map(_number, r["dice"].values())) for s, r in seeds.items()}
        means[(budget, framework)] = statistics.mean(mean_per_seed.values())
        detail = ", ".join(f"{s}: {v:.3f}" for s, v in sorted(mean_per_seed.items()))
        print(f"| {budget} | {framework} | {len(seeds)} | {'; '.join(per_class)} | "
              f"{_spread(list(mean_per_seed.values()))} | {detail} |")
    print()
    for budget in sorted({b for b, _ in means}):
        if (budget, "medseg") in means and (budget, "nnunet") in means:
            gap = means[(budget, "medseg")] - means[(budget, "nnunet")]
            print(f"{budget} iterations: medseg - nnU-Net mean Dice {gap:+.3f} (target within 0.02)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
