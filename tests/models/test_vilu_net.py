"""vilu_net: residual-encoder U-Net with mLSTM (Vision-LSTM) layers after the deeper encoder stages."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import medseg.models.vilu_net  # noqa: F401  (registers "vilu_net" until medseg.models imports it)
from medseg.models import create_model
from medseg.models.resenc_unet import ResidualBlock
from medseg.models.vilu_net import vil_stages
from medseg.planning.plan import ConfigurationPlan
from medseg.planning.planner import encoder_blocks


def _plan(dims, patch, features, network="plain"):
    n = len(features)
    blocks = [1] * n if network == "resenc" else []  # plain: the model takes ResEnc's counts
    return ConfigurationPlan("x", dims, [1.0] * dims, list(patch), list(patch), 1,
                             [[1] * dims] + [[2] * dims] * (n - 1), [[3] * dims] * n, features, ["zscore"], [False],
                             network=network, encoder_blocks=blocks, decoder_convs=[1] * (n - 1) if blocks else [])


SMALL = {3: ((40, 56, 40), [(40, 56, 40), (20, 28, 20)]), 2: ((56, 40), [(56, 40), (28, 20)])}


@pytest.mark.parametrize("dims", [3, 2])
def test_train_and_eval_forward_backward(dims):
    torch.manual_seed(0)
    patch, expected = SMALL[dims]
    model = create_model("vilu_net", dims, 2, 3, plan=_plan(dims, patch, [8, 16, 32, 64]))
    assert model.heads == 1  # 4 stages: one extra head below full resolution
    x = torch.randn(1, 2, *patch)
    outs = model.train()(x)
    # finest first, each at its own decoder resolution
    assert [tuple(o.shape) for o in outs] == [(1, 3, *s) for s in expected]
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # the mLSTM parameters do learn (not only receive a zero gradient)
    assert all(p.grad.abs().sum() > 0 for layer in model.mlstm_layers() for p in layer.proj_down.parameters())
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (1, 3, *patch) and torch.isfinite(logits).all()


def test_mlstm_layers_on_deep_stages_with_alternating_directions():
    model = create_model("vilu_net", 3, 1, 2, plan=_plan(3, (40, 56, 40), [8, 16, 32, 64]))
    # stage tokens 89600, 11200, 1400, 175: all but full resolution are <= 16384
    assert model.vil_stages == [1, 2, 3]
    assert len(model.vil[0]) == 0 and all(len(model.vil[i]) == 2 for i in (1, 2, 3))
    layers = model.mlstm_layers()
    assert [layer.reverse for layer in layers] == [False, True] * 3
    assert [layer.dim for layer in layers] == [16, 16, 32, 32, 64, 64]
    # odd depth: the alternation carries across stages
    model = create_model("vilu_net", 3, 1, 2, plan=_plan(3, (40, 56, 40), [8, 16, 32, 64]), vil_depth=1)
    assert [layer.reverse for layer in model.mlstm_layers()] == [False, True, False]


def test_mlstm_changes_the_output():
    # the mLSTM branch is wired in: zeroing its output projections (residual branch = 0) changes the logits
    torch.manual_seed(0)
    model = create_model("vilu_net", 2, 1, 2, plan=_plan(2, (32, 32), [8, 16, 32, 64])).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
        for layer in model.mlstm_layers():
            layer.proj_down.weight.zero_()
        assert not torch.allclose(before, model(x))


def test_stage_rule_and_bottleneck_always():
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 4
    assert vil_stages((96, 96, 96), strides, 16384) == [2, 3, 4]  # 24^3 = 13824 is the first that fits
    assert vil_stages((96, 96, 96), strides, 0) == [4]
    assert vil_stages((5, 5), [[1, 1], [2, 2]], 4) == [1]  # ceil: 3x3 = 9 > 4, but it is the bottleneck
    model = create_model("vilu_net", 2, 1, 2, plan=_plan(2, (56, 40), [8, 16, 32, 64]), vil_max_tokens=0)
    assert model.vil_stages == [3] and len(model.mlstm_layers()) == 2


def _blocks(model) -> list[int]:
    return [sum(isinstance(m, ResidualBlock) for m in stage) for stage in model.encoder]


def test_plain_plan_uses_resenc_block_counts_and_resenc_plan_its_own():
    model = create_model("vilu_net", 3, 1, 2, plan=_plan(3, (40, 56, 40), [8, 16, 32, 64]))
    assert _blocks(model) == encoder_blocks("resenc", 4)
    model = create_model("vilu_net", 3, 1, 2, plan=_plan(3, (40, 56, 40), [8, 16, 32, 64], network="resenc"))
    assert _blocks(model) == [1, 1, 1, 1]
    model = create_model("vilu_net", 3, 1, 2, plan=_plan(3, (40, 56, 40), [8, 16, 32, 64]), deep_supervision=False)
    assert model.heads == 0 and model.train()(torch.randn(1, 1, 40, 56, 40)).shape == (1, 2, 40, 56, 40)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    torch.set_num_threads(1)
    import medseg.models.vilu_net
    from medseg.models import create_model
    from medseg.planning.plan import ConfigurationPlan
    plan = ConfigurationPlan("3d_fullres", 3, [1.0] * 3, [96] * 3, [96] * 3, 1, [[1, 1, 1]] + [[2, 2, 2]] * 4,
                             [[3, 3, 3]] * 5, [8, 16, 32, 64, 128], ["zscore"], [False])
    model = create_model("vilu_net", 3, 1, 2, plan=plan).train()
    x = torch.randn(1, 1, 96, 96, 96)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outs = model(x)
    sum(o.mean() for o in outs).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"stages": model.vil_stages, "growth_gb": (peak - base) / 2 ** 20}))
""")


def test_memory_linear_in_tokens_at_96_cubed():
    # mLSTM at 24^3 (13824 tokens): one S x S float32 map over 4 heads is already 3 GB, and the parallel
    # formulation keeps several for backward; the chunkwise one stays around 1 GB for the whole network
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["stages"] == [2, 3, 4]
    assert report["growth_gb"] < 6.0, report
