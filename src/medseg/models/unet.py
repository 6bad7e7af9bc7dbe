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
    """DynUNet returning a list [full-res, 1/2, ...] of logits in training, plain logits in eval.

    Each deep-supervision head's logits stay at their own resolution and the loss compares them with the label
    resized to it (nearest-exact), as nnU-Net does. DynUNet's own training output (heads upsampled to full
    resolution and compared with the full label) gives every head a different gradient from nnU-Net's (~2% on
    the head's logits, up to ~25% on the deepest encoder weights; benchmarks/nnunet_parity_components.py) and
    costs a full-resolution loss per head.
    """

    def __init__(self, net: DynUNet, heads: int):
        super().__init__()
        self.net = net
        self.heads = heads

    def forward(self, x: torch.Tensor):
        if not (self.training and self.heads > 0):
            return self.net(x)
        net = self.net
        out = net.output_block(net.skip_layers(x))
        # the skip layers store head i's logits (1/2^(i+1) resolution) in net.heads during the pass
        return [out, *net.heads[: self.heads]]


@register_model("unet", default_optimizer="sgd", default_scheduler="poly")
def build_unet(spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None = None,
               deep_supervision: bool = True, residual: bool = False) -> nn.Module:
    if plan is None:
        raise ConfigError("model 'unet' is built from a plan's topology; pass plan=")
    heads = num_deep_supervision_heads(plan.num_stages) if deep_supervision else 0
    net = DynUNet(spatial_dims, in_channels, out_channels, kernel_size=plan.kernel_sizes, strides=plan.strides,
                  upsample_kernel_size=plan.strides[1:], filters=plan.features,
                  norm_name=("INSTANCE", {"affine": True}),
                  act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                  deep_supervision=heads > 0, deep_supr_num=max(1, heads), res_block=residual)
    return DeepSupervisionUNet(net, heads)
