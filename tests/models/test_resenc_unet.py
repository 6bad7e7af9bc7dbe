"""resenc_unet: nnU-Net's residual-encoder U-Net built from a plan. Parameter counts are those of nnU-Net's own
network (dynamic_network_architectures 0.4.4, ResidualEncoderUNet) for the same arguments, less one head."""

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


# nnU-Net's count less its lowest decoder level's 1x1 head (loss weight 0 there, so not built here)
@pytest.mark.parametrize("plan, channels, classes, expected", [
    (HIPPO_3D, 1, 3, 25_895_593 - (128 * 3 + 3)), (HIPPO_2D, 1, 3, 8_728_681 - (128 * 3 + 3)),
    (ANISO, 2, 3, 140_403_602 - (320 * 3 + 3))],
    ids=["hippocampus-3d", "hippocampus-2d", "anisotropic-7-stages"])
def test_parameter_count_equals_nnunet_less_its_unused_head(plan, channels, classes, expected):
    model = create_model("resenc_unet", plan.spatial_dims, channels, classes, plan=plan)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_deep_supervision_outputs_at_their_resolutions_and_backward():
    model = create_model("resenc_unet", 3, 2, 3, plan=ANISO)
    x = torch.randn(1, 2, 24, 64, 64)
    outs = model.train()(x)
    # every decoder level but the lowest (nnU-Net gives it weight 0), finest first
    assert [tuple(o.shape[2:]) for o in outs] == [(24, 64, 64), (24, 32, 32), (24, 16, 16), (12, 8, 8), (6, 4, 4)]
    sum(o.mean() for o in outs).backward()
    assert len(model.seg_heads) == len(outs)  # no head on the lowest level: every parameter is trained
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 3, 24, 64, 64)


def test_without_deep_supervision_only_the_final_head():
    model = create_model("resenc_unet", 3, 1, 3, plan=HIPPO_3D, deep_supervision=False)
    assert model.heads == 0 and len(model.seg_heads) == 1 and model.seg_heads[0].in_channels == 32
    x = torch.randn(1, 1, 16, 16, 16)
    model.train()(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_checkpoint_of_the_earlier_layout_loads(deep_supervision):
    """Earlier checkpoints hold a head on every decoder stage (3 here), indexed coarsest first."""
    torch.manual_seed(0)
    trained = create_model("resenc_unet", 3, 1, 3, plan=HIPPO_3D, deep_supervision=deep_supervision)
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("seg_heads.")}
    for k in range(3):  # k: output index, finest first; the heads not built here get arbitrary weights
        head = trained.seg_heads[k] if k < len(trained.seg_heads) else torch.nn.Conv3d(32 * 2 ** k, 3, 1)
        state.update({f"seg_heads.{2 - k}.{p}": v.detach() for p, v in head.named_parameters()})
    fresh = create_model("resenc_unet", 3, 1, 3, plan=HIPPO_3D, deep_supervision=deep_supervision)
    fresh.load_state_dict(state)  # strict: no key missing or left over
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))
        fresh_outs, trained_outs = fresh.train()(x), trained.train()(x)
    if deep_supervision:
        assert len(fresh_outs) == 2 and all(torch.equal(a, b) for a, b in zip(fresh_outs, trained_outs))
