"""medseg-predict: label maps (and optionally class probabilities) for a folder or a list of images with one
checkpoint, a fold ensemble or an exported model (medseg-export), run by torch or onnxruntime."""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medseg.cli.common import CONFIG_DIR, friendly_errors
from medseg.errors import ConfigError

log = logging.getLogger(__name__)


def model_source(cfg: DictConfig) -> Path | list[Path]:
    """ckpt_dir= (a run or fold folder, or a list of them: an ensemble of runs) or model_file= (an archive or ONNX
    description): exactly one of them."""
    given = [key for key in ("ckpt_dir", "model_file") if cfg.get(key) is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of ckpt_dir=<run or fold folder> and model_file=<archive .zip or ONNX "
                          f"description .json>{'; both were given' if given else ''}")
    if given[0] == "ckpt_dir" and OmegaConf.is_list(cfg.ckpt_dir):
        runs = [Path(str(p)) for p in cfg.ckpt_dir]
        if not runs:
            raise ConfigError("ckpt_dir=[]: give a run or fold folder, or several")
        for run in runs:
            if run.suffix.lower() in (".zip", ".json"):
                raise ConfigError(f"ckpt_dir={run}: an ensemble of runs is given as their run or fold folders")
        return runs if len(runs) > 1 else runs[0]
    source = Path(str(cfg[given[0]]))
    if given[0] == "ckpt_dir" and source.suffix.lower() in (".zip", ".json"):
        raise ConfigError(f"ckpt_dir={source}: a run or fold folder; an exported model is given as "
                          f"model_file={source}")
    if given[0] == "model_file" and source.suffix.lower() not in (".zip", ".json"):
        raise ConfigError(f"model_file={source}: an archive (.zip) or ONNX description (.json) from medseg-export; a "
                          f"run folder is given as ckpt_dir={source}")
    return source


def postprocessing_choice(value) -> bool | Path:
    """true / false, or a decision file (postprocessing.json of medseg-postprocess or medseg-select)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    return Path(str(value))


@hydra.main(config_path=CONFIG_DIR, config_name="predict", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    source = model_source(cfg)  # refused before torch and the models are imported
    from medseg.inference.batch import predict_folder

    mirror_axes = OmegaConf.to_container(cfg.mirror_axes) if OmegaConf.is_list(cfg.mirror_axes) else cfg.mirror_axes
    summary = predict_folder(source, Path(cfg.input), Path(cfg.output), checkpoint=str(cfg.checkpoint),
                             overlap=float(cfg.overlap), mirror_axes=mirror_axes, overwrite=bool(cfg.overwrite),
                             device=str(cfg.device), sw_batch_size=cfg.sw_batch_size,
                             save_probabilities=bool(cfg.save_probabilities), background_io=bool(cfg.background_io),
                             postprocessing=postprocessing_choice(cfg.postprocessing), precision=str(cfg.precision),
                             dicom_seg=bool(cfg.dicom_seg), backend=str(cfg.backend))
    print(summary.report())
    if summary.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
