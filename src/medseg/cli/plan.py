"""medseg-plan: validate and fingerprint a dataset, plan its configurations, preprocess (cached)."""

import json

import hydra
from omegaconf import DictConfig

from medseg.cli.common import CONFIG_DIR, friendly_errors


@hydra.main(config_path=CONFIG_DIR, config_name="plan", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from medseg.preprocessing.prepare import prepare

    prepared = prepare(cfg, list(cfg.preprocess))
    print(f"plan written to {prepared.folder / 'plans.json'}")
    plan = prepared.plan
    print(f"planner {plan.planner} ({plan.gpu_memory_gb:g} GB), axis order {plan.transpose}")
    for name, config in plan.configurations.items():
        print(f"{name}: spacing {[round(s, 4) for s in config.spacing]} patch {config.patch_size} "
              f"batch {config.batch_size} features {config.features} strides {config.strides[1:]}")
    if cfg.explain:
        for line in plan.explanations:
            print(f"  - {line}")
    if prepared.plan.overridden:
        print(f"overridden: {json.dumps(prepared.plan.overridden)}")


if __name__ == "__main__":
    main()
