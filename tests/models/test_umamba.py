"""umamba_bot / umamba_enc: U-Mamba built from a plan, on the CPU (mambapy backend)."""

import sys
import types

import pytest
import torch
from mambapy.mamba import MambaBlock, MambaConfig

from medseg.models import create_model, list_models
from medseg.models.resenc_unet import stage_tokens
from medseg.models.umamba import MambaLayer, UMamba
from medseg.planning.plan import ConfigurationPlan

FEATURES = [8, 16, 32, 64]


def _plan(dims: int, patch: list[int], network: str = "resenc") -> ConfigurationPlan:
    n = len(FEATURES)
    blocks, decoder = ([1, 2, 2, 2], [1] * (n - 1)) if network == "resenc" else ([2] * n, [2] * (n - 1))
    return ConfigurationPlan("x", dims, [1.0] * dims, patch, patch, 1, [[1] * dims] + [[2] * dims] * (n - 1),
                             [[3] * dims] * n, FEATURES, ["zscore"], [False], network=network,
                             encoder_blocks=blocks, decoder_convs=decoder)


PLAN_3D = _plan(3, [40, 56, 40])
PLAN_2D = _plan(2, [56, 40])


def test_registry_lists_both_variants():
    assert {"umamba_bot", "umamba_enc"} <= set(list_models())


@pytest.mark.parametrize("name", ["umamba_bot", "umamba_enc"])
@pytest.mark.parametrize("plan", [PLAN_2D, PLAN_3D], ids=["2d", "3d"])
def test_train_outputs_backward_and_eval(name, plan):
    torch.manual_seed(0)
    model = create_model(name, plan.spatial_dims, 2, 3, plan=plan)
    assert model.heads == 1  # 4 stages: every decoder level but the lowest
    x = torch.randn(1, 2, *plan.patch_size)
    outs = model.train()(x)
    # finest first, each at its own decoder resolution
    expected = [tuple(plan.patch_size), tuple(s // 2 for s in plan.patch_size)]
    assert [tuple(o.shape) for o in outs] == [(1, 3) + s for s in expected]
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    unused = {id(p) for p in model.seg_heads[0].parameters()}  # the lowest decoder level's head
    missing = [n for n, p in model.named_parameters() if id(p) not in unused and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the Mamba weights really are trained (mambapy is the backend on the CPU)
    layers = model.mamba_layers()
    assert layers and all(m.backend == "mambapy" for m in layers)
    assert all(m.mamba.A_log.grad.abs().sum() > 0 for m in layers)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (1, 3, *plan.patch_size) and torch.isfinite(out).all()


def test_mamba_stages_per_variant():
    bot = create_model("umamba_bot", 3, 1, 2, plan=PLAN_3D)
    enc = create_model("umamba_enc", 3, 1, 2, plan=PLAN_3D)
    # 40x56x40: 89600 tokens at full resolution is above the default 32768, the rest below
    assert stage_tokens(PLAN_3D.patch_size, PLAN_3D.strides) == [89600, 11200, 1400, 175]
    assert bot.mamba_stages == [3] and len(bot.mamba_layers()) == 1
    assert enc.mamba_stages == [1, 2, 3] and len(enc.mamba_layers()) == 3
    assert create_model("umamba_enc", 3, 1, 2, plan=PLAN_3D, mamba_max_tokens=10**6).mamba_stages == [0, 1, 2, 3]
    # the bottleneck always keeps its layer
    assert create_model("umamba_enc", 3, 1, 2, plan=PLAN_3D, mamba_max_tokens=1).mamba_stages == [3]
    assert create_model("umamba_enc", 2, 1, 2, plan=PLAN_2D).mamba_stages == [0, 1, 2, 3]
    # U-Mamba is ResEncUNet plus the Mamba layers: same non-Mamba parameter count
    resenc = create_model("resenc_unet", 3, 1, 2, plan=PLAN_3D)
    mamba_params = sum(p.numel() for m in enc.mamba_layers() for p in m.parameters())
    assert sum(p.numel() for p in enc.parameters()) - mamba_params == sum(p.numel() for p in resenc.parameters())


@pytest.mark.parametrize("network", ["plain", "resenc"])
def test_create_from_plain_and_resenc_plans(network):
    plan = _plan(3, [40, 56, 40], network)
    model = create_model("umamba_bot", 3, 1, 2, plan=plan, deep_supervision=False)
    assert isinstance(model, UMamba) and model.heads == 0
    # a plain plan's two convs per stage are replaced by ResEnc's block counts (1, 3, 4, 6)
    expected = [1, 3, 4, 6] if network == "plain" else [1, 2, 2, 2]
    residual_blocks = [sum(1 for m in stage if not isinstance(m, MambaLayer)) for stage in model.encoder]
    assert residual_blocks == expected
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 40, 56, 40)).shape == (1, 2, 40, 56, 40)


def test_layer_needs_a_plan():
    with pytest.raises(Exception, match="plan"):
        create_model("umamba_enc", 3, 1, 2)


@pytest.mark.parametrize("dims", [2, 3])
def test_mamba_layer_mixes_along_the_token_sequence(dims):
    torch.manual_seed(0)
    layer = MambaLayer(8).eval()
    shape = (1, 8, 6, 5) if dims == 2 else (1, 8, 4, 3, 5)
    x = torch.randn(shape)
    x2 = x.clone()
    # change one token (raster order); not by a constant, which the channel LayerNorm would cancel
    x2.view(1, 8, -1)[:, :, 3] += 5 * torch.randn(8)
    with torch.no_grad():
        y, y2 = (layer(v).flatten(2) for v in (x, x2))
    changed = (y - y2).abs().amax(dim=1)[0] > 1e-7  # per token
    # earlier tokens are untouched (causal scan); every later one, beyond the conv's reach too, sees the change
    assert not changed[:3].any()
    assert changed[3:].all()


def test_mamba_ssm_backend_shares_the_layers_weights(monkeypatch):
    """Without a GPU, stand in for mamba_ssm with an equivalent module to check the dispatch and that the
    mamba_ssm block computes with (and trains) the layer's own weights."""

    class FakeMamba(MambaBlock):
        def __init__(self, d_model, d_state, d_conv, expand):
            super().__init__(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, d_conv=d_conv,
                                         expand_factor=expand))
            self.called = 0

        def forward(self, x):
            self.called += 1
            return super().forward(x)

    monkeypatch.setitem(sys.modules, "mamba_ssm", types.SimpleNamespace(Mamba=FakeMamba))
    torch.manual_seed(0)
    layer = MambaLayer(8)
    x = torch.randn(1, 8, 4, 6)
    expected = layer(x)
    monkeypatch.setattr(MambaLayer, "_use_mamba_ssm", lambda self, x: not self.force_mambapy)
    assert layer.backend == "mamba_ssm"
    out = layer(x)
    assert layer._ssm[0].called == 1
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.mamba.A_log.grad is not None and layer.mamba.in_proj.weight.grad is not None
    # hidden from the module tree: one copy of the weights in the state dict
    assert not any("_ssm" in k for k in layer.state_dict())
    layer.force_mambapy = True
    assert layer.backend == "mambapy"
