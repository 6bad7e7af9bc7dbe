"""medseg-evaluate: Dice, HD95 and surface Dice of a folder of predictions against a folder of references."""

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medseg.cli.common import CONFIG_DIR, friendly_errors


def _plain(value):
    """Hydra gives mappings as DictConfig; the evaluation takes plain values."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.evaluation.evaluate import default_output, evaluate_folders, format_table

    output = Path(cfg.output) if cfg.output else default_output(Path(cfg.pred))
    _, summary = evaluate_folders(Path(cfg.pred), Path(cfg.ref), labels=_plain(cfg.labels),
                                  tolerance_mm=_plain(cfg.tolerance_mm), num_processes=int(cfg.num_processes),
                                  output=output, progress=True, per_label=bool(cfg.per_label))
    print(format_table(summary))
    print(f"\nper-case scores: {output / 'per_case.csv'}\nsummary: {output / 'summary.json'}")


if __name__ == "__main__":
    main()
