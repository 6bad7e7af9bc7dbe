"""Models and losses built from a composed ``train`` config the way training builds them, without data.

Training (medseg.training.run / medseg.training.settings.resolve_run) takes ``cfg.model`` without ``name`` as
the model's keyword arguments, ``cfg.loss`` without ``name`` as the loss's (a ``batch_dice: null`` replaced by
the plan's choice), rounds the planned patch up for the model and wraps the loss for deep supervision
(``model.heads + 1`` outputs). ``build`` repeats exactly that on a given configuration plan.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn
from hydra import compose as hydra_compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from medseg.cli.common import CONFIG_DIR
from medseg.losses import create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import adapt_patch_for_model, create_model
from medseg.planning.plan import ConfigurationPlan

FEATURES = [4, 8, 16, 32]


def compose_train(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """The shipped ``train`` config, composed as medseg-train composes it."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=hydra_node)


def tiny_plan(dims: int, patch: list[int]) -> ConfigurationPlan:
    """Four stages of 4-32 features (the width tests/models uses), residual-encoder block counts included."""
    n = len(FEATURES)
    return ConfigurationPlan(f"{dims}d", dims, [1.0] * dims, patch, patch, 2, [[1] * dims] + [[2] * dims] * (n - 1),
                             [[3] * dims] * n, FEATURES, ["zscore"], [False], network="resenc",
                             encoder_blocks=[1, 2, 2, 2], decoder_convs=[1] * (n - 1))


def model_kwargs(cfg: DictConfig) -> tuple[str, dict]:
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    return str(kwargs.pop("name")), kwargs


def loss_kwargs(cfg: DictConfig, config: ConfigurationPlan) -> tuple[str, dict]:
    kwargs = OmegaConf.to_container(cfg.loss, resolve=True)
    if kwargs.get("batch_dice", False) is None:
        kwargs["batch_dice"] = config.batch_dice
    return str(kwargs.pop("name")), kwargs


def build(cfg: DictConfig, config: ConfigurationPlan, in_channels: int = 1,
          out_channels: int = 3) -> tuple[nn.Module, nn.Module, ConfigurationPlan]:
    """(model, deep-supervised loss, the configuration with the patch adapted to the model)."""
    name, kwargs = model_kwargs(cfg)
    config = dataclasses.replace(config, patch_size=adapt_patch_for_model(name, config.patch_size))
    model = create_model(name, config.spatial_dims, in_channels, out_channels, plan=config, **kwargs)
    loss_name, kwargs = loss_kwargs(cfg, config)
    loss = with_deep_supervision(create_loss(loss_name, **kwargs), getattr(model, "heads", 0) + 1)
    return model, loss, config
