import copy

import pytest
import torch

from medseg.errors import ConfigError
from medseg.models import create_model, list_models
from medseg.models.transformer import PATCH_MULTIPLE, adapt_patch, check_patch, patch_multiple
from medseg.planning.plan import ConfigurationPlan

HIPPOCAMPUS_3D = [40, 56, 40]
HIPPOCAMPUS_2D = [56, 40]
SMALL = {"swin_unetr": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)},
         "unetr": {"feature_size": 4, "hidden_size": 32, "mlp_dim": 32, "num_heads": 2}}


def _plan(dims, patch):
    return ConfigurationPlan("3d_fullres" if dims == 3 else "2d", dims, [1.0] * dims, list(patch), list(patch), 2,
                             [[1] * dims, [2] * dims], [[3] * dims] * 2, [4, 8], ["zscore"], [False])


def test_adapt_patch_rounds_each_axis_up_and_is_pure():
    patch = [40, 56, 40]
    assert adapt_patch(patch, 32) == [64, 64, 64]
    assert adapt_patch(patch, 16) == [48, 64, 48]
    assert patch == [40, 56, 40]
    assert adapt_patch([56, 40], 32) == [64, 64]
    assert adapt_patch([56, 40], 16) == [64, 48]
    assert adapt_patch([64, 96, 1], 32) == [64, 96, 32]  # already a multiple: unchanged; 1 -> one multiple
    assert adapt_patch([7, 9], 1) == [7, 9]
    with pytest.raises(ValueError):
        adapt_patch([8], 0)


def test_patch_multiples_are_declared_for_both_models():
    assert PATCH_MULTIPLE == {"swin_unetr": 32, "unetr": 16}
    assert patch_multiple("swin_unetr") == 32 and patch_multiple("unet") == 1
    check_patch("unetr", [48, 64, 48])
    with pytest.raises(ConfigError, match="divisible by 32"):
        check_patch("swin_unetr", [48, 64, 48])


def test_both_models_are_registered():
    assert {"swin_unetr", "unetr"} <= set(list_models())


@pytest.mark.parametrize("name", ["swin_unetr", "unetr"])
@pytest.mark.parametrize("dims", [2, 3])
def test_factory_refuses_an_incompatible_patch(name, dims):
    patch = HIPPOCAMPUS_3D if dims == 3 else HIPPOCAMPUS_2D
    with pytest.raises(ConfigError, match=f"divisible by {PATCH_MULTIPLE[name]}"):
        create_model(name, dims, 1, 3, plan=_plan(dims, patch), **SMALL[name])


def test_unetr_needs_a_plan_and_matching_dims():
    with pytest.raises(ConfigError, match="plan="):
        create_model("unetr", 3, 1, 3, **SMALL["unetr"])
    with pytest.raises(ConfigError, match="spatial_dims"):
        create_model("unetr", 2, 1, 3, plan=_plan(3, [48, 64, 48]), **SMALL["unetr"])


@pytest.mark.parametrize("name", ["swin_unetr", "unetr"])
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_backward_deep_supervision_and_eval(name, dims):
    torch.manual_seed(0)
    patch = adapt_patch(HIPPOCAMPUS_3D if dims == 3 else HIPPOCAMPUS_2D, PATCH_MULTIPLE[name])
    model = create_model(name, dims, 2, 3, plan=_plan(dims, patch), **SMALL[name])
    assert model.heads == 2
    x = torch.randn(1, 2, *patch)
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == model.heads + 1
    for k, out in enumerate(outs):  # finest first, each at its own resolution
        assert out.shape == (1, 3, *[n // 2 ** k for n in patch])
        assert torch.isfinite(out).all()
    sum(o.float().pow(2).mean() for o in outs).backward()
    for head in model.seg_heads:  # the deep-supervision heads are in the graph
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    first = next(p for p in model.net.parameters() if p.requires_grad)
    assert first.grad is not None and torch.isfinite(first.grad).all()
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed after the call

    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, *patch)
        assert torch.isfinite(logits).all()
        # the full-resolution training output is the same network's logits
        model.train()
        assert torch.allclose(model(x)[0], logits, atol=1e-5)
        assert torch.allclose(copy.deepcopy(model)(x)[0], logits, atol=1e-5)


@pytest.mark.parametrize("name", ["swin_unetr", "unetr"])
def test_without_deep_supervision_one_tensor(name):
    patch = [64, 48] if name == "unetr" else [64, 64]
    model = create_model(name, 2, 1, 2, plan=_plan(2, patch), deep_supervision=False, **SMALL[name])
    assert model.heads == 0 and len(model.seg_heads) == 0
    model.train()
    out = model(torch.randn(2, 1, *patch))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, *patch)


def test_default_widths():
    swin = create_model("swin_unetr", 3, 1, 2, plan=_plan(3, [64, 64, 64]))
    assert swin.net.out.conv.conv.in_channels == 48
    unetr = create_model("unetr", 2, 1, 2, plan=_plan(2, [64, 48]))
    assert unetr.net.hidden_size == 768 and unetr.net.feat_size == (4, 3)
