"""The cascade in training, nnU-Net's way.

3d_lowres side: the final validation of a fold writes, besides each held-out case's prediction in its own geometry,
the same label map on the next stage's preprocessed grid (``NextStageExport``; where: medseg.layout).
3d_cascade_fullres side: every case trains on the prediction of the 3d_lowres fold that held it out (out of fold,
``out_of_fold_files``); which 3d_lowres run is decided here (``previous_stage_run``), every file it needs is checked
before any compute (one error naming the missing folds and the command that makes them), and its final validation
predicts each held-out case with the 3d_lowres fold that held it out, as its training data were made.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from medseg import layout
from medseg.datasets.io import read_image
from medseg.datasets.manifest import Manifest
from medseg.errors import ConfigError
from medseg.inference.predictor import Predictor, load_checkpoint
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.preprocessing.cache import PreprocessedCache
from medseg.preprocessing.pipeline import case_grid, label_to_grid
from medseg.preprocessing.previous_stage import read_previous_stage, write_previous_stage

log = logging.getLogger(__name__)

CASCADE_KEYS = ("previous_stage_run",)  # the train config's ``cascade`` group


def check_cascade_keys(node) -> None:
    unknown = sorted(set(node or {}) - set(CASCADE_KEYS))
    if unknown:
        raise ConfigError(f"cascade: unknown key(s) {unknown}; accepted: {list(CASCADE_KEYS)}")


# ---- 3d_lowres: the held-out cases' predictions on the next stage's grid --------------------------------------

@dataclass(frozen=True)
class NextStageExport:
    """Writes a fold's held-out predictions onto the preprocessed grid of ``config`` (the next stage), where the
    cascade's loader cuts them with the same boxes as the cached images."""

    plan: Plan
    config: ConfigurationPlan  # the next stage
    folder: Path

    def path(self, case_id: str) -> Path:
        return self.folder / f"{case_id}.npy"

    def done(self, case_id: str) -> bool:
        return self.path(case_id).is_file()

    def write(self, case_id: str, image: np.ndarray, spacing, label: np.ndarray) -> None:
        """``label``: the (z, y, x) prediction on the case's input grid (``image``'s, (c, z, y, x))."""
        props = case_grid(image, spacing, self.plan, self.config, case_id)
        write_previous_stage(self.path(case_id), label_to_grid(label, props, self.plan, self.config))


def next_stage_export(plan: Plan, config: ConfigurationPlan, fold_dir: Path) -> NextStageExport | None:
    """The export of a fold of ``config`` whose plan has a next stage (3d_lowres within a cascade); else None."""
    if not config.next_stage or config.next_stage not in plan.configurations:
        return None
    return NextStageExport(plan, plan.configuration(config.next_stage), layout.next_stage_dir(fold_dir,
                                                                                               config.next_stage))


def write_missing_next_stage(export: NextStageExport, predictor: Predictor, manifest: Manifest,
                             case_ids: list[str]) -> int:
    """Predicts and writes the held-out cases whose next-stage file is missing (a fold finished before it wrote
    them); returns how many were written."""
    missing = [c for c in case_ids if not export.done(c)]
    for case_id in missing:
        image, geometry = read_image(manifest.case(case_id).images)
        export.write(case_id, image, geometry.spacing, predictor.predict_label(image, geometry.spacing))
    return len(missing)


# ---- 3d_cascade_fullres: the previous stage's run, files and validation predictor ------------------------------

def previous_stage_run(cfg: DictConfig, previous: str) -> Path:
    """``cascade.previous_stage_run``, or by default the run this command would train for ``previous`` (the same
    experiment, model and loss: <model>__<loss>__3d_lowres)."""
    given = (cfg.get("cascade") or {}).get("previous_stage_run")
    if given:
        return Path(str(given))
    other = copy.deepcopy(cfg)
    with open_dict(other):
        other.configuration = previous
    run = Path(str(other.run_dir))
    if run == Path(str(cfg.run_dir)):
        raise ConfigError(f"run_dir={cfg.run_dir} does not depend on the configuration, so the {previous} run cannot "
                          "be found from it: name it with cascade.previous_stage_run=<its run folder>")
    return run


def out_of_fold_files(run: Path, next_stage: str, case_folds: dict[str, int]) -> dict[str, Path]:
    """Case -> the previous stage's prediction for it by the fold that held it out (never one that trained on it)."""
    return {case: layout.next_stage_file(layout.fold_dir(run, fold), next_stage, case)
            for case, fold in case_folds.items()}


def check_out_of_fold_files(run: Path, previous: str, stage: str, fold: int | str,
                            case_folds: dict[str, int]) -> dict[str, Path]:
    """The files ``out_of_fold_files`` names, each there and from a finished fold; else one ConfigError naming the
    folds that lack them, a missing file and the command that makes them."""
    files = out_of_fold_files(run, stage, case_folds)
    missing = {case: path for case, path in files.items()
               if not path.is_file() or not layout.is_finished(layout.fold_dir(run, case_folds[case]))}
    if not missing:
        return files
    folds = sorted({case_folds[c] for c in missing})
    first = next(iter(missing.values()))
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    commands = " and ".join(f"medseg-train configuration={previous} fold={k}" for k in folds)
    raise ConfigError(f"{stage} fold {fold} trains on the out-of-fold predictions of the {previous} run {run}, and "
                      f"{previous} fold(s) {folds} have not made them ({first} missing{more}); make them with "
                      f"{commands} (with this command's data, model and loss options), or name another {previous} "
                      "run with cascade.previous_stage_run=<run folder>")


@dataclass(frozen=True)
class PreviousStageInputs:
    """A cascade fold's previous stage: its run, and per case the fold that held the case out and its file."""

    configuration: str
    run: Path
    folds: dict[str, int]
    files: dict[str, Path]


def check_grids(files: dict[str, Path], cache: PreprocessedCache, previous: str, case_folds: dict[str, int]) -> None:
    """Each previous-stage map lies on its case's cached grid (headers only are read)."""
    for case, path in files.items():
        have = tuple(read_previous_stage(path).shape)
        want = tuple(cache.load_volume(case)[1].shape)
        if have != want:
            raise ConfigError(f"{path}: shape {list(have)}, but the preprocessed case {case} is {list(want)} "
                              f"({cache.folder}): the preprocessing changed after {previous} fold "
                              f"{case_folds[case]} wrote it; medseg-train configuration={previous} "
                              f"fold={case_folds[case]} overwrite=true makes it again")


def previous_stage_record(run: Path, previous: str, run_dir: Path, case_folds: dict[str, int]) -> dict:
    """What a cascade fold records (and its checkpoints carry) about its previous stage: the run relative to the
    cascade's own run folder (the pair can be moved together) and the folds its inputs came from."""
    return {"configuration": previous, "run": os.path.relpath(run, run_dir),
            "folds": sorted(set(case_folds.values()))}


def validation_previous_stage(run: Path, fold: int, device: torch.device) -> Predictor:
    """The previous stage as the cascade's held-out cases were given it: the 3d_lowres fold that held them out,
    with the checkpoint, overlap and mirroring its own final validation used."""
    fold_dir = layout.fold_dir(run, fold)
    validation = json.loads((fold_dir / layout.RUN_RECORD).read_text()).get("validation", {})
    chosen = layout.checkpoint(fold_dir, str(validation.get("checkpoint", "last")))
    model = load_checkpoint(chosen if chosen.is_file() else layout.checkpoint(fold_dir), device)
    axes = validation.get("mirror_axes")
    return Predictor([model], overlap=float(validation.get("overlap", 0.5)),
                     mirror_axes=tuple(axes) if axes else None, device=device)


def log_previous_stage(inputs: PreviousStageInputs) -> None:
    log.info("cascade: %d cases with the out-of-fold predictions of %s folds %s", len(inputs.files), inputs.run,
             sorted(set(inputs.folds.values())))
