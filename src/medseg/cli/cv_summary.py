"""medseg-cv-summary: cross-validation table from the folds found under an experiment directory, and the
leaderboard of its runs when there are several."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from medseg.cli.common import CONFIG_DIR, friendly_errors
from medseg.errors import ConfigError


@hydra.main(config_path=CONFIG_DIR, config_name="cv_summary", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.evaluation.cv_summary import summarize_experiment
    from medseg.layout import find_runs
    from medseg.evaluation.leaderboard import build_leaderboard, write_leaderboard

    experiment_dir = Path(cfg.experiment_dir)
    out = Path(cfg.output) if cfg.output else experiment_dir
    print(summarize_experiment(experiment_dir, out))
    lb = cfg.leaderboard
    if lb.enabled not in (True, False, "auto"):
        raise ConfigError(f"leaderboard.enabled={lb.enabled!r}: expected auto, true or false")
    if lb.enabled is True or (lb.enabled == "auto" and len(find_runs(experiment_dir)) > 1):
        board = build_leaderboard(experiment_dir, baseline=lb.baseline, n_resamples=int(lb.n_resamples),
                                  confidence=float(lb.confidence), alpha=float(lb.alpha), seed=int(lb.seed))
        print()
        print(write_leaderboard(board, out, plots=bool(lb.plots)))


if __name__ == "__main__":
    main()
