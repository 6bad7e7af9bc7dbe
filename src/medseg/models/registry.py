"""Model registry: ``create_model(name, spatial_dims, in_channels, out_channels, plan=..., **kw)``.

Every model takes the plan's configuration for its topology, returns logits in eval mode and, with deep
supervision in training mode, a list of logits from the finest resolution down.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from medseg.errors import ConfigError
from medseg.planning.plan import ConfigurationPlan

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(factory: Callable[..., nn.Module]):
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = factory
        return factory
    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, spatial_dims: int, in_channels: int, out_channels: int,
                 plan: ConfigurationPlan | None = None, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {list_models()}")
    return _MODELS[name](spatial_dims, in_channels, out_channels, plan=plan, **kwargs)
