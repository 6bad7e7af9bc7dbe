"""Train one fold: prepare data, build everything from the config, fit, validate on full volumes."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from medseg.atomic import write_json
from medseg.data.datamodule import SegmentationDataModule
from medseg.errors import ConfigError
from medseg.inference.predictor import Predictor, load_checkpoint
from medseg.losses import create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import create_model
from medseg.models.summary import summarize_model
from medseg.models.transformer import adapt_patch, patch_multiple
from medseg.prepare import prepare
from medseg.training.callbacks import EpochSummary
from medseg.training.module import SegmentationModule
from medseg.training.validation import validate_fold

log = logging.getLogger(__name__)
# the cascade's fullres stage needs the low-resolution stage's predictions as input
TRAINABLE = {"2d", "3d_fullres", "3d_lowres"}


def _trainer_kwargs(cfg: DictConfig) -> dict:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs.get("precision") is None:
        on_gpu = torch.cuda.is_available() and kwargs.get("accelerator") in ("auto", "gpu", "cuda")
        kwargs["precision"] = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    return kwargs


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


def train_fold(cfg: DictConfig) -> dict:
    fold = int(cfg.fold)
    fold_dir = Path(cfg.run_dir) / f"fold_{fold}"
    metrics_path = fold_dir / "metrics.json"
    if metrics_path.is_file() and not cfg.overwrite:
        log.info("%s is finished (metrics.json exists); nothing to do (overwrite=true retrains)", fold_dir)
        return json.loads(metrics_path.read_text())
    if cfg.overwrite:
        _set_aside(fold_dir)

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
    module = SegmentationModule(model, loss, manifest.num_classes, config.patch_size, instantiate(cfg.optimizer),
                                instantiate(cfg.scheduler) if cfg.get("scheduler") else None, extras,
                                val_overlap=float(cfg.validation.overlap))
    batch_size = int(cfg.sampling.batch_size or config.batch_size)
    datamodule = SegmentationDataModule(prepared.cache(config.name), train_ids, val_ids, config.patch_size,
                                        batch_size, cfg.sampling.iterations_per_epoch,
                                        cfg.sampling.oversample_foreground, cfg.sampling.num_workers,
                                        cfg.validation.max_cases_per_epoch)

    fold_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_model(model, config.patch_size, manifest.num_channels)
    log.info("model %s: %s", cfg.model.name, summary)
    write_json(fold_dir / "model_summary.json", summary.to_dict())
    OmegaConf.save(cfg, fold_dir / "config.yaml", resolve=True)
    plan.save(fold_dir / "plan.json")
    ckpt_dir = fold_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", auto_insert_metric_name=False,
                                 enable_version_counter=False, save_top_k=1,
                                 **OmegaConf.to_container(cfg.callbacks.checkpoint, resolve=True))
    trainer = L.Trainer(logger=instantiate(cfg.logger), callbacks=[checkpoint, EpochSummary()], default_root_dir=str(fold_dir),
                        **_trainer_kwargs(cfg))
    last = ckpt_dir / "last.ckpt"
    resume_from = str(last) if cfg.resume and last.is_file() else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    log.info("fold %d: %d training / %d validation cases, patch %s, batch %d", fold, len(train_ids),
             len(val_ids), config.patch_size, batch_size)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    if not cfg.validation.final:
        return {}
    best = ckpt_dir / "best.ckpt"
    device = next(module.parameters()).device
    trained = load_checkpoint(best if best.is_file() else last, device)
    predictor = Predictor([trained], overlap=float(cfg.validation.overlap),
                          mirror_axes=tuple(cfg.validation.mirror_axes) if cfg.validation.mirror_axes else None,
                          device=device)
    metrics = validate_fold(predictor, manifest, val_ids, fold_dir, fold)
    log.info("fold %d validation: mean Dice %.4f %s", fold, metrics["dice_mean"], metrics["dice"])
    return metrics
