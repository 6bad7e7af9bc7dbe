"""nnU-Net's residual-encoder U-Net (ResEnc M/L): a stem conv, residual blocks per encoder stage (the plan's
``encoder_blocks``, e.g. 1-3-4-6-6-6), the plain decoder with one conv per stage.

Written here because neither MONAI nor timm has this network: MONAI's DynUNet has one residual block per stage
and SegResNet another topology. Same parameter count as nnU-Net's (dynamic_network_architectures 0.4.4) for the
same plan, less the segmentation heads whose outputs no loss uses (nnU-Net builds one per decoder level; with
deep supervision the lowest one has loss weight 0), checked in tests/models/test_resenc_unet.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from medseg.errors import ConfigError
from medseg.models.registry import register_model
from medseg.models.unet import num_deep_supervision_heads
from medseg.planning.plan import ConfigurationPlan
from medseg.planning.planner import decoder_convs, encoder_blocks

# by spatial dims; Callable: the two constructors' stubs join to int-only sizes (the lists passed are fine)
_CONV: dict[int, Callable[..., nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_norm(dims: int, cin: int, cout: int, kernel, stride=1, act: bool = True, bias: bool = True) -> nn.Sequential:
    kernel = [kernel] * dims if isinstance(kernel, int) else list(kernel)
    layers = [_CONV[dims](cin, cout, kernel, stride, padding=[(k - 1) // 2 for k in kernel], bias=bias),
              _NORM[dims](cout, eps=1e-5, affine=True)]
    if act:
        layers.append(nn.LeakyReLU(0.01, inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Two convs with a residual connection; where the block downsamples or widens, the skip path is average
    pooling then a 1x1 conv (the "ResNet-D" shortcut nnU-Net uses), so no information is strided away."""

    def __init__(self, dims: int, cin: int, cout: int, kernel, stride):
        super().__init__()
        self.conv1 = conv_norm(dims, cin, cout, kernel, stride)
        self.conv2 = conv_norm(dims, cout, cout, kernel, 1, act=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        stride = [stride] * dims if isinstance(stride, int) else list(stride)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            skip.append(_POOL[dims](stride, stride))
        if cin != cout:
            skip.append(conv_norm(dims, cin, cout, 1, act=False, bias=False))
        self.skip = nn.Sequential(*skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


def stage_tokens(patch_size, strides) -> list[int]:
    """Spatial positions per encoder stage at this patch size (a strided 'same' conv gives ceil(n / s)); the
    sequence models (Mamba, mLSTM) decide by it which stages they can afford."""
    tokens, size = [], list(patch_size)
    for stride in strides:
        size = [math.ceil(n / s) for n, s in zip(size, stride)]
        tokens.append(math.prod(size))
    return tokens


def sequence_stages(patch_size, strides, max_tokens: int) -> list[int]:
    """Stages with at most ``max_tokens`` positions, and the bottleneck in every case."""
    tokens = stage_tokens(patch_size, strides)
    return [i for i, t in enumerate(tokens) if t <= max_tokens or i == len(tokens) - 1]


def residual_blocks(plan: ConfigurationPlan) -> tuple[list[int], list[int]]:
    """(encoder blocks, decoder convs) per stage: the plan's for a ResEnc plan, else ResEnc's counts on the plain
    plan's topology."""
    if plan.network == "resenc":
        return list(plan.encoder_blocks), list(plan.decoder_convs)
    return encoder_blocks("resenc", plan.num_stages), decoder_convs("resenc", plan.num_stages)


class ResEncUNet(nn.Module):
    def __init__(self, dims: int, in_channels: int, out_channels: int, features: list[int], strides, kernels,
                 encoder_blocks: list[int], decoder_convs: list[int], deep_supervision: bool = True):
        super().__init__()
        n = len(features)
        self.heads = num_deep_supervision_heads(n) if deep_supervision else 0
        self.stem = conv_norm(dims, in_channels, features[0], kernels[0])
        self.encoder = nn.ModuleList()
        cin = features[0]
        for i in range(n):
            blocks = [ResidualBlock(dims, cin, features[i], kernels[i], strides[i])]
            blocks += [ResidualBlock(dims, features[i], features[i], kernels[i], 1)
                       for _ in range(encoder_blocks[i] - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            cin = features[i]
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for t, level in enumerate(range(n - 2, -1, -1)):  # decoder stage t works at encoder level `level`
            self.upsample.append(_TRANSPOSED[dims](features[level + 1], features[level], strides[level + 1],
                                                   strides[level + 1]))
            convs = [conv_norm(dims, 2 * features[level], features[level], kernels[level])]
            convs += [conv_norm(dims, features[level], features[level], kernels[level])
                      for _ in range(decoder_convs[t] - 1)]
            self.decoder.append(nn.Sequential(*convs))
        # heads only where an output is returned, finest first (seg_heads[k] gives output k): nnU-Net also builds
        # one on the lowest decoder level and gives it loss weight 0, but a parameter outside the loss makes
        # DDP fail unless it searches for unused parameters on every step
        self.seg_heads = nn.ModuleList(_CONV[dims](features[k], out_channels, 1) for k in range(self.heads + 1))
        self.register_load_state_dict_pre_hook(_drop_unused_heads)

    def forward(self, x: torch.Tensor):
        skips = []
        x = self.stem(x)
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outputs = []
        x = skips[-1]
        for t, (up, dec) in enumerate(zip(self.upsample, self.decoder)):
            x = dec(torch.cat([up(x), skips[-(t + 2)]], dim=1))
            outputs.append(x)
        if self.training and self.heads > 0:
            # finest first, at their own resolutions (the loss resizes the target to each)
            return [head(outputs[-(k + 1)]) for k, head in enumerate(self.seg_heads)]
        return self.seg_heads[0](outputs[-1])


def _drop_unused_heads(module: ResEncUNet, state_dict: dict, prefix: str, *_) -> None:
    """Load checkpoints of the earlier layout, a head on every decoder stage indexed coarsest first: the used
    heads move to their finest-first index, the others are dropped."""
    head = f"{prefix}seg_heads."
    levels = len(module.decoder)
    if f"{head}{len(module.seg_heads)}.weight" not in state_dict:
        return  # the current layout
    old = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(head)]}
    for key, value in old.items():
        stage, param = key[len(head):].split(".", 1)
        k = levels - 1 - int(stage)
        if k < len(module.seg_heads):
            state_dict[f"{head}{k}.{param}"] = value


@register_model("resenc_unet", default_optimizer="sgd", default_scheduler="poly")
def build_resenc_unet(spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None = None,
                      deep_supervision: bool = True) -> nn.Module:
    if plan is None:
        raise ConfigError("model 'resenc_unet' is built from a plan's topology; pass plan=")
    blocks, decoder = residual_blocks(plan)
    return ResEncUNet(spatial_dims, in_channels, out_channels, plan.features, plan.strides, plan.kernel_sizes,
                      blocks, decoder, deep_supervision)
