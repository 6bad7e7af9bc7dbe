"""Train one fold: prepare data, build everything from the config, fit, validate on full volumes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from medseg.atomic import write_json
from medseg.checkpoint import load_weights_only
from medseg.loading.augmentation import nnunet_settings
from medseg.loading.datamodule import VALIDATION_MODES, SegmentationDataModule
from medseg.errors import CheckpointError, ConfigError, TrainingInterrupted
from medseg.inference.predictor import Predictor, load_checkpoint
from medseg.locking import exclusive
from medseg.losses import create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import create_model
from medseg.models.summary import summarize_model
from medseg.models.transformer import adapt_patch, patch_multiple
from medseg.precision import cuda_capability, deterministic_setting, training_precision
from medseg.preprocessing.prepare import prepare
from medseg.training.callbacks import build_callbacks
from medseg.training.checkpoint_io import AtomicCheckpointIO
from medseg.training.guards import FiniteGuard
from medseg.training.module import SegmentationModule, channels_last_format
from medseg.training.timing import fit_timing, reset_peak_memory
from medseg.training.validation import validate_fold

log = logging.getLogger(__name__)
# the cascade's fullres stage needs the low-resolution stage's predictions as input
TRAINABLE = {"2d", "3d_fullres", "3d_lowres"}


def _on_gpu(cfg: DictConfig) -> bool:
    return torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda")


def _trainer_kwargs(cfg: DictConfig) -> dict:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs.get("precision") is None:
        on_gpu = _on_gpu(cfg)
        kwargs["precision"] = training_precision("cuda" if on_gpu else "cpu", cuda_capability() if on_gpu else None)
    kwargs["deterministic"] = deterministic_setting(kwargs.get("deterministic"))
    if kwargs["deterministic"]:
        kwargs["benchmark"] = False  # cuDNN autotuning picks algorithms by timing, which is not reproducible
    # batches are drawn per process (each rank its share of the plan's batch, every rank all iterations):
    # Lightning's DistributedSampler would instead split the iterations and pad the validation cases
    kwargs["use_distributed_sampler"] = False
    return kwargs


def _num_workers(cfg: DictConfig) -> int:
    """null: none on CPU (the cores are busy training), up to 12 loader processes beside a GPU."""
    if cfg.sampling.num_workers is not None:
        return int(cfg.sampling.num_workers)
    # the CPUs this process may use (a SLURM allocation), not all of the node's
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(12, max(0, cpus - 2)) if _on_gpu(cfg) else 0


def augmentation_settings(cfg: DictConfig, patch_size):
    """The config's augmentation (None when disabled) and whether it runs on the training device."""
    aug = cfg.get("augmentation")
    if aug is None or not aug.enabled:
        return None, False
    overrides = {k: tuple(v) if isinstance(v, list) else v
                 for k, v in OmegaConf.to_container(aug, resolve=True).items() if k not in ("enabled", "run_on")}
    settings = nnunet_settings(list(patch_size), **overrides)
    run_on = aug.get("run_on", "auto")
    if run_on not in ("auto", "device", "loader"):
        raise ConfigError(f"augmentation.run_on={run_on!r}: expected auto, device or loader")
    return settings, run_on == "device" or (run_on == "auto" and _on_gpu(cfg))


def _mirror_axes(value, augmentation, spatial_dims: int):
    if value == "all":
        return augmentation.mirror_axes if augmentation is not None else tuple(range(spatial_dims))
    return tuple(value) if value else None


def _is_first_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which start this same job again: only the
    first may move earlier results aside."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


def _trained_epochs(metrics: dict) -> int | None:
    return metrics.get("epochs")


def _set_aside_validation(fold_dir: Path, epochs: int) -> None:
    """Extending a finished fold keeps the earlier fold's results under names carrying its epoch count."""
    for name in ("metrics.json", "validation"):
        path = fold_dir / name
        if path.exists():
            path.rename(fold_dir / f"{path.stem}.epochs{epochs}{path.suffix}")


def _set_aside(fold_dir: Path) -> None:
    """overwrite=true never deletes: the old fold folder is renamed with a timestamp."""
    if fold_dir.exists():
        target = fold_dir.with_name(f"{fold_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        fold_dir.rename(target)
        log.warning("moved the previous %s to %s", fold_dir, target)


def _adapt_patch_to_model(plan, config, model_name: str):
    """Models with input constraints (SwinUNETR: multiples of 32) get the planned patch rounded up; the change
    is recorded in the plan that the run and its checkpoints carry."""
    multiple = patch_multiple(model_name)
    adapted = adapt_patch(config.patch_size, multiple)
    if adapted == config.patch_size:
        return config
    config = dataclasses.replace(config, patch_size=adapted)
    plan.explanations.append(f"{config.name} patch: rounded up to multiples of {multiple} for model {model_name} "
                             f"-> {adapted}")
    plan.overridden.append(f"{config.name}.patch_size (model {model_name})")
    plan.configurations[config.name] = config
    return config


def _interrupted_message(trainer: L.Trainer, last: Path) -> str:
    kept = (f"{last} holds the last finished epoch" if last.is_file() else "no checkpoint had been written yet")
    return (f"training stopped by SIGTERM (a scheduler's preemption or cancellation, or docker stop) in epoch "
            f"{trainer.current_epoch + 1}/{trainer.max_epochs}; {kept}; run the same command again to resume")


def train_fold(cfg: DictConfig) -> dict:
    """Train one fold; a second run on the same fold folder is refused while this one runs (DDP's extra
    processes re-run this job under the first one's lock, so they take none)."""
    fold = int(cfg.fold)
    run_dir = Path(cfg.run_dir)
    lock = (exclusive(run_dir / f".fold_{fold}.lock", run_dir / f"fold_{fold}", "training run")
            if _is_first_process() else contextlib.nullcontext())
    with lock:
        return _train_fold(cfg)


def _train_fold(cfg: DictConfig) -> dict:
    if cfg.validation.mode not in VALIDATION_MODES:  # before anything is moved aside or prepared
        raise ConfigError(f"validation.mode={cfg.validation.mode!r}: expected one of {list(VALIDATION_MODES)}")
    fold = int(cfg.fold)
    fold_dir = Path(cfg.run_dir) / f"fold_{fold}"
    metrics_path = fold_dir / "metrics.json"
    max_epochs = int(cfg.trainer.max_epochs)
    if metrics_path.is_file() and not cfg.overwrite:
        finished = json.loads(metrics_path.read_text())
        epochs = _trained_epochs(finished)
        if not (cfg.get("extend") and epochs is not None and max_epochs > epochs):
            hint = (f"; extend=true continues it to {max_epochs} epochs" if epochs is not None and max_epochs > epochs
                    else "")
            log.info("%s is finished (metrics.json exists); nothing to do (overwrite=true retrains%s)", fold_dir, hint)
            return finished
        log.info("extending %s from %d to %d epochs", fold_dir, epochs, max_epochs)
        if _is_first_process():
            _set_aside_validation(fold_dir, epochs)
    if cfg.overwrite and _is_first_process():
        _set_aside(fold_dir)
    last = fold_dir / "checkpoints" / "last.ckpt"
    if cfg.resume and last.is_file():
        # a damaged or foreign last.ckpt is refused now, before preparing data; nothing is moved or deleted
        try:
            load_weights_only(last, mmap=True)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; to train the fold again, move {last.name} aside (overwrite=true sets "
                                  "the whole fold folder aside)") from None

    if cfg.configuration not in TRAINABLE:
        raise ConfigError(f"configuration={cfg.configuration} cannot be trained yet; trainable: {sorted(TRAINABLE)}")
    prepared = prepare(cfg, [cfg.configuration])
    plan, manifest = prepared.plan, prepared.manifest
    config = plan.configuration(cfg.configuration)
    train_ids, val_ids = manifest.split(fold)
    L.seed_everything(int(cfg.seed), workers=True)

    config = _adapt_patch_to_model(plan, config, str(cfg.model.name))
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model = create_model(cfg.model.name, config.spatial_dims, manifest.num_channels, manifest.num_classes,
                         plan=config, **model_kwargs)
    loss_kwargs = OmegaConf.to_container(cfg.loss, resolve=True)
    if loss_kwargs.get("batch_dice", False) is None:
        loss_kwargs["batch_dice"] = config.batch_dice
    heads = getattr(model, "heads", 0)
    loss = with_deep_supervision(create_loss(loss_kwargs.pop("name"), **loss_kwargs), heads + 1)
    extras = {"plan": plan.to_dict(), "configuration": config.name, "fold": fold,
              "model": {"name": str(cfg.model.name), "kwargs": model_kwargs}}
    channels_last = bool(cfg.get("channels_last", False))
    if channels_last:
        # weights and batches in channels-last layout: oneDNN/cuDNN convolutions without layout conversions
        model.to(memory_format=channels_last_format(config.spatial_dims + 2))
    module = SegmentationModule(model, loss, manifest.num_classes, config.patch_size, instantiate(cfg.optimizer),
                                instantiate(cfg.scheduler) if cfg.get("scheduler") else None, extras,
                                val_overlap=float(cfg.validation.overlap), channels_last=channels_last)
    batch_size = int(cfg.sampling.batch_size or config.batch_size)
    augmentation, augment_on_device = augmentation_settings(cfg, config.patch_size)
    datamodule = SegmentationDataModule(prepared.cache(config.name), train_ids, val_ids, config.patch_size,
                                        batch_size, cfg.sampling.iterations_per_epoch,
                                        cfg.sampling.oversample_foreground, _num_workers(cfg),
                                        cfg.validation.max_cases_per_epoch, augmentation, augment_on_device,
                                        validation_mode=str(cfg.validation.mode),
                                        val_iterations=int(cfg.validation.iterations), seed=int(cfg.seed),
                                        num_channels=manifest.num_channels)

    fold_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_model(model, config.patch_size, manifest.num_channels)
    log.info("model %s: %s", cfg.model.name, summary)
    write_json(fold_dir / "model_summary.json", summary.to_dict())
    if cfg.get("compile"):
        model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
    OmegaConf.save(cfg, fold_dir / "config.yaml", resolve=True)
    plan.save(fold_dir / "plan.json")
    ckpt_dir = fold_dir / "checkpoints"
    best_kwargs = OmegaConf.to_container(cfg.callbacks.checkpoint, resolve=True)
    best_kwargs.pop("save_last", None)
    # two callbacks: Lightning's save_last only copies when a top-k checkpoint is written, so a run whose
    # score stopped improving would otherwise resume from (and validate) an old epoch
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", auto_insert_metric_name=False,
                           enable_version_counter=False, save_top_k=1, **best_kwargs)
    latest = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                             enable_version_counter=False)
    callbacks, progress_bar = build_callbacks(cfg.callbacks)
    guard = FiniteGuard(ckpt_dir / "last.ckpt")
    trainer_kwargs = _trainer_kwargs(cfg)
    if trainer_kwargs["deterministic"]:
        log.info("deterministic algorithms on: ops without a deterministic implementation on this device warn "
                 "instead of stopping the run")
    trainer = L.Trainer(logger=instantiate(cfg.logger), callbacks=[guard, best, latest, *callbacks],
                        enable_progress_bar=progress_bar, default_root_dir=str(fold_dir),
                        plugins=[AtomicCheckpointIO()], **trainer_kwargs)
    # checkpoints say how the network was trained: prediction runs it the same way where that is safe
    extras["precision"] = str(trainer.precision)
    resume_from = str(last) if cfg.resume and last.is_file() else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    log.info("fold %d: %d training / %d validation cases, patch %s, batch %d", fold, len(train_ids),
             len(val_ids), config.patch_size, batch_size)
    reset_peak_memory()
    fit_start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except SIGTERMException:
        raise TrainingInterrupted(_interrupted_message(trainer, last)) from None
    fit_s = time.perf_counter() - fit_start

    if not cfg.validation.final or not trainer.is_global_zero:
        return {}
    # the final weights by default, as nnU-Net: "best" is chosen on these same held-out cases, so scoring it
    # on them again would flatter the cross-validation result
    chosen = ckpt_dir / f"{cfg.validation.checkpoint}.ckpt"
    # the device the run trained on: Lightning's teardown has moved the module itself back to the CPU
    device = trainer.strategy.root_device
    timing = fit_timing(trainer, device, fit_s, int(cfg.sampling.iterations_per_epoch))
    trained = load_checkpoint(chosen if chosen.is_file() else last, device)
    predictor = Predictor([trained], overlap=float(cfg.validation.overlap),
                          mirror_axes=_mirror_axes(cfg.validation.mirror_axes, augmentation, config.spatial_dims),
                          device=device)
    metrics = validate_fold(predictor, manifest, val_ids, fold_dir, fold,
                            extra={"epochs": trainer.current_epoch, "checkpoint": trained.source, "timing": timing,
                                   "precision": {"training": extras["precision"],
                                                 "validation": predictor.precision}})
    log.info("fold %d validation: mean Dice %.4f %s", fold, metrics["dice_mean"], metrics["dice"])
    return metrics
