"""Model registry: ``create_model(name, spatial_dims, in_channels, out_channels, plan=..., **kw)``.

Every model takes the plan's configuration for its topology, returns logits in eval mode and, with deep
supervision in training mode, a list of logits from the finest resolution down.

Each model is registered with a :class:`ModelSpec`: its factory, and the constraints and defaults the rest of
medseg asks the registry about (``model_spec(name)``, ``adapt_patch_for_model(name, patch)``) instead of
importing the model's module. A preset (``register_preset``) is a model of its own name built by another model's
factory with other default keys (``unetr_small``: UNETR with a ViT-Tiny-sized encoder), so its runs and
checkpoints carry its own name. ``create_model`` refuses a key the model's factory does not take (ConfigError
naming it), so a misspelled key in a model config never silently trains the defaults.

Ablation controls: every hybrid family (Mamba, mLSTM, transformer blocks added to a convolutional U-Net) takes
``control=True``, which builds the same network with that distinctive block replaced by identity.
``register_control(family)`` registers it as the preset ``<family>_control`` (CONTROL_SUFFIX), with its own run
folders and checkpoints and the family's optimiser and schedule, so the block is judged against its own network.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch.nn as nn

from medseg.config_keys import accepted_keys, check_keys
from medseg.errors import ConfigError
from medseg.planning.plan import ConfigurationPlan

__all__ = ["CONTROL_SUFFIX", "ENCODER_PREFIXES", "ModelSpec", "adapt_patch", "adapt_patch_for_model",
           "check_model_keys", "create_model", "encoder_prefixes", "list_models", "model_spec", "register_control",
           "register_model", "register_preset"]

# create_model's own arguments, never keys of a model config
_BUILD_ARGS = ("spatial_dims", "in_channels", "out_channels", "plan")
# a family's matched control is the model "<family>_control" (the leaderboard pairs runs by this name)
CONTROL_SUFFIX = "_control"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What medseg knows about a registered model without building it or importing its module.

    name: the registry name: ``model.name`` in configs, the run folder's first part, the checkpoint's model.
    factory: ``factory(spatial_dims, in_channels, out_channels, plan=None, **keys) -> nn.Module``.
    patch_multiple: every spatial axis of the training patch must be a multiple of it (1: no constraint);
        training rounds the planned patch up with ``adapt_patch_for_model``.
    deep_supervision: the model has deep-supervision heads (``deep_supervision=True`` gives a list of logits,
        finest first, in training; ``model.heads`` counts the extra outputs).
    default_optimizer, default_scheduler: the optimizer / scheduler config (configs/optimizer/<x>.yaml,
        configs/scheduler/<x>.yaml) training selects for this model when the command line does not choose one.
    defaults: keys passed to the factory unless the config gives them (a preset's own values).
    base: the model a preset is built by (None: a model with its own factory).
    """

    name: str
    factory: Callable[..., nn.Module]
    patch_multiple: int = 1
    deep_supervision: bool = True
    default_optimizer: str | None = None
    default_scheduler: str | None = None
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    base: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys the model takes (besides ``name``, which selects it)."""
        return accepted_keys(self.factory, exclude=_BUILD_ARGS)


_MODELS: dict[str, ModelSpec] = {}


def _add(spec: ModelSpec) -> ModelSpec:
    if spec.name in _MODELS:
        raise ValueError(f"model {spec.name!r} registered twice")
    if not isinstance(spec.patch_multiple, int) or spec.patch_multiple < 1:
        raise ValueError(f"model {spec.name!r}: patch_multiple must be an int >= 1, got {spec.patch_multiple!r}")
    # keys() refuses a factory taking **kwargs; a preset's defaults must be keys of its base
    check_keys(spec.defaults, spec.keys, f"preset {spec.name!r} of model {spec.base!r}", "model", spec.name)
    _MODELS[spec.name] = spec
    return spec


def register_model(name: str, *, patch_multiple: int = 1, deep_supervision: bool = True,
                   default_optimizer: str | None = None, default_scheduler: str | None = None):
    """Decorator registering a model factory under ``name`` with its :class:`ModelSpec` fields."""
    def wrap(factory: Callable[..., nn.Module]):
        _add(ModelSpec(name, factory, patch_multiple=patch_multiple, deep_supervision=deep_supervision,
                       default_optimizer=default_optimizer, default_scheduler=default_scheduler))
        return factory
    return wrap


def register_preset(name: str, base: str, **defaults) -> ModelSpec:
    """Register ``name`` as model ``base`` with other default keys (the config may still set any of them); it
    shares the base's constraints and factory but is a model of its own name (runs, checkpoints)."""
    spec = model_spec(base)
    return _add(dataclasses.replace(spec, name=name, defaults=MappingProxyType({**spec.defaults, **defaults}),
                                    base=spec.base or base))


def register_control(base: str) -> ModelSpec:
    """Register ``<base>_control``: model ``base`` built with ``control=True`` (its distinctive block replaced by
    identity). The family's factory must take ``control``; presets of a preset keep that preset's values."""
    if "control" not in model_spec(base).keys:
        raise ValueError(f"model {base!r} has no control: its factory takes no 'control' key")
    return register_preset(f"{base}{CONTROL_SUFFIX}", base, control=True)


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_spec(name: str) -> ModelSpec:
    """The registered model ``name``'s spec; ConfigError for an unknown name."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; available: {list_models()}") from None


def adapt_patch(patch_size: Sequence[int], multiple: int) -> list[int]:
    """Each axis of ``patch_size`` rounded up to a multiple of ``multiple`` (pure; the input is not modified)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return [max(1, math.ceil(int(n) / multiple)) * multiple for n in patch_size]


def adapt_patch_for_model(name: str, patch_size: Sequence[int]) -> list[int]:
    """The patch model ``name`` trains on: each axis of ``patch_size`` rounded up to the model's
    ``patch_multiple`` (a new list equal to the input for models without a constraint)."""
    return adapt_patch(patch_size, model_spec(name).patch_multiple)


def check_model_keys(name: str, kwargs: Mapping[str, Any]) -> ModelSpec:
    """Model ``name``'s spec, after checking its config keys (``kwargs``, without ``name``) without building it:
    ConfigError for an unknown model or a key it does not take (a config can be checked before data is read)."""
    spec = model_spec(name)
    check_keys(kwargs, spec.keys, f"model {name!r}", "model", name)
    return spec


def create_model(name: str, spatial_dims: int, in_channels: int, out_channels: int,
                 plan: ConfigurationPlan | None = None, **kwargs) -> nn.Module:
    """Build model ``name``; ``kwargs`` are its config's keys (without ``name``). A key the model does not take
    is a ConfigError naming it and the accepted keys."""
    spec = check_model_keys(name, kwargs)
    return spec.factory(spatial_dims, in_channels, out_channels, plan=plan, **{**spec.defaults, **kwargs})


# Each family's encoder, as parameter-name prefixes of the built model (what ``finetune.freeze_encoder_epochs``
# keeps fixed): everything from the input down to the bottleneck, including the skip-path blocks that read the
# encoder's features; the decoder, its upsampling and the output heads are the rest. Presets share their base's,
# controls included (a prefix of a replaced block, such as vilu_net's "vil", then simply matches nothing).
ENCODER_PREFIXES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "unet": ("net.input_block", "net.downsamples", "net.bottleneck"),  # MONAI DynUNet
    "resenc_unet": ("stem", "encoder"),
    "umamba_bot": ("stem", "encoder"),  # the Mamba bottleneck is the last encoder stage
    "umamba_enc": ("stem", "encoder"),
    "vilu_net": ("stem", "encoder", "vil"),  # mLSTM layers after encoder stages
    # MONAI's transformer U-Nets: the transformer plus the encoder blocks on its skip paths
    "swin_unetr": ("net.swinViT", "net.encoder1", "net.encoder2", "net.encoder3", "net.encoder4", "net.encoder10"),
    "unetr": ("net.vit", "net.encoder1", "net.encoder2", "net.encoder3", "net.encoder4"),
})


def encoder_prefixes(name: str) -> tuple[str, ...]:
    """The parameter-name prefixes of model ``name``'s encoder (a preset's are its base's); ConfigError for a
    model whose encoder is not declared in ENCODER_PREFIXES."""
    spec = model_spec(name)
    family = spec.base or spec.name
    if family not in ENCODER_PREFIXES:
        raise ConfigError(f"model {name!r}: its encoder is not declared (medseg.models.registry.ENCODER_PREFIXES), "
                          "so finetune.freeze_encoder_epochs cannot be used with it")
    return ENCODER_PREFIXES[family]
