"""summarize_model: parameters, forward GFLOPs and the activation-memory estimate."""

import json

import pytest
import torch
import torch.nn as nn

from medseg.models import create_model
from medseg.models.summary import ModelSummary, summarize_model
from medseg.planning.plan import ConfigurationPlan

PATCH = [16, 24, 16]
PLAN = ConfigurationPlan("3d_fullres", 3, [1.0] * 3, PATCH, PATCH, 2, [[1, 1, 1]] + [[2, 2, 2]] * 2,
                         [[3, 3, 3]] * 3, [4, 8, 16], ["zscore"], [False], network="resenc",
                         encoder_blocks=[1, 2, 2], decoder_convs=[1, 1])


def test_single_conv3d_matches_the_analytic_count():
    cin, cout, k, spatial = 3, 5, 3, (6, 7, 8)
    conv = nn.Conv3d(cin, cout, k, padding=1)
    s = summarize_model(conv, spatial, cin, batch_size=2)
    voxels = 2 * 6 * 7 * 8  # output voxels over the batch ("same" padding)
    assert s.gflops == pytest.approx(2 * cin * cout * k ** 3 * voxels / 1e9, rel=1e-9)
    assert s.parameters == sum(p.numel() for p in conv.parameters()) == cin * cout * k ** 3 + cout
    assert s.activation_elements == 2 * cin * 336 + 2 * cout * 336  # input + the conv's output
    assert s.activation_gb_estimate == pytest.approx(s.activation_elements * 4 / 1e9)
    assert s.input_shape == (2, cin, *spatial)


def test_in_place_activations_and_containers_are_counted_once():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(inplace=True), nn.Identity(),
                          nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU()))
    s = summarize_model(model, (10, 10), 1)
    assert s.activation_elements == 100 * (1 + 4 + 2 + 2)  # input, conv, conv, out-of-place ReLU
    assert s.gflops == pytest.approx(2 * (1 * 4 * 9 + 4 * 2) * 100 / 1e9)


@pytest.mark.parametrize("name", ["unet", "resenc_unet"])
def test_registry_model_scales_with_batch_and_restores_state(name):
    torch.manual_seed(0)
    model = create_model(name, 3, 1, 3, plan=PLAN).train()
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    one = summarize_model(model, PATCH, 1, batch_size=1)
    two = summarize_model(model, PATCH, 1, batch_size=2)
    assert model.training  # mode restored
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before  # hooks removed
    assert one.parameters == two.parameters == sum(p.numel() for p in model.parameters()) > 0
    assert 0 < one.gflops and 0 < one.activation_elements and 0 < one.activation_gb_estimate
    assert two.gflops == pytest.approx(2 * one.gflops, rel=0.02)
    assert two.activation_elements == pytest.approx(2 * one.activation_elements, rel=0.02)


def test_to_dict_is_json_serialisable():
    s = summarize_model(nn.Conv2d(2, 3, 3), (8, 8), 2, batch_size=3)
    assert isinstance(s, ModelSummary)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["parameters"] == s.parameters and d["input_shape"] == [3, 2, 8, 8]
    assert set(d) >= {"parameters", "gflops", "activation_elements", "activation_gb_estimate", "batch_size"}


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        summarize_model(nn.Conv2d(1, 1, 1), (8, 8), 1, batch_size=0)
