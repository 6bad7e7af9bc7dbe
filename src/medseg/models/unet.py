"""nnU-Net's plain-conv U-Net, built on MONAI's DynUNet (same blocks: conv-instance norm-leaky ReLU twice per
stage, strided-conv downsampling, transposed-conv upsampling, one 1x1 head per supervised decoder level)."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.nets import DynUNet

from medseg.errors import ConfigError
from medseg.models.registry import register_model
from medseg.planning.plan import ConfigurationPlan


def num_deep_supervision_heads(num_stages: int) -> int:
    """Extra heads below full resolution: every decoder level but the lowest (nnU-Net gives it weight 0)."""
    return max(0, num_stages - 3)


class DeepSupervisionUNet(nn.Module):
    """DynUNet returning a list [full-res, 1/2, ...] in training, plain logits in eval.

    DynUNet upsamples its deep-supervision maps to full resolution; the loss compares each with the full
    label, which is equivalent in spirit to nnU-Net's downsampled targets and keeps the loss simple.
    """

    def __init__(self, net: DynUNet, heads: int):
        super().__init__()
        self.net = net
        self.heads = heads

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        if self.training and self.heads > 0:
            return list(torch.unbind(out, dim=1))
        return out


@register_model("unet")
def build_unet(spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None = None,
               deep_supervision: bool = True, residual: bool = False, **_) -> nn.Module:
    if plan is None:
        raise ConfigError("model 'unet' is built from a plan's topology; pass plan=")
    heads = num_deep_supervision_heads(plan.num_stages) if deep_supervision else 0
    net = DynUNet(spatial_dims, in_channels, out_channels, kernel_size=plan.kernel_sizes, strides=plan.strides,
                  upsample_kernel_size=plan.strides[1:], filters=plan.features, norm_name=("INSTANCE", {"affine": True}),
                  act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                  deep_supervision=heads > 0, deep_supr_num=max(1, heads), res_block=residual)
    return DeepSupervisionUNet(net, heads)
