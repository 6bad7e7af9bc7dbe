"""medseg-export: a trained run as one self-contained model archive (format=zip) or as ONNX networks with a JSON
description of the processing around them (format=onnx)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medseg.cli.common import CONFIG_DIR, friendly_errors
from medseg.errors import ConfigError

FORMATS = ("zip", "onnx")


def _folds(cfg: DictConfig) -> list[int | str] | None:
    if cfg.folds is None:
        return None
    value = OmegaConf.to_container(cfg.folds) if OmegaConf.is_list(cfg.folds) else [cfg.folds]
    assert isinstance(value, list)
    return [f if isinstance(f, int) else str(f) for f in value]


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt}: expected one of {list(FORMATS)}")
    source, output = Path(str(cfg.run_dir)), Path(str(cfg.output))
    if fmt == "zip":
        from medseg.inference.export import export_run

        path = export_run(source, output, checkpoint=str(cfg.checkpoint), folds=_folds(cfg),
                          overwrite=bool(cfg.overwrite))
        print(f"wrote {path.absolute()} ({path.stat().st_size / 2**20:.1f} MiB); predict with "
              f"medseg-predict model_file={path} input=... output=...")
        return
    import torch

    from medseg.inference.api import load_models
    from medseg.inference.onnx_backend import export_onnx

    if output.suffix:
        raise ConfigError(f"output={output}: format=onnx writes a folder of files; give a folder")
    loaded = load_models(source, torch.device("cpu"), str(cfg.checkpoint), _folds(cfg))
    if loaded.kind == "onnx":
        raise ConfigError(f"run_dir={source}: already an ONNX export")
    records = {fold: {"model": m.model_spec, "training_precision": m.precision, "source": m.source}
               for fold, m in loaded.models.items()}
    name = str(cfg.name) if cfg.name is not None else (source.stem if loaded.kind == "archive" else source.name)
    written = export_onnx(loaded.models, records, loaded.postprocessing, output, name, str(source),
                          overwrite=bool(cfg.overwrite))
    for path in written:
        print(f"wrote {path.absolute()}")
    print(f"predict with medseg-predict model_file={written[-1]} backend=onnxruntime input=... output=...")


if __name__ == "__main__":
    main()
