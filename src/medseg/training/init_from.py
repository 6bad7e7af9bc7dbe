"""``init_from=<checkpoint | fold folder | run folder>``: start a run from a trained medseg model's weights.

The source is read weights-only (medseg.checkpoint.load_weights_only); the model name, its settings and the plan
it was trained with travel inside every medseg checkpoint (training.module.on_save_checkpoint). Refused before any
data is read: another model or other model settings, 2D against 3D (``check_compatible``); refused once the model
is built: no layer that fits. Every tensor of the new model is then either

* loaded: same name and shape;
* adapted: the layers reading the input when the number of input channels changed (their weights repeated over
  the new channels and scaled by old/new, or, for fewer channels, averaged and scaled by old/new: an input of
  identical channels then gives the activations the source gave), and learnable position embeddings of a
  transformer (UNETR's ViT) interpolated to the new patch grid;
* new: the output heads (deep-supervision heads included) when the number of outputs changed, and anything else
  without a counterpart of its shape, as the model initialised it.

What happened to each is logged and written as ``init_from.json`` into the fold folder (``InitFromResult``).
SwinUNETR's relative position tables depend on its window size, not on the patch, and are loaded as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from medseg import layout
from medseg.checkpoint import load_weights_only
from medseg.errors import CheckpointError, ConfigError
from medseg.planning.plan import Plan
from medseg.preprocessing.previous_stage import num_input_channels

log = logging.getLogger(__name__)

INIT_FROM_FILE = "init_from.json"
POSITION_EMBEDDING = "position_embeddings"  # MONAI's ViT patch embedding: (1, tokens, hidden), tokens in C order


@dataclass(frozen=True)
class SourceCheckpoint:
    """A trained medseg model, as read from its checkpoint."""

    path: Path  # the checkpoint file
    chosen: str  # how it was found from what init_from named
    model_name: str
    model_kwargs: dict[str, Any]
    configuration: str
    spatial_dims: int
    patch_size: list[int]
    in_channels: int
    num_outputs: int
    state: dict[str, torch.Tensor] = field(repr=False)  # the network's weights, without Lightning's "model." prefix


@dataclass
class InitFromResult:
    """What init_from did to each tensor of the new model (aliases of one tensor listed once)."""

    source: str
    chosen: str
    source_model: str
    source_configuration: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # name -> how
    new: dict[str, str] = field(default_factory=dict)  # name -> why it keeps the new model's initialisation
    unused: list[str] = field(default_factory=list)  # checkpoint tensors the new model has no place for

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"init_from {self.source} ({self.chosen}): {len(self.loaded)} tensors loaded, {len(self.adapted)} "
                f"adapted, {len(self.new)} left new, {len(self.unused)} of the checkpoint unused")


# ---- the source --------------------------------------------------------------------------------------------

def find_checkpoint(path: str | Path, fold: int | str) -> tuple[Path, str]:
    """The checkpoint file init_from names, and how it was chosen: a file as it is; a fold folder's
    checkpoints/last.ckpt (its final weights, those its validation scored); a run folder's fold of the same
    number where it has one, else its fold_0."""
    path = Path(path)
    if path.is_file():
        return path, "the checkpoint file given"
    if (path / layout.CHECKPOINTS).is_dir():
        return _last(path), "the final weights of the fold folder given"
    if not path.is_dir():
        raise CheckpointError(f"init_from={path}: no such checkpoint file, fold folder or run folder")
    same = layout.fold_dir(path, fold)
    if layout.checkpoint(same).is_file():
        return layout.checkpoint(same), f"run folder: {same.name}, the fold of the same number"
    first = layout.fold_dir(path, 0)
    if layout.checkpoint(first).is_file():
        return layout.checkpoint(first), f"run folder: it has no trained {same.name}, so fold_0"
    folds = sorted(d.name for d in path.glob("fold_*") if d.is_dir())
    raise CheckpointError(f"init_from={path}: a run folder needs checkpoints/last.ckpt in {same.name} or fold_0 "
                          f"(found folds: {folds or 'none'})")


def _last(fold_dir: Path) -> Path:
    last = layout.checkpoint(fold_dir)
    if not last.is_file():
        raise CheckpointError(f"init_from={fold_dir}: the fold folder has no {layout.CHECKPOINTS}/{last.name}")
    return last


def read_source(path: str | Path, fold: int | str) -> SourceCheckpoint:
    """The trained model init_from names; CheckpointError for anything that is not a medseg checkpoint."""
    file, chosen = find_checkpoint(path, fold)
    ckpt = load_weights_only(file, mmap=True)
    if not isinstance(ckpt, dict) or "medseg" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"init_from: {file} is not a medseg checkpoint (no model recipe and plan inside)")
    extras = ckpt["medseg"]
    plan = Plan.from_dict(extras["plan"])
    config = plan.configuration(extras["configuration"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return SourceCheckpoint(file, chosen, str(extras["model"]["name"]), dict(extras["model"].get("kwargs", {})),
                            config.name, config.spatial_dims, [int(p) for p in config.patch_size],
                            num_input_channels(plan, config), plan.label_scheme.num_outputs, state)


def configuration_dims(configuration: str) -> int:
    return 2 if configuration == "2d" else 3


def check_compatible(source: SourceCheckpoint, model_name: str, model_kwargs: dict[str, Any],
                     spatial_dims: int) -> None:
    """Refuse a source whose weights cannot mean anything to this run: another model, other model settings,
    another number of spatial dimensions. From the config alone, before any data is read."""
    if source.model_name != model_name:
        raise ConfigError(f"init_from: {source.path} holds a {source.model_name!r} model, this run trains "
                          f"{model_name!r}; weights transfer only between runs of the same model "
                          f"(model={source.model_name})")
    differences = [f"{key}: {source.model_kwargs.get(key)!r} -> {model_kwargs.get(key)!r}"
                   for key in sorted(set(source.model_kwargs) | set(model_kwargs))
                   if source.model_kwargs.get(key) != model_kwargs.get(key)]
    if differences:
        raise ConfigError(f"init_from: {source.path} was trained with other {model_name} settings (checkpoint -> "
                          f"now): {'; '.join(differences)}")
    if source.spatial_dims != spatial_dims:
        raise ConfigError(f"init_from: {source.path} holds a {source.spatial_dims}D model "
                          f"({source.configuration}), this run trains a {spatial_dims}D configuration; weights "
                          "do not transfer between 2D and 3D")


# ---- the transfer ------------------------------------------------------------------------------------------

def _only_axis_differs(a: torch.Size, b: torch.Size, axis: int) -> bool:
    return len(a) == len(b) > axis and all(x == y for i, (x, y) in enumerate(zip(a, b)) if i != axis)


def adapt_input_channels(weight: torch.Tensor, channels: int) -> tuple[torch.Tensor, str]:
    """A layer reading the input, (out, old_channels, ...) -> (out, channels, ...), keeping the activation scale
    for an input of identical channels: more channels repeat the old ones cyclically, fewer take their mean, both
    scaled by old/new."""
    old = weight.shape[1]
    scale = old / channels
    if channels > old:
        index = torch.arange(channels) % old
        return weight[:, index] * scale, f"input channels {old} -> {channels}: repeated, scaled by {old}/{channels}"
    mean = weight.mean(dim=1, keepdim=True)
    repeat = [1] * weight.ndim
    repeat[1] = channels
    return (mean * scale).repeat(*repeat), f"input channels {old} -> {channels}: averaged, scaled by {old}/{channels}"


def interpolate_position_embedding(embedding: torch.Tensor, old_grid: list[int], new_grid: list[int]) -> torch.Tensor:
    """(1, prod(old_grid), hidden) -> (1, prod(new_grid), hidden): the embedding as a (hidden, *grid) image,
    linearly interpolated to the new grid (tokens in C order, as the ViT flattens its patch grid)."""
    hidden = embedding.shape[-1]
    image = embedding.reshape(1, *old_grid, hidden).movedim(-1, 1).float()
    mode = "trilinear" if len(old_grid) == 3 else "bilinear"
    resized = F.interpolate(image, size=list(new_grid), mode=mode, align_corners=False)
    return resized.movedim(1, -1).reshape(1, math.prod(new_grid), hidden).to(embedding.dtype)


def _vit_grids(name: str, target: dict[str, torch.Tensor], source: SourceCheckpoint,
               patch_size: list[int]) -> tuple[list[int], list[int]] | None:
    """The source's and the new patch grids of a position embedding, from its ViT's patch-embedding kernel."""
    kernel_name = name[: -len(POSITION_EMBEDDING)] + "patch_embeddings.weight"
    kernel = target.get(kernel_name)
    if kernel is None or kernel.ndim != source.spatial_dims + 2:
        return None
    vit_patch = [int(k) for k in kernel.shape[2:]]
    old = [p // k for p, k in zip(source.patch_size, vit_patch)]
    new = [p // k for p, k in zip(patch_size, vit_patch)]
    if math.prod(old) != source.state[name].shape[1] or math.prod(new) != target[name].shape[1]:
        return None
    return old, new


def transfer_weights(source: SourceCheckpoint, model: nn.Module, in_channels: int, num_outputs: int,
                     patch_size: list[int]) -> InitFromResult:
    """Load ``source``'s weights into ``model`` (built for this run: its input channels, outputs and patch);
    ConfigError when no layer's weights fit (biases alone do not make a layer fit)."""
    target = model.state_dict()
    result = InitFromResult(str(source.path), source.chosen, source.model_name, source.configuration)
    seen: set[int] = set()  # DynUNet reaches its modules under two names: each tensor is reported once
    updates: dict[str, torch.Tensor] = {}
    outcomes = {name: _transfer_one(name, tensor, target, source, in_channels, num_outputs, patch_size)
                for name, tensor in target.items()}
    for name, tensor in target.items():
        alias = tensor.data_ptr() in seen and tensor.numel() > 0
        seen.add(tensor.data_ptr())
        value, how, why = outcomes[name]
        weight = outcomes.get(name[: -len("bias")] + "weight") if name.endswith(".bias") else None
        if value is not None and weight is not None and weight[0] is None:  # a layer is taken whole or not at all
            value, how, why = None, "", "its layer's weight is new"
        if value is not None:
            updates[name] = value.to(dtype=tensor.dtype)
        if alias:
            continue
        if value is None:
            result.new[name] = why
        elif how:
            result.adapted[name] = how
        else:
            result.loaded.append(name)
    result.unused = sorted(set(source.state) - set(target))
    # a layer fits when its weights (a tensor of 2 or more dimensions: convolution, linear, embedding) do
    if not any(target[name].ndim >= 2 for name in [*result.loaded, *result.adapted]):
        raise ConfigError(f"init_from: no layer of {source.path} ({source.model_name}, {source.configuration}) "
                          f"fits this run's model: every shape differs; planner.plan_like=<the source run> plans "
                          "this dataset with the source's topology")
    model.load_state_dict({**target, **updates})
    return result


def _transfer_one(name: str, tensor: torch.Tensor, target: dict[str, torch.Tensor], source: SourceCheckpoint,
                  in_channels: int, num_outputs: int, patch_size: list[int],
                  ) -> tuple[torch.Tensor | None, str, str]:
    """(value to load or None, how it was adapted ("" when loaded as it is), why it was left new)."""
    if name not in source.state:
        return None, "", "not in the checkpoint"
    old = source.state[name]
    if old.shape == tensor.shape:
        return old, "", ""
    if (source.num_outputs != num_outputs and _only_axis_differs(old.shape, tensor.shape, 0)
            and old.shape[0] == source.num_outputs and tensor.shape[0] == num_outputs):
        return None, "", f"output head: {source.num_outputs} -> {num_outputs} outputs, freshly initialised"
    if (source.in_channels != in_channels and _only_axis_differs(old.shape, tensor.shape, 1)
            and old.shape[1] == source.in_channels and tensor.shape[1] == in_channels):
        value, how = adapt_input_channels(old, in_channels)
        return value, how, ""
    if name.endswith(POSITION_EMBEDDING) and _only_axis_differs(old.shape, tensor.shape, 1):
        grids = _vit_grids(name, target, source, patch_size)
        if grids is not None:
            value = interpolate_position_embedding(old, *grids)
            return value, f"position embedding: patch grid {grids[0]} -> {grids[1]}, interpolated", ""
    return None, "", f"shape {list(old.shape)} in the checkpoint, {list(tensor.shape)} here"


def log_result(result: InitFromResult) -> None:
    log.info(result.summary())
    for name, how in result.adapted.items():
        log.info("init_from: adapted %s (%s)", name, how)
    for name, why in result.new.items():
        log.info("init_from: new %s (%s)", name, why)


def init_source(cfg: DictConfig, fold: int | str) -> SourceCheckpoint | None:
    """The source cfg.init_from names, checked against the configured model and configuration (None when
    init_from is not set); from the config and the checkpoint alone, before any data is read."""
    if not cfg.get("init_from"):
        return None
    source = read_source(str(cfg.init_from), fold)
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(kwargs, dict)
    name = str(kwargs.pop("name"))
    check_compatible(source, name, {str(k): v for k, v in kwargs.items()}, configuration_dims(str(cfg.configuration)))
    log.info("init_from: %s (%s)", source.path, source.chosen)
    return source


def continues_training(cfg: DictConfig, fold_dir: Path) -> bool:
    """Whether the fold resumes (or extends, or merely reports) from its own last.ckpt: the weights are then
    that checkpoint's, and init_from is not applied again."""
    return not cfg.overwrite and bool(cfg.resume) and layout.checkpoint(fold_dir).is_file()
