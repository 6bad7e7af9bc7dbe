"""Train one fold, in named steps: check the config, set the run up (data, plan, model, loss, the resolved run
record), decide the fold's state, preprocess, fit, validate on the held-out cases."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from medseg import layout
from medseg.atomic import write_json, write_text
from medseg.checkpoint import load_weights_only
from medseg.errors import CheckpointError, ConfigError, TrainingInterrupted
from medseg.inference.predictor import Predictor, load_checkpoint
from medseg.loading.datamodule import SegmentationDataModule
from medseg.loading.previous_stage import CascadeInputs, PreviousSegmentations
from medseg.loading.augmentation import AugmentationSettings
from medseg.locking import exclusive
from medseg.losses import check_loss_for_scheme, create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import adapt_patch_for_model, create_model, model_spec
from medseg.models.registry import encoder_prefixes
from medseg.models.summary import summarize_model
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.preprocessing.prepare import PreparedDataset, dataset_folder, load_manifest, prepare, preprocess
from medseg.preprocessing.previous_stage import foreground_labels, num_input_channels
from medseg.record import RunRecord
from medseg.training.callbacks import build_callbacks
from medseg.training.cascade import (PreviousStageInputs, check_grids, check_out_of_fold_files, log_previous_stage,
                                     next_stage_export, previous_stage_record, previous_stage_run,
                                     validation_previous_stage, write_missing_next_stage)
from medseg.training.checkpoint_io import AtomicCheckpointIO
from medseg.training.guards import FiniteGuard
from medseg.training.init_from import (INIT_FROM_FILE, InitFromResult, continues_training, init_source, log_result,
                                       transfer_weights)
from medseg.training.module import SegmentationModule, channels_last_format
from medseg.training.settings import (augmentation_settings, check_config, config_dict, on_gpu, parse_fold,
                                     resolve_run, trainer_kwargs)
from medseg.training.timing import fit_timing, reset_peak_memory
from medseg.training.validation import missing_probability_cases, validate_fold, write_missing_probabilities

log = logging.getLogger(__name__)


def _is_first_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which start this same job again: only the
    first may move earlier results aside."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


def train_fold(cfg: DictConfig) -> dict:
    """Train one fold; a second run on the same fold folder is refused while this one runs (DDP's extra
    processes re-run this job under the first one's lock, so they take none)."""
    check_config(cfg)  # before anything is read or written
    fold = parse_fold(cfg.fold)
    run_dir = Path(cfg.run_dir)
    fold_dir = layout.fold_dir(run_dir, fold)
    check_resumable_checkpoint(cfg, fold_dir)
    setup = set_up_run(cfg, fold)  # writes nothing into the run folder
    lock = (exclusive(layout.fold_lock(run_dir, fold), fold_dir, "training run")
            if _is_first_process() else contextlib.nullcontext())
    with lock:
        return _train_fold(cfg, setup, fold_dir)


# ---- 1. the run: data, plan, model, loss and the resolved record -------------------------------------------

@dataclass
class RunSetup:
    prepared: PreparedDataset
    config: ConfigurationPlan  # adapted to the model
    train_ids: list[str]
    val_ids: list[str]
    model: nn.Module
    loss: nn.Module
    augmentation: AugmentationSettings | None
    record: RunRecord
    previous: PreviousStageInputs | None = None  # a cascade stage's out-of-fold inputs (training.cascade)
    init_from: InitFromResult | None = None  # the weights it starts from (training.init_from); None: its own

    @property
    def plan(self) -> Plan:
        return self.prepared.plan

    @property
    def input_channels(self) -> int:
        return num_input_channels(self.plan, self.config)


def _adapt_patch_to_model(plan: Plan, config: ConfigurationPlan, model_name: str) -> ConfigurationPlan:
    """Models with input constraints (SwinUNETR: multiples of 32) get the planned patch rounded up; the change
    is recorded in the plan that the run and its checkpoints carry."""
    adapted = adapt_patch_for_model(model_name, config.patch_size)
    multiple = model_spec(model_name).patch_multiple
    if list(adapted) == list(config.patch_size):
        return config
    config = dataclasses.replace(config, patch_size=adapted)
    plan.explanations.append(f"{config.name} patch: rounded up to multiples of {multiple} for model {model_name} "
                             f"-> {adapted}")
    plan.overridden.append(f"{config.name}.patch_size (model {model_name})")
    plan.configurations[config.name] = config
    return config


def set_up_run(cfg: DictConfig, fold: int | str) -> RunSetup:
    """Manifest, fold split, plan (fingerprinting if needed, no preprocessing yet), model and loss built (so a
    bad model or loss setting fails before the data is preprocessed) and the run record. With init_from, the
    trained weights are read and checked first, and loaded into the model unless the fold continues from its own
    checkpoint."""
    source = init_source(cfg, fold)  # another model or 2D/3D is refused before any data is read
    manifest = load_manifest(cfg.data, dataset_folder(cfg))
    train_ids, val_ids = manifest.split(fold)  # an impossible fold fails before the data is fingerprinted
    check_loss_for_scheme(str(cfg.loss.name), manifest.label_scheme)  # and a loss that cannot train its labels
    prepared = prepare(cfg, [], manifest=manifest)
    plan = prepared.plan
    L.seed_everything(int(cfg.seed), workers=True)
    config = _adapt_patch_to_model(plan, plan.configuration(cfg.configuration), str(cfg.model.name))
    previous, previous_record = None, None
    if config.previous_stage:  # every previous-stage file this fold needs is there, before any compute
        run = previous_stage_run(cfg, config.previous_stage)
        used = set(train_ids) | set(val_ids)
        case_folds = {c.case_id: int(c.fold) for c in manifest.cases if c.case_id in used and c.fold is not None}
        files = check_out_of_fold_files(run, config.previous_stage, config.name, fold, case_folds)
        previous = PreviousStageInputs(config.previous_stage, run, case_folds, files)
        previous_record = previous_stage_record(run, config.previous_stage, Path(str(cfg.run_dir)), case_folds)
    record = resolve_run(cfg, plan, config, fold, len(train_ids), len(val_ids), previous_record,
                         init_from=str(source.path.resolve()) if source is not None else None)
    scheme = plan.label_scheme
    model = create_model(record.model.name, config.spatial_dims, num_input_channels(plan, config),
                         scheme.num_outputs, plan=config, **record.model.kwargs)
    init_result = None
    if source is not None:
        if continues_training(cfg, layout.fold_dir(Path(str(cfg.run_dir)), fold)):
            log.info("init_from: the fold continues from its own checkpoint; %s is not applied again", source.path)
        else:  # no layer that fits is refused here, before preprocessing
            init_result = transfer_weights(source, model, num_input_channels(plan, config), scheme.num_outputs,
                                           list(config.patch_size))
            log_result(init_result)
    loss = with_deep_supervision(create_loss(record.loss.name, scheme, **record.loss.kwargs),
                                 getattr(model, "heads", 0) + 1)
    augmentation, _ = augmentation_settings(cfg, config.patch_size)
    return RunSetup(prepared, config, train_ids, val_ids, model, loss, augmentation, record, previous, init_result)


# ---- 2. the fold's state: finished, extendable, resumable, or new ----------------------------------------

def _set_aside_validation(fold_dir: Path, epochs: int) -> None:
    """Extending a finished fold keeps the earlier fold's results under names carrying its epoch count."""
    for name in (layout.METRICS, layout.VALIDATION, layout.NEXT_STAGE):
        path = fold_dir / name
        if path.exists():
            path.rename(fold_dir / f"{path.stem}.epochs{epochs}{path.suffix}")


def _set_aside(fold_dir: Path) -> None:
    """overwrite=true never deletes: the old fold folder is renamed with a timestamp."""
    if fold_dir.exists():
        target = fold_dir.with_name(f"{fold_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        fold_dir.rename(target)
        log.warning("moved the previous %s to %s", fold_dir, target)


def _previous_record(fold_dir: Path) -> RunRecord | None:
    path = fold_dir / layout.RUN_RECORD
    return RunRecord.load(path) if path.is_file() else None


def _refuse_other_settings(fold_dir: Path, previous: RunRecord | None, record: RunRecord, what: str) -> None:
    differences = previous.differences(record) if previous is not None else []
    if differences:
        listed = "\n  ".join(differences)
        raise ConfigError(f"{fold_dir} {what} with other settings (trained -> now):\n  {listed}\n"
                          "overwrite=true trains it again (the old folder is kept, renamed), or choose another "
                          "experiment_name")


def fold_state(cfg: DictConfig, fold_dir: Path, record: RunRecord) -> dict | None:
    """The finished fold's metrics when there is nothing to do; else None, with earlier results set aside as
    overwrite/extend say. A finished or half-trained fold is never reused with settings it was not trained with."""
    metrics_path = fold_dir / layout.METRICS
    if cfg.overwrite:
        if _is_first_process():
            _set_aside(fold_dir)
        return None
    previous = _previous_record(fold_dir)
    max_epochs = record.max_epochs
    if metrics_path.is_file():
        _refuse_other_settings(fold_dir, previous, record, "was trained")
        finished = json.loads(metrics_path.read_text())
        epochs = finished.get("epochs")
        if epochs is None or max_epochs == epochs:
            log.info("%s is finished with these settings; nothing to do (results: %s)", fold_dir, metrics_path)
            return finished
        if max_epochs < epochs:
            raise ConfigError(f"{fold_dir} was trained for {epochs} epochs, now trainer.max_epochs={max_epochs}; "
                              "overwrite=true trains it again (the old folder is kept, renamed)")
        if not cfg.get("extend"):
            raise ConfigError(f"{fold_dir} was trained for {epochs} epochs, now trainer.max_epochs={max_epochs}; "
                              f"extend=true continues it to {max_epochs} epochs, overwrite=true trains it again")
        log.info("extending %s from %d to %d epochs", fold_dir, epochs, max_epochs)
        if _is_first_process():
            _set_aside_validation(fold_dir, epochs)
        return None
    if cfg.resume and layout.checkpoint(fold_dir).is_file():
        _refuse_other_settings(fold_dir, previous, record, "was partly trained (resume=true)")
    return None


def check_resumable_checkpoint(cfg: DictConfig, fold_dir: Path) -> None:
    """A damaged or foreign last.ckpt that an unfinished fold would resume from is refused first, before any data
    is read or generated; nothing is moved or deleted."""
    last = layout.checkpoint(fold_dir)
    if cfg.overwrite or not cfg.resume or not last.is_file() or (fold_dir / layout.METRICS).is_file():
        return
    try:
        load_weights_only(last, mmap=True)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; to train the fold again, move {last.name} aside (overwrite=true sets "
                              "the whole fold folder aside)") from None


# ---- 3. module, data and trainer -------------------------------------------------------------------------

def build_module(cfg: DictConfig, setup: RunSetup) -> SegmentationModule:
    record, config = setup.record, setup.config
    extras = {"plan": setup.plan.to_dict(), "configuration": config.name, "fold": record.fold,
              "model": {"name": record.model.name, "kwargs": record.model.kwargs}, "precision": record.precision,
              "previous_stage": record.previous_stage}
    channels_last = bool(cfg.get("channels_last", False))
    if channels_last:
        # weights and batches in channels-last layout: oneDNN/cuDNN convolutions without layout conversions
        # torch's stubs for Module.to omit memory_format, which it takes (documented) and applies to 4D/5D weights
        setup.model.to(memory_format=channels_last_format(config.spatial_dims + 2))  # type: ignore[call-overload]
    finetune = record.finetune or {}
    freeze_epochs = int(finetune.get("freeze_encoder_epochs", 0))
    return SegmentationModule(setup.model, setup.loss, setup.plan.label_scheme, config.patch_size,
                              instantiate(cfg.optimizer), instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                              extras, val_overlap=float(record.validation["overlap"]), channels_last=channels_last,
                              freeze_prefixes=encoder_prefixes(record.model.name) if freeze_epochs else (),
                              freeze_epochs=freeze_epochs, warmup_epochs=int(finetune.get("warmup_epochs", 0)))


def build_datamodule(setup: RunSetup) -> SegmentationDataModule:
    record, config = setup.record, setup.config
    val = record.validation
    cascade = None
    if setup.previous is not None:
        cascade = CascadeInputs(PreviousSegmentations(setup.previous.files),
                                foreground_labels(setup.plan.label_scheme))
    return SegmentationDataModule(setup.prepared.cache(config.name), setup.train_ids, setup.val_ids, config.patch_size,
                                  record.batch_size, record.iterations_per_epoch, record.oversample_foreground,
                                  record.num_workers, val.get("max_cases_per_epoch"), setup.augmentation,
                                  record.augment_on_device, validation_mode=str(val["mode"]),
                                  val_iterations=int(val["iterations"]), seed=record.seed,
                                  num_channels=setup.input_channels,
                                  sampling_groups=setup.plan.label_scheme.sampling_groups, cascade=cascade)


def build_trainer(cfg: DictConfig, fold_dir: Path, holds_out: bool) -> L.Trainer:
    ckpt_dir = fold_dir / layout.CHECKPOINTS
    # "last" every epoch; "best" (by the per-epoch pseudo-Dice) only where there are held-out cases. Two callbacks:
    # Lightning's save_last only copies when a top-k checkpoint is written, so a run whose score stopped
    # improving would otherwise resume from (and validate) an old epoch
    latest = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                             enable_version_counter=False)
    checkpoints = [latest]
    if holds_out:
        best_kwargs = config_dict(cfg.callbacks.checkpoint)
        best_kwargs.pop("save_last", None)
        checkpoints.insert(0, ModelCheckpoint(dirpath=ckpt_dir, filename="best", auto_insert_metric_name=False,
                                              enable_version_counter=False, save_top_k=1, **best_kwargs))
    callbacks, progress_bar = build_callbacks(cfg.callbacks)
    guard = FiniteGuard(layout.checkpoint(fold_dir))
    kwargs = trainer_kwargs(cfg)
    if not holds_out:
        kwargs["limit_val_batches"] = 0  # fold "all": nothing to validate on
    if kwargs["deterministic"]:
        log.info("deterministic algorithms on: ops without a deterministic implementation on this device warn "
                 "instead of stopping the run")
    return L.Trainer(logger=instantiate(cfg.logger), callbacks=[guard, *checkpoints, *callbacks],
                     enable_progress_bar=progress_bar, default_root_dir=str(fold_dir),
                     plugins=[AtomicCheckpointIO()], **kwargs)


def _write_run_files(cfg: DictConfig, setup: RunSetup, fold_dir: Path) -> None:
    fold_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_model(setup.model, setup.config.patch_size, setup.input_channels)
    log.info("model %s: %s", setup.record.model.name, summary)
    write_json(fold_dir / layout.MODEL_SUMMARY, summary.to_dict())
    OmegaConf.save(cfg, fold_dir / layout.CONFIG, resolve=True)
    setup.plan.save(fold_dir / layout.PLAN)
    setup.record.save(fold_dir / layout.RUN_RECORD)
    if HydraConfig.initialized():  # launched from the command line (a sweep's job: its own values)
        write_text(fold_dir / layout.OVERRIDES, OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))
    if setup.init_from is not None:
        write_json(fold_dir / INIT_FROM_FILE, setup.init_from.to_dict())


def _interrupted_message(trainer: L.Trainer, last: Path) -> str:
    kept = (f"{last} holds the last finished epoch" if last.is_file() else "no checkpoint had been written yet")
    return (f"training stopped by SIGTERM (a scheduler's preemption or cancellation, or docker stop) in epoch "
            f"{trainer.current_epoch + 1}/{trainer.max_epochs}; {kept}; run the same command again to resume")


# ---- 4. all steps ------------------------------------------------------------------------------------------

def _train_fold(cfg: DictConfig, setup: RunSetup, fold_dir: Path) -> dict:
    fold = setup.record.fold
    finished = fold_state(cfg, fold_dir, setup.record)
    if finished is not None:
        _complete_next_stage(cfg, setup, fold_dir)
        _complete_probabilities(cfg, setup, fold_dir)
        return finished
    cache = preprocess(setup.prepared, setup.config.name, int(cfg.get("num_processes", 2)))
    if setup.previous is not None:
        check_grids(setup.previous.files, cache, setup.previous.configuration, setup.previous.folds)
        log_previous_stage(setup.previous)
    module = build_module(cfg, setup)
    datamodule = build_datamodule(setup)
    _write_run_files(cfg, setup, fold_dir)
    if cfg.get("compile"):
        setup.model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
    holds_out = bool(setup.val_ids)
    trainer = build_trainer(cfg, fold_dir, holds_out)
    # checkpoints say how the network was trained (Lightning's spelling): prediction runs it the same way
    module.checkpoint_extras["precision"] = str(trainer.precision)
    last = layout.checkpoint(fold_dir)
    resume_from = str(last) if cfg.resume and last.is_file() else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    if holds_out:
        log.info("fold %s: %d training / %d validation cases, patch %s, batch %d", fold, len(setup.train_ids),
                 len(setup.val_ids), setup.config.patch_size, setup.record.batch_size)
    else:
        log.info("fold all: training on all %d cases, none held out (no validation score), patch %s, batch %d",
                 len(setup.train_ids), setup.config.patch_size, setup.record.batch_size)
    reset_peak_memory()
    fit_start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except SIGTERMException:
        raise TrainingInterrupted(_interrupted_message(trainer, last)) from None
    fit_s = time.perf_counter() - fit_start
    if not trainer.is_global_zero:
        return {}
    # the device the run trained on: Lightning's teardown has moved the module itself back to the CPU
    device = trainer.strategy.root_device
    timing = fit_timing(trainer, device, fit_s, setup.record.iterations_per_epoch)
    if not holds_out:
        metrics = {"fold": fold, "epochs": trainer.current_epoch, "checkpoint": str(last), "num_cases": 0,
                   "held_out": 0, "timing": timing}
        write_json(fold_dir / layout.METRICS, metrics)
        return metrics
    if not cfg.validation.final:
        return {}
    return final_validation(setup, fold_dir, trainer, timing)


# ---- 5. final validation -----------------------------------------------------------------------------------

def final_validation(setup: RunSetup, fold_dir: Path, trainer: L.Trainer, timing: dict) -> dict:
    """The held-out cases predicted from their original files as medseg-predict would, scored, metrics.json
    written; an interrupted validation continues with the cases not yet scored."""
    record = setup.record
    # the final weights by default, as nnU-Net: "best" is chosen on these same held-out cases, so scoring it
    # on them again would flatter the cross-validation result
    chosen = layout.checkpoint(fold_dir, str(record.validation["checkpoint"]))
    device = trainer.strategy.root_device
    trained = load_checkpoint(chosen if chosen.is_file() else layout.checkpoint(fold_dir), device)
    axes = record.validation.get("mirror_axes")
    # a cascade's held-out cases get their previous stage as its training data did: from the fold that held them out
    previous = (validation_previous_stage(setup.previous.run, int(record.fold), device)
                if setup.previous is not None else None)
    predictor = Predictor([trained], overlap=float(record.validation["overlap"]),
                          mirror_axes=tuple(axes) if axes else None, device=device, previous_stage=previous)
    metrics = validate_fold(predictor, setup.prepared.manifest, setup.val_ids, fold_dir, record.fold,
                            extra={"epochs": trainer.current_epoch, "checkpoint": trained.source, "timing": timing,
                                   "precision": {"training": record.precision, "validation": predictor.precision}},
                            next_stage=next_stage_export(setup.plan, setup.config, fold_dir),
                            save_probabilities=bool(record.validation.get("save_probabilities", False)))
    log.info("fold %s validation: mean Dice %.4f %s", record.fold, metrics["dice_mean"], metrics["dice"])
    return metrics


def _finished_fold_predictor(cfg: DictConfig, setup: RunSetup, fold_dir: Path, with_previous_stage: bool) -> Predictor:
    """The predictor a finished fold's validation used: its chosen weights, overlap and mirroring (and, for a cascade
    stage, its held-out cases' previous stage)."""
    record = setup.record
    device = torch.device("cuda" if on_gpu(cfg) else "cpu")
    chosen = layout.checkpoint(fold_dir, str(record.validation["checkpoint"]))
    axes = record.validation.get("mirror_axes")
    previous = (validation_previous_stage(setup.previous.run, int(record.fold), device)
                if with_previous_stage and setup.previous is not None else None)
    return Predictor([load_checkpoint(chosen if chosen.is_file() else layout.checkpoint(fold_dir), device)],
                     overlap=float(record.validation["overlap"]), mirror_axes=tuple(axes) if axes else None,
                     device=device, previous_stage=previous)


def _complete_next_stage(cfg: DictConfig, setup: RunSetup, fold_dir: Path) -> None:
    """A finished 3d_lowres fold whose held-out predictions for the cascade are missing (validated before they were
    written) writes them, from the weights its validation used."""
    export = next_stage_export(setup.plan, setup.config, fold_dir)
    if export is None or not setup.val_ids or all(export.done(c) for c in setup.val_ids) \
            or not _is_first_process():
        return
    predictor = _finished_fold_predictor(cfg, setup, fold_dir, with_previous_stage=False)
    written = write_missing_next_stage(export, predictor, setup.prepared.manifest, setup.val_ids)
    log.info("%s: wrote the %s predictions of %d held-out case(s) to %s", fold_dir, export.config.name, written,
             export.folder)


def _complete_probabilities(cfg: DictConfig, setup: RunSetup, fold_dir: Path) -> None:
    """A finished fold asked for validation.save_probabilities=true that was validated without them writes the
    missing ones from the weights its validation used (the label maps and scores stay as they are)."""
    record = setup.record
    if not record.validation.get("save_probabilities") or not setup.val_ids or not _is_first_process():
        return
    missing = missing_probability_cases(fold_dir, setup.val_ids)
    if not missing:
        return
    predictor = _finished_fold_predictor(cfg, setup, fold_dir, with_previous_stage=True)
    write_missing_probabilities(predictor, setup.prepared.manifest, missing, fold_dir)
    log.info("%s: wrote the class probabilities of %d held-out case(s)", fold_dir, len(missing))
