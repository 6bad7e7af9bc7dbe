"""medseg-plan: validate and fingerprint a dataset, plan its configurations, preprocess (cached)."""

import json

import hydra
from omegaconf import DictConfig

from medseg.cli.common import CONFIG_DIR, friendly_errors


@hydra.main(config_path=CONFIG_DIR, config_name="plan", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.prepare import prepare

    prepared = prepare(cfg, list(cfg.preprocess))
    print(f"plan written to {prepared.folder / 'plans.json'}")
    for name, config in prepared.plan.configurations.items():
        print(f"{name}: spacing {config.spacing} patch {config.patch_size} batch {config.batch_size} "
              f"features {config.features} strides {config.strides[1:]}")
        if cfg.explain:
            for line in prepared.plan.explanations.get(name, []):
                print(f"  - {line}")
    if prepared.plan.overridden:
        print(f"overridden: {json.dumps(prepared.plan.overridden)}")


if __name__ == "__main__":
    main()
