"""Report of benchmarks/nnunet_parity_cpu.sh: per budget and framework, the final validation Dice per class over
seeds (mean, standard deviation, each seed's value) and how many seeds learned each class (Dice above
LEARNED), then per budget medseg's mean minus nnU-Net's with Welch's 95% confidence interval, Fisher's exact test on
how often each class was learned, and the seeds per framework a 0.02 difference would need to be resolved at the
spread measured. Reads <framework>_<budget>_<seed>.json files."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from scipy import stats

LEARNED = 0.1  # a class "learned" by a run: its Dice over the held-out cases exceeds this
TARGET = 0.02  # the tolerance on the difference of mean Dice


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
    print(
        "| iterations | framework | seeds | Dice per class: mean ± std (seeds that learned it) | mean Dice | per seed |"
    )
    print("|---|---|---|---|---|---|")
    per_seed: dict = {}
    learned_counts: dict = {}
    for (budget, framework), seeds in sorted(runs.items()):
        classes = sorted(next(iter(seeds.values()))["dice"])
        per_class = []
        for c in classes:
            values = [_number(r["dice"][c]) for r in seeds.values()]
            learned = sum(v > LEARNED for v in values)
            learned_counts[(budget, framework, c)] = (learned, len(values))
            per_class.append(f"{c} {_spread(values)} ({learned}/{len(values)})")
        mean_per_seed = {s: statistics.mean(map(_number, r["dice"].values())) for s, r in seeds.items()}
        per_seed[(budget, framework)] = list(mean_per_seed.values())
        detail = ", ".join(f"{s}: {v:.3f}" for s, v in sorted(mean_per_seed.items()))
        print(
            f"| {budget} | {framework} | {len(seeds)} | {'; '.join(per_class)} | "
            f"{_spread(list(mean_per_seed.values()))} | {detail} |"
        )
    print()
    for budget in sorted({b for b, _ in per_seed}):
        if (budget, "medseg") in per_seed and (budget, "nnunet") in per_seed:
            print(compare(budget, per_seed[(budget, "medseg")], per_seed[(budget, "nnunet")], learned_counts))


def compare(budget: int, medseg: list[float], nnunet: list[float], learned_counts: dict) -> str:
    """medseg - nnU-Net in mean Dice over seeds; with two seeds or more on each side, Welch's interval (the spreads
    differ), Fisher's exact test per class on learned/not learned, and the seeds per framework that would resolve a
    TARGET difference (two-sided 5%, power 80%) at the pooled spread measured."""
    gap = statistics.mean(medseg) - statistics.mean(nnunet)
    line = f"{budget} iterations: medseg - nnU-Net mean Dice {gap:+.3f} (target within {TARGET})"
    if min(len(medseg), len(nnunet)) < 2:
        return line + "; one side has a single seed, no interval"
    ci = stats.ttest_ind(medseg, nnunet, equal_var=False).confidence_interval(0.95)
    pooled_var = (statistics.variance(medseg) + statistics.variance(nnunet)) / 2
    needed = 2 * (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) ** 2 * pooled_var / TARGET**2
    fisher = []
    for (b, framework, c), (k_m, n_m) in sorted(learned_counts.items()):
        if b != budget or framework != "medseg" or (b, "nnunet", c) not in learned_counts:
            continue
        k_n, n_n = learned_counts[(b, "nnunet", c)]
        p = stats.fisher_exact([[k_m, n_m - k_m], [k_n, n_n - k_n]]).pvalue
        fisher.append(f"{c} {k_m}/{n_m} vs {k_n}/{n_n}, p = {p:.2f}")
    return (
        f"{line}; Welch 95% CI [{ci.low:+.3f}, {ci.high:+.3f}]; learned, Fisher's exact: {'; '.join(fisher)}; "
        f"seeds per framework to resolve {TARGET} at this spread (pooled std {pooled_var**0.5:.3f}): "
        f"~{needed:.0f}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
