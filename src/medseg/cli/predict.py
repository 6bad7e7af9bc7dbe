"""medseg-predict: label maps (and optionally class probabilities) for a folder or a list of images with one
checkpoint or a fold ensemble."""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medseg.cli.common import CONFIG_DIR, friendly_errors

log = logging.getLogger(__name__)


@hydra.main(config_path=CONFIG_DIR, config_name="predict", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.inference.batch import predict_folder

    mirror_axes = OmegaConf.to_container(cfg.mirror_axes) if OmegaConf.is_list(cfg.mirror_axes) else cfg.mirror_axes
    summary = predict_folder(Path(cfg.ckpt_dir), Path(cfg.input), Path(cfg.output), checkpoint=str(cfg.checkpoint),
                             overlap=float(cfg.overlap), mirror_axes=mirror_axes, overwrite=bool(cfg.overwrite),
                             device=str(cfg.device), sw_batch_size=cfg.sw_batch_size,
                             save_probabilities=bool(cfg.save_probabilities), background_io=bool(cfg.background_io),
                             postprocessing=bool(cfg.postprocessing), precision=str(cfg.precision))
    print(summary.report())
    if summary.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
