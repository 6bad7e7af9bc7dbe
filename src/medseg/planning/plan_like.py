"""``planner.plan_like=<run | fold folder | plan.json | checkpoint>``: plan a dataset like a trained model.

Fine-tuning (``medseg-train init_from=...``) loads a trained model's weights, which fit only a network of the same
topology. This plans the new dataset as usual (its own target spacing, axis order, median shape, intensity
statistics, batch Dice), then gives each configuration the source plan also has the source's network: patch
size, strides, kernels, features, blocks per stage, batch size and the normalisation scheme per channel (where
the channel counts agree; else the dataset's own, noted). A configuration the source does not have keeps its own
plan. medseg-plan and medseg-train read the same planner keys, so the training of the new dataset must be given
the same ``planner.plan_like`` (its run record keeps the plan's key).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from medseg import layout
from medseg.checkpoint import load_weights_only
from medseg.errors import ConfigError
from medseg.planning.plan import ConfigurationPlan, Plan

# what the weights depend on, plus the batch the source's memory budget gave that network
TOPOLOGY = ("patch_size", "batch_size", "strides", "kernel_sizes", "features", "network", "encoder_blocks",
            "decoder_convs")


def read_source_plan(path: str | Path) -> tuple[Plan, Path]:
    """The plan a trained model was trained with, and the file it came from: a run folder (its first fold's
    plan.json), a fold folder, a plan.json/plans.json file, or a checkpoint (its plan travels inside)."""
    path = Path(path)
    if path.is_dir():
        folds = [path] if (path / layout.PLAN).is_file() else [d for d in layout.fold_dirs(path)
                                                                if (d / layout.PLAN).is_file()]
        if not folds and (path / layout.fold_dir(path, layout.ALL_FOLD) / layout.PLAN).is_file():
            folds = [layout.fold_dir(path, layout.ALL_FOLD)]
        if not folds:
            raise ConfigError(f"planner.plan_like={path}: no {layout.PLAN} in it or in its fold_* folders "
                              "(expected a medseg run or fold folder)")
        path = folds[0] / layout.PLAN
    if not path.is_file():
        raise ConfigError(f"planner.plan_like={path}: no such run folder, fold folder, plan or checkpoint")
    if path.suffix == ".json":
        try:
            return Plan.from_dict(json.loads(path.read_text())), path
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"planner.plan_like={path}: not a medseg plan ({e})") from None
    ckpt = load_weights_only(path, mmap=True)
    if not isinstance(ckpt, dict) or "plan" not in ckpt.get("medseg", {}):
        raise ConfigError(f"planner.plan_like={path}: not a medseg checkpoint (no plan inside)")
    return Plan.from_dict(ckpt["medseg"]["plan"]), path


def plan_like(plan: Plan, source: Plan, source_file: Path, batch_override: int | None = None) -> Plan:
    """``plan`` (this dataset's own) with the network of ``source`` in every configuration both have;
    ``batch_override``: planner.batch_size, which still wins for 3d_fullres."""
    why = plan.explanations
    for name, own in list(plan.configurations.items()):
        theirs = source.configurations.get(name)
        if theirs is None:
            why.append(f"plan_like: {name} is not in {source_file} ({sorted(source.configurations)}): planned by "
                       "this dataset's own rules")
            continue
        changes = {key: getattr(theirs, key) for key in TOPOLOGY}
        if batch_override is not None and name == "3d_fullres":
            changes["batch_size"] = own.batch_size
        if len(theirs.normalization) == len(own.normalization):
            changes["normalization"] = list(theirs.normalization)
            # inside the nonzero mask only where the source's scheme can be (z-score), as this dataset decided
            changes["use_mask_for_norm"] = [m and s == "zscore" for m, s in zip(own.use_mask_for_norm,
                                                                              theirs.normalization)]
        else:
            why.append(f"plan_like: {name} has {len(own.normalization)} channels, {source_file} "
                       f"{len(theirs.normalization)}: this dataset's own normalisation {own.normalization}")
        plan.configurations[name] = dataclasses.replace(own, **changes)
        why.append(_described(name, plan.configurations[name], source_file))
    # the planner key, with the file its network came from
    plan.overridden = [key for key in plan.overridden if key != "plan_like"] + [f"plan_like ({source_file})"]
    return plan


def _described(name: str, config: ConfigurationPlan, source_file: Path) -> str:
    return (f"plan_like: {name} takes the network of {source_file}: patch {config.patch_size}, batch "
            f"{config.batch_size}, features {config.features}, strides {config.strides}, normalisation "
            f"{config.normalization}; spacing {config.spacing} is this dataset's")
