"""umamba_bot / umamba_enc: U-Mamba built from a plan, on the CPU (mambapy backend)."""

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types

import pytest
import torch
import torch.nn as nn
from mambapy.mamba import MambaBlock, MambaConfig

import medseg.models.umamba as umamba
from medseg.models import create_model, list_models
from medseg.models.resenc_unet import stage_tokens
from medseg.models.umamba import MambaLayer, UMamba, mamba_ssm_available, select_backend
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
    missing = [n for n, p in model.named_parameters() if p.grad is None]
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


@pytest.fixture
def fresh_mamba_ssm(monkeypatch, caplog):
    """A process that has not probed or given up on mamba_ssm yet; yields the umamba warnings logged."""
    monkeypatch.setattr(umamba, "_fallback_reason", None)
    mamba_ssm_available.cache_clear()
    caplog.set_level(logging.WARNING, logger=umamba.__name__)
    yield lambda: [r for r in caplog.records if r.name == umamba.__name__ and r.levelno == logging.WARNING]
    mamba_ssm_available.cache_clear()


def _on_cuda_as_far_as_dispatch_goes(monkeypatch):
    """Run the CUDA backend decision for CPU tensors, so the dispatch and fallback paths run without a GPU."""
    real = umamba.select_backend
    monkeypatch.setattr(umamba, "select_backend", lambda device_type, force_mambapy=False: real("cuda", force_mambapy))


def _installed_module(name: str, **attrs) -> types.ModuleType:
    """A stand-in for an installed module (with a spec, as a real one has)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


def _install_fake_mamba_ssm(monkeypatch, mamba_cls) -> None:
    """An importable mamba_ssm (with its selective-scan extension) whose Mamba is ``mamba_cls``."""
    monkeypatch.setitem(sys.modules, "mamba_ssm", _installed_module("mamba_ssm", Mamba=mamba_cls))
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", _installed_module("selective_scan_cuda"))


class _BrokenBuildFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import mamba_ssm`` fails as a build against another torch/CUDA does: its extension does not load."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "mamba_ssm" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("selective_scan_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                          "_ZN3c104cuda9SetDeviceEi")


def test_mamba_ssm_not_installed_is_mambapy_without_a_warning(monkeypatch, fresh_mamba_ssm):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import raises ModuleNotFoundError for it
    assert select_backend("cuda") == "mambapy" and not mamba_ssm_available()
    assert not fresh_mamba_ssm()


def test_broken_mamba_ssm_install_falls_back_with_one_warning(monkeypatch, fresh_mamba_ssm):
    monkeypatch.delitem(sys.modules, "mamba_ssm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenBuildFinder(), *sys.meta_path])
    assert select_backend("cpu") == "mambapy"
    assert not fresh_mamba_ssm()  # CPU inputs never try the package
    assert select_backend("cuda") == "mambapy"
    assert select_backend("cuda") == "mambapy" and not mamba_ssm_available()

    _on_cuda_as_far_as_dispatch_goes(monkeypatch)
    torch.manual_seed(0)
    layers = [MambaLayer(8), MambaLayer(8)]
    x = torch.randn(1, 8, 4, 6)
    for layer in layers:
        assert layer.backend == "mambapy"
        out = layer(x)
        assert out.shape == x.shape and torch.isfinite(out).all() and not torch.allclose(out, x)
        assert not layer._ssm
    warnings = fresh_mamba_ssm()
    assert len(warnings) == 1
    assert "undefined symbol" in warnings[0].getMessage() and "mambapy" in warnings[0].getMessage()


def test_mamba_ssm_failing_its_first_forward_falls_back_to_mambapy(monkeypatch, fresh_mamba_ssm):
    class KernelMissingMamba(nn.Module):
        calls = 0

        def __init__(self, d_model, d_state, d_conv, expand):
            super().__init__()

        def forward(self, x):
            KernelMissingMamba.calls += 1
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    _install_fake_mamba_ssm(monkeypatch, KernelMissingMamba)
    assert select_backend("cuda") == "mamba_ssm"  # the import works, so the kernels are tried

    _on_cuda_as_far_as_dispatch_goes(monkeypatch)
    torch.manual_seed(0)
    layer, other = MambaLayer(8), MambaLayer(8)
    x = torch.randn(1, 8, 4, 6, requires_grad=True)
    layer.force_mambapy = True
    expected = layer(x)
    layer.force_mambapy = False
    assert layer.backend == "mamba_ssm"
    out = layer(x)
    assert KernelMissingMamba.calls == 1
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and layer.mamba.A_log.grad is not None
    # the rest of the process, other layers included, no longer tries the kernels
    assert layer.backend == other.backend == "mambapy" and select_backend("cuda") == "mambapy"
    layer(x), other(x)
    assert KernelMissingMamba.calls == 1
    warnings = fresh_mamba_ssm()
    assert len(warnings) == 1 and "no kernel image" in warnings[0].getMessage()


def test_mamba_ssm_errors_after_a_working_forward_are_raised(monkeypatch, fresh_mamba_ssm):
    """Only a first forward that fails means a broken install; a later error is a real one and must surface."""

    class FlakyMamba(MambaBlock):
        def __init__(self, d_model, d_state, d_conv, expand):
            super().__init__(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, d_conv=d_conv,
                                         expand_factor=expand))
            self.fail = False

        def forward(self, x):
            if self.fail:
                raise RuntimeError("illegal memory access")
            return super().forward(x)

    _install_fake_mamba_ssm(monkeypatch, FlakyMamba)
    _on_cuda_as_far_as_dispatch_goes(monkeypatch)
    layer = MambaLayer(8)
    x = torch.randn(1, 8, 4, 6)
    layer(x)
    layer._ssm[0].fail = True
    with pytest.raises(RuntimeError, match="illegal memory access"):
        layer(x)
    assert layer.backend == "mamba_ssm" and not fresh_mamba_ssm()
