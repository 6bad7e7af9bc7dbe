"""medseg-train: plan and preprocess if needed, then train one fold (or sweep folds/models with -m)."""

import math
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medseg import layout
from medseg.atomic import number
from medseg.cli.common import CONFIG_DIR, friendly_errors, quiet_lightning


def where_results_are(cfg: DictConfig, metrics: dict) -> str:
    """The closing lines of medseg-train: the run folder, and the fold's metrics.json or why there is none."""
    run_dir = Path(str(cfg.run_dir)).absolute()
    fold_dir = layout.fold_dir(run_dir, cfg.fold)
    metrics_path = fold_dir / layout.METRICS
    lines = [f"run folder: {run_dir}"]
    if metrics_path.is_file():
        dice = number(metrics.get("dice_mean"))
        score = f" (mean Dice {dice:.4f})" if not math.isnan(dice) else ""
        lines.append(f"metrics: {metrics_path}{score}")
    else:
        lines.append(f"no metrics.json (final validation off); checkpoints: {fold_dir / layout.CHECKPOINTS}")
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> float:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from medseg.training.run import train_fold  # heavy imports after Hydra has parsed the command line

    quiet_lightning()
    metrics = train_fold(cfg)
    if getattr(rank_zero_only, "rank", 0) == 0:  # the extra processes of a multi-GPU run stay quiet
        print(where_results_are(cfg, metrics))
    # a sweeper optimises this value: NaN, not None, where metrics.json holds null
    return number(metrics.get("dice_mean"))


if __name__ == "__main__":
    main()
