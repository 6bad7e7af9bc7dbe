"""medseg-cv-summary: cross-validation table from the folds found under an experiment directory."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from medseg.cli.common import CONFIG_DIR, friendly_errors


@hydra.main(config_path=CONFIG_DIR, config_name="cv_summary", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.evaluation.cv_summary import summarize_experiment

    out = Path(cfg.output) if cfg.output else None
    table = summarize_experiment(Path(cfg.experiment_dir), out)
    print(table)


if __name__ == "__main__":
    main()
