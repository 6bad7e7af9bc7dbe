"""medseg-predict: label maps for a folder of images with one checkpoint or a fold ensemble."""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medseg.cli.common import CONFIG_DIR, friendly_errors

log = logging.getLogger(__name__)


@hydra.main(config_path=CONFIG_DIR, config_name="predict", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.inference.batch import predict_folder

    summary = predict_folder(Path(cfg.ckpt_dir), Path(cfg.input), Path(cfg.output), checkpoint=cfg.checkpoint,
                             overlap=float(cfg.overlap), mirror_axes=cfg.mirror_axes, overwrite=bool(cfg.overwrite),
                             device=str(cfg.device), sw_batch_size=int(cfg.sw_batch_size))
    print(summary.report())
    if summary.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
