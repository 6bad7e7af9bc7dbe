"""Transformer U-Nets from MONAI wrapped to medseg's model interface: SwinUNETR (Hatamizadeh et al. 2022) and
UNETR (Hatamizadeh et al. 2021), 2D and 3D.

Both constrain the patch size: SwinUNETR downsamples five times by 2 (patch embedding, then four patch mergings),
so every spatial size must be divisible by 32; UNETR cuts the input into 16-voxel ViT patches and fixes its
position embedding (``img_size``) at construction, so the patch must be divisible by 16 and equal to the input
size at every call. ``PATCH_MULTIPLE`` records the multiple per model, ``adapt_patch`` rounds a planned patch up
to it, and the factories refuse an incompatible plan. The registry holds each model's multiple in its spec
(``medseg.models.registry.model_spec(name).patch_multiple``); training rounds the patch with
``adapt_patch_for_model(name, patch)`` before building. ``unetr_small`` is a registered preset of UNETR with a
ViT-Tiny-sized encoder (the model config unetr_small.yaml), a model of its own name.

Deep supervision: MONAI's networks return only full-resolution logits, so 1x1 conv heads are added on the
decoder's outputs at 1/2 and 1/4 resolution, captured with forward hooks on the decoder blocks (see
``_DecoderTaps``). Hooks rather than a copy of MONAI's ``forward`` body: MONAI's forward (its input-size check
included) runs unchanged, and only the names of two decoder submodules are relied upon. The hooks are
registered per training forward and removed after it, so the module holds no hook closures (deepcopy, pickling
and eval are unaffected).

Matched controls (``control=True``; models ``swin_unetr_control``, ``unetr_control``, ``unetr_small_control``):
the same network with its transformer blocks replaced by identity, so that the blocks' own contribution can be
measured at an otherwise equal architecture, optimiser and schedule. SwinUNETR keeps its patch embedding and
patch mergings (each stage's hidden states keep their shapes) and loses each stage's Swin blocks; UNETR keeps
the ViT's patch and position embedding and final norm, and its 12 blocks become nn.Identity (the skip paths
read the embedded patches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch
import torch.nn as nn
from monai.networks.nets import UNETR, SwinUNETR
from monai.networks.nets.swin_unetr import BasicLayer

from medseg.errors import ConfigError
from medseg.models.registry import adapt_patch, model_spec, register_control, register_model, register_preset
from medseg.planning.plan import ConfigurationPlan

# every spatial size of the patch must be a multiple of this (SwinUNETR: 2**5; UNETR: its ViT patch, 16)
PATCH_MULTIPLE: dict[str, int] = {"swin_unetr": 32, "unetr": 16}

# decoder submodules whose outputs are the feature maps at 1/2 and 1/4 resolution, finest first
# SwinUNETR: decoder1 -> full, decoder2 -> 1/2 (feature_size ch), decoder3 -> 1/4 (2 * feature_size ch)
# UNETR:     decoder2 -> full, decoder3 -> 1/2 (2 * feature_size ch), decoder4 -> 1/4 (4 * feature_size ch)
_DS_TAPS = {"swin_unetr": (("decoder2", 1), ("decoder3", 2)), "unetr": (("decoder3", 2), ("decoder4", 4))}
_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def patch_multiple(name: str) -> int:
    """The multiple every patch axis must be for model ``name`` (1 for models without a constraint), from its
    registry spec (kept for callers of this module; ``adapt_patch`` is the registry's, re-exported here)."""
    try:
        return model_spec(name).patch_multiple
    except ConfigError:  # not a registered model: no constraint known
        return 1


def check_patch(name: str, patch_size: Sequence[int]) -> None:
    """Raise ConfigError unless every axis of ``patch_size`` is a multiple of the model's ``PATCH_MULTIPLE``."""
    multiple = patch_multiple(name)
    bad = [int(n) for n in patch_size if int(n) % multiple != 0]
    if bad:
        raise ConfigError(f"model {name!r} needs every patch size divisible by {multiple}; the plan's patch "
                          f"{list(patch_size)} is not (try adapt_patch(patch, {multiple}) = "
                          f"{adapt_patch(patch_size, multiple)})")


class _DecoderTaps(nn.Module):
    """A MONAI segmentation net plus 1x1 deep-supervision heads on chosen decoder blocks' outputs.

    Forward hooks on those blocks, registered for the duration of one training forward, collect their outputs;
    eval returns MONAI's logits, training with heads returns ``[full, 1/2, 1/4]`` logits, finest first.
    """

    def __init__(self, net: nn.Module, dims: int, out_channels: int, taps: Sequence[tuple[str, int]],
                 feature_size: int, deep_supervision: bool):
        super().__init__()
        self.net = net
        self.heads = len(taps) if deep_supervision else 0
        self.tap_names = [name for name, _ in taps][: self.heads]
        self.seg_heads = nn.ModuleList(_CONV[dims](feature_size * mult, out_channels, 1) for _, mult in
                                       list(taps)[: self.heads])

    def forward(self, x: torch.Tensor):
        if not (self.training and self.heads > 0):
            return self.net(x)
        # hooks live for this call only: no state or closures on the module, so it deep-copies and pickles
        captured: dict[str, torch.Tensor] = {}
        handles = [getattr(self.net, name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out)) for name in self.tap_names]
        try:
            logits = self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        return [logits] + [head(captured[name]) for head, name in zip(self.seg_heads, self.tap_names)]


def _without_unused_norms(net: UNETR) -> UNETR:
    """MONAI's TransformerBlock builds ``norm_cross_attn`` even without cross-attention, then never calls it:
    parameters outside every loss, on which DDP fails (find_unused_parameters=False). Each is replaced by
    nn.Identity; a load hook drops their weights from checkpoints that still hold them."""
    for block in net.vit.blocks:
        if not block.with_cross_attention:
            block.norm_cross_attn = nn.Identity()
    net.register_load_state_dict_pre_hook(_drop_unused_norm_weights)
    return net


def _drop_unused_norm_weights(_net: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}vit.blocks.") and ".norm_cross_attn." in k]:
        del state_dict[key]


class IdentityBlock(nn.Identity):
    """A Swin block replaced by identity: returns its input, ignoring the attention mask the stage passes."""

    def forward(self, input: torch.Tensor, *_) -> torch.Tensor:
        return input


def _without_swin_blocks(net: SwinUNETR) -> SwinUNETR:
    """The control: every stage's Swin blocks become IdentityBlocks; patch embedding and merging stay."""
    for stage in net.swinViT.modules():
        if isinstance(stage, BasicLayer):
            stage.blocks = nn.ModuleList(IdentityBlock() for _ in stage.blocks)
    return net


def _without_vit_blocks(net: UNETR) -> UNETR:
    """The control: the ViT's blocks become nn.Identity, as many as before (UNETR reads blocks 3, 6 and 9's
    outputs for its skip paths); the patch and position embedding and the final norm stay."""
    net.vit.blocks = nn.ModuleList(nn.Identity() for _ in net.vit.blocks)
    return net


@overload
def _patch_from(name: str, spatial_dims: int, plan: ConfigurationPlan | None, required: Literal[True]) -> list[int]: ...
@overload
def _patch_from(name: str, spatial_dims: int, plan: ConfigurationPlan | None, required: bool) -> list[int] | None: ...
def _patch_from(name: str, spatial_dims: int, plan: ConfigurationPlan | None, required: bool) -> list[int] | None:
    if plan is None:
        if required:
            raise ConfigError(f"model {name!r} fixes its input size at construction; pass plan=")
        return None
    if plan.spatial_dims != spatial_dims or len(plan.patch_size) != spatial_dims:
        raise ConfigError(f"model {name!r}: spatial_dims={spatial_dims} but the plan {plan.name!r} has "
                          f"spatial_dims={plan.spatial_dims} and patch {list(plan.patch_size)}")
    patch = [int(n) for n in plan.patch_size]
    check_patch(name, patch)
    return patch


@register_model("swin_unetr", patch_multiple=PATCH_MULTIPLE["swin_unetr"], default_optimizer="adamw",
                default_scheduler="warmup_cosine")
def build_swin_unetr(spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None = None,
                     deep_supervision: bool = True, feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                     num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, use_v2: bool = False,
                     dropout_path_rate: float = 0.0, use_checkpoint: bool = False, control: bool = False) -> nn.Module:
    """MONAI's SwinUNETR (feature_size 48 by default, the paper's and MONAI's BTCV tutorial's; must be a multiple
    of 12). Works at any input size divisible by 32; with a plan, its patch is checked for that. control: the
    Swin blocks are identity (the matched control, model swin_unetr_control)."""
    if spatial_dims not in (2, 3):
        raise ConfigError(f"model 'swin_unetr' is 2D or 3D, got spatial_dims={spatial_dims}")
    if feature_size % 12 != 0:
        raise ConfigError(f"model 'swin_unetr' needs feature_size divisible by 12, got {feature_size}")
    _patch_from("swin_unetr", spatial_dims, plan, required=False)
    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                    depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                    norm_name="instance", dropout_path_rate=dropout_path_rate, use_checkpoint=use_checkpoint,
                    spatial_dims=spatial_dims, use_v2=use_v2)
    if control:
        net = _without_swin_blocks(net)
    return _DecoderTaps(net, spatial_dims, out_channels, _DS_TAPS["swin_unetr"], feature_size, deep_supervision)


@register_model("unetr", patch_multiple=PATCH_MULTIPLE["unetr"], default_optimizer="adamw",
                default_scheduler="warmup_cosine")
def build_unetr(spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None = None,
                deep_supervision: bool = True, feature_size: int = 16, hidden_size: int = 768, mlp_dim: int = 3072,
                num_heads: int = 12, dropout_rate: float = 0.0, control: bool = False) -> nn.Module:
    """MONAI's UNETR (ViT-B: hidden 768, MLP 3072, 12 heads, 12 layers by default) with ``img_size`` = the plan's
    patch, which must be divisible by 16; the model then accepts inputs of exactly that size. control: the ViT's
    blocks are identity (the matched control, models unetr_control and unetr_small_control)."""
    if spatial_dims not in (2, 3):
        raise ConfigError(f"model 'unetr' is 2D or 3D, got spatial_dims={spatial_dims}")
    if hidden_size % num_heads != 0:
        raise ConfigError(f"model 'unetr' needs hidden_size ({hidden_size}) divisible by num_heads ({num_heads})")
    patch = _patch_from("unetr", spatial_dims, plan, required=True)
    net = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=patch, feature_size=feature_size,
                hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, proj_type="conv",
                norm_name="instance", res_block=True, dropout_rate=dropout_rate, spatial_dims=spatial_dims)
    net = _without_vit_blocks(net) if control else _without_unused_norms(net)
    return _DecoderTaps(net, spatial_dims, out_channels, _DS_TAPS["unetr"], feature_size, deep_supervision)


# UNETR with a ViT-Tiny-sized encoder (Touvron et al. 2021: width 192, 3 heads, MLP 768; 12 layers) and
# feature_size 8: the transformer family at CPU-benchmark size (configs/model/unetr_small.yaml states the same
# values, which checkpoints record)
UNETR_SMALL = {"feature_size": 8, "hidden_size": 192, "mlp_dim": 768, "num_heads": 3}
register_preset("unetr_small", "unetr", **UNETR_SMALL)

# the matched controls: models of their own name (run folders, checkpoints), the family's optimiser and schedule
register_control("swin_unetr")
register_control("unetr")
register_control("unetr_small")
