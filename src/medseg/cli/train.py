"""medseg-train: plan and preprocess if needed, then train one fold (or sweep folds/models with -m)."""

import hydra
from omegaconf import DictConfig

from medseg.cli.common import CONFIG_DIR, friendly_errors


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> float:
    from medseg.training.run import train_fold  # heavy imports after Hydra has parsed the command line

    metrics = train_fold(cfg)
    return metrics.get("dice_mean", float("nan"))


if __name__ == "__main__":
    main()
