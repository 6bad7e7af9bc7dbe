"""medseg-postprocess: decide keep-largest-component post-processing from a run's validation folds."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from medseg.cli.common import CONFIG_DIR, friendly_errors


@hydra.main(config_path=CONFIG_DIR, config_name="postprocess", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.evaluation.postprocessing import decide_for_run, format_decision
    from medseg.inference.postprocessing import save_postprocessing

    run_dir = Path(cfg.run_dir)
    spec, evidence = decide_for_run(run_dir)
    path = save_postprocessing(run_dir, spec, evidence)
    print(format_decision(spec, evidence))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
