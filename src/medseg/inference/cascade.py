"""The cascade at prediction: a 3d_cascade_fullres ensemble finds the 3d_lowres run and folds it was trained on
(recorded in its checkpoints), and that run's fold ensemble becomes its previous stage, predicted first for every
case. The user names the cascade run only, as with nnU-Net's predict for the cascade."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medseg import layout
from medseg.errors import MedsegError
from medseg.inference.predictor import Predictor, TrainedModel, load_checkpoint


def model_run_dir(model: TrainedModel) -> Path:
    """<run> of a checkpoint at <run>/fold_<k>/checkpoints/<name>.ckpt."""
    return Path(model.source).parents[2]


def previous_stage_of(model: TrainedModel) -> tuple[Path, list[int]]:
    """The previous stage's run folder and folds a cascade model was trained on."""
    info = model.previous_stage
    if not info or "run" not in info:
        raise MedsegError(f"{model.source}: a {model.config.name} checkpoint that does not say which "
                          f"{model.config.previous_stage} run it was trained on; train it again with this medseg")
    run = Path(os.path.normpath(model_run_dir(model) / str(info["run"])))
    return run, [int(f) for f in info.get("folds", [])]


def previous_stage_checkpoints(models: list[TrainedModel], which: str = "last") -> tuple[Path, list[Path]] | None:
    """(run, checkpoint per fold) of the previous stage of the ensemble's cascade members, or None where there is
    none. A missing run or fold is one error naming it and the command that trains it."""
    cascades = [m for m in models if m.config.previous_stage]
    if not cascades:
        return None
    stages: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for m in cascades:
        found_run, found_folds = previous_stage_of(m)
        stages.setdefault((str(found_run), tuple(found_folds)), []).append(m.source)
    if len(stages) > 1:
        listed = "; ".join(f"{r} folds {list(f)} ({', '.join(sources)})" for (r, f), sources in stages.items())
        raise MedsegError(f"the ensemble's cascade models were trained on different previous stages: {listed}")
    (run_name, folds), _ = next(iter(stages.items()))
    run, name, cascade_run = Path(run_name), cascades[0].config.previous_stage, model_run_dir(cascades[0])
    if not run.is_dir():
        raise MedsegError(f"{run}: the {name} run that the cascade {cascade_run} was trained on is missing; train "
                          f"it (medseg-train configuration={name} fold=<k> for folds {list(folds)}) or restore it")
    checkpoints, missing = [], []
    for fold in folds:
        fold_dir = layout.fold_dir(run, fold)
        chosen = [c for c in (layout.checkpoint(fold_dir, which), layout.checkpoint(fold_dir)) if c.is_file()]
        if chosen:
            checkpoints.append(chosen[0])
        else:
            missing.append(fold)
    if missing:
        expected = layout.checkpoint(layout.fold_dir(run, missing[0]), which)
        raise MedsegError(f"{run}: {name} fold(s) {missing} have no checkpoint ({expected} missing); the cascade "
                          f"{cascade_run} predicts with the {name} folds it was trained on, {list(folds)}: "
                          f"medseg-train configuration={name} fold={missing[0]} makes it")
    return run, checkpoints


def previous_stage_predictor(models: list[TrainedModel], which: str, overlap: float, mirror_axes,
                             sw_batch_size: int, device: torch.device, precision: str = "auto") -> Predictor | None:
    """The previous stage's fold ensemble for the ensemble's cascade members (None where it has none), predicting
    as the cascade does (overlap, mirroring, device)."""
    found = previous_stage_checkpoints(models, which)
    if found is None:
        return None
    _, checkpoints = found
    previous = [load_checkpoint(c, device) for c in checkpoints]
    expected = next(m.config.previous_stage for m in models if m.config.previous_stage)
    wrong = [p.source for p in previous if p.config.name != expected]
    if wrong:
        raise MedsegError(f"{wrong[0]}: a {previous[0].config.name} checkpoint where the cascade expects {expected}")
    return Predictor(previous, overlap, mirror_axes, sw_batch_size, device, precision)
