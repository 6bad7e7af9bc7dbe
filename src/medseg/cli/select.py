"""medseg-select: the model to deploy, chosen from an experiment's cross-validation (every complete run and every
pair of runs as an ensemble, out-of-fold predictions only), with its post-processing and inference recipe."""

import hydra
from omegaconf import DictConfig

from medseg.cli.common import CONFIG_DIR, friendly_errors


@hydra.main(config_path=CONFIG_DIR, config_name="select", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.evaluation.selection import (POSTPROCESSING_FILE, SELECTION_JSON, SELECTION_MD, select,
                                             write_selection)

    selection = select(str(cfg.experiment_dir), n_resamples=int(cfg.n_resamples), confidence=float(cfg.confidence),
                       alpha=float(cfg.alpha), seed=int(cfg.seed), ensembles=bool(cfg.ensembles))
    print(write_selection(selection))
    print(f"wrote {SELECTION_MD}, {SELECTION_JSON} and {POSTPROCESSING_FILE} to {selection.experiment.absolute()}")


if __name__ == "__main__":
    main()
