"""The one step that turns a composed config and a plan into the settings a run uses (medseg.record.RunRecord).

Every null that means "decided elsewhere" (batch size, batch Dice, loader workers, precision, where
augmentation runs, validation mirror axes, the patch adapted to the model) is decided here and nowhere else;
``check_config`` rejects what can be rejected before any data is read.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, cast

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from medseg.errors import ConfigError
from medseg.layout import ALL_FOLD
from medseg.loading.augmentation import AugmentationSettings, nnunet_settings
from medseg.loading.datamodule import VALIDATION_MODES
from medseg.losses import check_loss_keys
from medseg.models import check_model_keys
from medseg.models.registry import encoder_prefixes
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.precision import cuda_capability, deterministic_setting, training_precision
from medseg.record import Component, RunRecord
from medseg.training.cascade import check_cascade_keys
from medseg.training.schedules import supports_warmup

# 3d_cascade_fullres: with the out-of-fold predictions of a 3d_lowres run as extra inputs (training.cascade)
TRAINABLE = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
CASCADES = ("3d_cascade_fullres",)
AUGMENTATION_RUN_ON = ("auto", "device", "loader")
# set by medseg itself, not by the trainer config
_MANAGED_TRAINER_KEYS = {"logger", "callbacks", "enable_progress_bar", "default_root_dir", "plugins",
                         "use_distributed_sampler"}


def parse_fold(value: Any) -> int | str:
    """A cross-validation fold index, or "all" (train on every case, hold none out)."""
    if isinstance(value, str) and value.strip().lower() == ALL_FOLD:
        return ALL_FOLD
    try:
        fold = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"fold={value!r}: expected a fold index (0, 1, ...) or 'all'") from None
    if fold < 0 or str(value).strip() != str(fold):
        raise ConfigError(f"fold={value!r}: expected a fold index (0, 1, ...) or 'all'")
    return fold


def config_dict(node: DictConfig) -> dict[str, Any]:
    """A config mapping node as a plain dict, interpolations resolved (its keys are strings; OmegaConf's return
    type also allows lists and other key types)."""
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    return cast(dict[str, Any], values)


def on_gpu(cfg: DictConfig) -> bool:
    return torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda")


def trainer_kwargs(cfg: DictConfig) -> dict:
    """lightning.Trainer arguments from cfg.trainer, precision and determinism decided."""
    kwargs = config_dict(cfg.trainer)
    if kwargs.get("precision") is None:
        gpu = on_gpu(cfg)
        kwargs["precision"] = training_precision("cuda" if gpu else "cpu", cuda_capability() if gpu else None)
    kwargs["deterministic"] = deterministic_setting(kwargs.get("deterministic"))
    if kwargs["deterministic"]:
        kwargs["benchmark"] = False  # cuDNN autotuning picks algorithms by timing, which is not reproducible
    # batches are drawn per process (each rank its share of the plan's batch, every rank all iterations):
    # Lightning's DistributedSampler would instead split the iterations and pad the validation cases
    kwargs["use_distributed_sampler"] = False
    return kwargs


def num_workers(cfg: DictConfig) -> int:
    """null: none on CPU (the cores are busy training), up to 12 loader processes beside a GPU."""
    if cfg.sampling.num_workers is not None:
        return int(cfg.sampling.num_workers)
    # the CPUs this process may use (a SLURM allocation), not all of the node's
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(12, max(0, cpus - 2)) if on_gpu(cfg) else 0


def augmentation_settings(cfg: DictConfig, patch_size) -> tuple[AugmentationSettings | None, bool]:
    """The config's augmentation (None when disabled) and whether it runs on the training device (never for a
    cascade: its previous-stage channels are augmented on the host, after the rest, see loading.previous_stage)."""
    aug = cfg.get("augmentation")
    if aug is None or not aug.enabled:
        return None, False
    values = config_dict(aug)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k not in ("enabled", "run_on")}
    known = {f.name for f in dataclasses.fields(AugmentationSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"augmentation: unknown key(s) {unknown}; accepted: {sorted(known | {'enabled', 'run_on'})}")
    settings = nnunet_settings(list(patch_size), **overrides)
    run_on = aug.get("run_on", "auto")
    on_device = run_on == "device" or (run_on == "auto" and on_gpu(cfg))
    return settings, on_device and cfg.get("configuration") not in CASCADES


def validation_mirror_axes(value, augmentation: AugmentationSettings | None, spatial_dims: int):
    """"all": the axes training mirrored (every axis without augmentation); a list; null/empty: none."""
    if value == "all":
        return tuple(augmentation.mirror_axes) if augmentation is not None else tuple(range(spatial_dims))
    return tuple(value) if value else None


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked from the config alone, before any data is read or anything written."""
    parse_fold(cfg.fold)
    if cfg.configuration not in TRAINABLE:
        raise ConfigError(f"configuration={cfg.configuration} cannot be trained yet; trainable: {list(TRAINABLE)}")
    if cfg.validation.mode not in VALIDATION_MODES:
        raise ConfigError(f"validation.mode={cfg.validation.mode!r}: expected one of {list(VALIDATION_MODES)}")
    aug = cfg.get("augmentation")
    if aug is not None and aug.get("run_on", "auto") not in AUGMENTATION_RUN_ON:
        raise ConfigError(f"augmentation.run_on={aug.run_on!r}: expected one of {list(AUGMENTATION_RUN_ON)}")
    check_cascade_keys(cfg.get("cascade"))
    if cfg.configuration in CASCADES and aug is not None and aug.get("run_on", "auto") == "device":
        raise ConfigError(f"augmentation.run_on=device: {cfg.configuration} augments its previous-stage channels "
                          "with scipy in the loader, after the spatial transforms; use run_on=loader or auto")
    for group, check in (("model", check_model_keys), ("loss", check_loss_keys)):
        values = config_dict(cfg[group])
        check(str(values.pop("name")), values)  # keys only: nothing is built before the plan exists
    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"} - _MANAGED_TRAINER_KEYS
    unknown = sorted(set(cfg.trainer) - accepted)
    if unknown:
        raise ConfigError(f"trainer: unknown key(s) {unknown} (not arguments of lightning.Trainer); "
                          f"accepted: {sorted(accepted)}")
    finetune = finetune_settings(cfg)
    # a stand-in parameter: the optimizer and scheduler partials are called once, so misspelled arguments or
    # targets fail here and not after data preparation
    try:
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except (InstantiationException, TypeError, ValueError) as e:
        raise ConfigError(f"optimizer: {_short(e)}") from None
    scheduler = None
    if cfg.get("scheduler"):
        try:
            scheduler = instantiate(cfg.scheduler)(optimizer)
        except (InstantiationException, TypeError, ValueError) as e:
            raise ConfigError(f"scheduler: {_short(e)}") from None
    if finetune["warmup_epochs"] and not supports_warmup(scheduler):
        raise ConfigError(f"finetune.warmup_epochs={finetune['warmup_epochs']}: the warm-up goes before one of "
                          "medseg's schedules (scheduler=poly or warmup_cosine); this config has "
                          f"{type(scheduler).__name__ if scheduler is not None else 'no scheduler'}")


FINETUNE_KEYS = ("freeze_encoder_epochs", "warmup_epochs")


def finetune_settings(cfg: DictConfig) -> dict[str, int]:
    """cfg.finetune checked: its two keys, whole numbers >= 0, below trainer.max_epochs; freezing needs a model
    whose encoder the registry declares."""
    values = config_dict(cfg.finetune) if cfg.get("finetune") is not None else {}
    unknown = sorted(set(values) - set(FINETUNE_KEYS))
    if unknown:
        raise ConfigError(f"finetune: unknown key(s) {unknown}; accepted: {list(FINETUNE_KEYS)}")
    settings = {}
    for key in FINETUNE_KEYS:
        value = values.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"finetune.{key}={value!r}: expected a whole number of epochs >= 0")
        if value and value >= int(cfg.trainer.max_epochs):
            raise ConfigError(f"finetune.{key}={value} is not below trainer.max_epochs={cfg.trainer.max_epochs}")
        settings[key] = value
    if settings["freeze_encoder_epochs"]:
        encoder_prefixes(str(cfg.model.name))  # ConfigError for a model without a declared encoder
    return settings


def _short(e: Exception) -> str:
    cause = e.__cause__ or e
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__


def _component(node: DictConfig | None) -> Component | None:
    if not node:
        return None
    values = config_dict(node)
    name = str(values.pop("_target_", values.pop("name", "")))
    values.pop("_partial_", None)
    return Component(name, values)


def _scheduler(cfg: DictConfig) -> Component | None:
    scheduler = _component(cfg.get("scheduler"))
    if scheduler is not None:
        # the schedule's horizon is trainer.max_epochs (set again when a fold is extended): recorded there
        scheduler.kwargs.pop("total_epochs", None)
    return scheduler


def resolve_run(cfg: DictConfig, plan: Plan, config: ConfigurationPlan, fold: int | str, num_train: int,
                num_val: int, previous_stage: dict | None = None, init_from: str | None = None) -> RunRecord:
    """The run's settings from the config and the (model-adapted) configuration plan; ``previous_stage``: a
    cascade's (medseg.training.cascade.previous_stage_record); ``init_from``: the checkpoint file the weights
    start from (training.init_from.find_checkpoint)."""
    finetune = finetune_settings(cfg)
    model_kwargs = config_dict(cfg.model)
    model_name = str(model_kwargs.pop("name"))
    loss_kwargs = config_dict(cfg.loss)
    loss_name = str(loss_kwargs.pop("name"))
    if loss_kwargs.get("batch_dice", False) is None:
        loss_kwargs["batch_dice"] = config.batch_dice
    augmentation, augment_on_device = augmentation_settings(cfg, config.patch_size)
    kwargs = trainer_kwargs(cfg)
    validation = config_dict(cfg.validation)
    axes = validation_mirror_axes(validation.get("mirror_axes"), augmentation, config.spatial_dims)
    validation["mirror_axes"] = list(axes) if axes else []
    return RunRecord(
        fold=fold, configuration=config.name, dataset=plan.dataset, num_train_cases=num_train,
        num_val_cases=num_val, model=Component(model_name, model_kwargs), loss=Component(loss_name, loss_kwargs),
        optimizer=_component(cfg.optimizer) or Component(""), scheduler=_scheduler(cfg),
        spatial_dims=config.spatial_dims, patch_size=[int(p) for p in config.patch_size],
        batch_size=int(cfg.sampling.batch_size or config.batch_size),
        oversample_foreground=float(cfg.sampling.oversample_foreground),
        iterations_per_epoch=int(cfg.sampling.iterations_per_epoch), max_epochs=int(cfg.trainer.max_epochs),
        seed=int(cfg.seed), precision=str(kwargs["precision"]), accelerator=str(kwargs.get("accelerator", "auto")),
        devices=kwargs.get("devices", 1), gradient_clip_val=kwargs.get("gradient_clip_val"),
        augmentation=_plain(dataclasses.asdict(augmentation)) if augmentation is not None else None,
        augment_on_device=augment_on_device, num_workers=num_workers(cfg), plan_key=str(plan.fingerprint_key),
        validation=validation, previous_stage=previous_stage, init_from=init_from,
        finetune=finetune if any(finetune.values()) else None)


def _plain(value):
    """Tuples as lists, so that a record read back from JSON compares equal."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
