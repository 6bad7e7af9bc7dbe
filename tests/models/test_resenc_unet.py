"""resenc_unet: nnU-Net's residual-encoder U-Net built from a plan. Parameter counts are those of nnU-Net's own
network (dynamic_network_architectures 0.4.4, ResidualEncoderUNet) for the same arguments."""

import pytest
import torch

from medseg.models import create_model
from medseg.planning.plan import ConfigurationPlan


def _plan(dims, features, strides, kernels, blocks):
    n = len(features)
    return ConfigurationPlan("x", dims, [1.0] * dims, [64] * dims, [64] * dims, 2, strides, kernels, features,
                             ["zscore"], [False], network="resenc", encoder_blocks=blocks, decoder_convs=[1] * (n - 1))


HIPPO_3D = _plan(3, [32, 64, 128, 256], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, [1, 3, 4, 6])
HIPPO_2D = _plan(2, [32, 64, 128, 256], [[1, 1]] + [[2, 2]] * 3, [[3, 3]] * 4, [1, 3, 4, 6])
ANISO = _plan(3, [32, 64, 128, 256, 320, 320, 320],
              [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]],
              [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5, [1, 3, 4, 6, 6, 6, 6])


@pytest.mark.parametrize("plan, channels, classes, expected", [
    (HIPPO_3D, 1, 3, 25_895_593), (HIPPO_2D, 1, 3, 8_728_681), (ANISO, 2, 3, 140_403_602)],
    ids=["hippocampus-3d", "hippocampus-2d", "anisotropic-7-stages"])
def test_parameter_count_equals_nnunet(plan, channels, classes, expected):
    model = create_model("resenc_unet", plan.spatial_dims, channels, classes, plan=plan)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_deep_supervision_outputs_at_their_resolutions_and_backward():
    model = create_model("resenc_unet", 3, 2, 3, plan=ANISO)
    x = torch.randn(1, 2, 24, 64, 64)
    outs = model.train()(x)
    # every decoder level but the lowest (nnU-Net gives it weight 0), finest first
    assert [tuple(o.shape[2:]) for o in outs] == [(24, 64, 64), (24, 32, 32), (24, 16, 16), (12, 8, 8), (6, 4, 4)]
    sum(o.mean() for o in outs).backward()
    unused = {id(p) for p in model.seg_heads[0].parameters()}  # the lowest level's head
    assert all(p.grad is not None for p in model.parameters() if id(p) not in unused)
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 3, 24, 64, 64)
