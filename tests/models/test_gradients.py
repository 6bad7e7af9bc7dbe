"""Every parameter of every registered model gets a gradient from the training loss.

DDP (with find_unused_parameters=False, as nnU-Net trains) fails on the first step if any parameter that
requires a gradient is left out of the loss, so a parameter built but never used is a crash there, not only
dead weight.
"""

import pytest
import torch

from medseg.losses import create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import create_model, list_models
from medseg.models.transformer import adapt_patch, patch_multiple
from medseg.planning.plan import ConfigurationPlan

# 4 stages: one deep-supervision head below full resolution, and a lowest decoder level left unsupervised
FEATURES = [4, 8, 16, 32]
# Swin's bottleneck (1/32) keeps 2 positions on the last axis, which instance norm needs in training
BASE_PATCH = [16, 16, 48]
SMALL = {"swin_unetr": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)},
         "unetr": {"feature_size": 4, "hidden_size": 32, "mlp_dim": 32, "num_heads": 2}}


def _plan(patch: list[int]) -> ConfigurationPlan:
    n = len(FEATURES)
    return ConfigurationPlan("3d_fullres", 3, [1.0] * 3, patch, patch, 2, [[1] * 3] + [[2] * 3] * (n - 1),
                             [[3] * 3] * n, FEATURES, ["zscore"], [False], network="resenc",
                             encoder_blocks=[1, 2, 2, 2], decoder_convs=[1] * (n - 1))


def _missing_gradients(name: str, deep_supervision: bool) -> list[str]:
    torch.manual_seed(0)
    patch = adapt_patch(BASE_PATCH, patch_multiple(name))
    model = create_model(name, 3, 1, 3, plan=_plan(patch), deep_supervision=deep_supervision,
                         **SMALL.get(name, {})).train()
    loss_fn = with_deep_supervision(create_loss("dice_ce"), model.heads + 1)
    x, y = torch.randn(2, 1, *patch), torch.randint(0, 3, (2, 1, *patch))
    loss = loss_fn(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("deep_supervision", [True, False], ids=["deep_supervision", "single_output"])
# controls (<family>_control) hold a subset of their family's parameters: tests/models/test_controls.py checks them
@pytest.mark.parametrize("name", [n for n in list_models() if not n.endswith("_control")])
def test_every_trainable_parameter_gets_a_gradient(name, deep_supervision):
    missing = _missing_gradients(name, deep_supervision)
    assert not missing, f"{name}: parameters outside the loss's graph: {missing}"


def test_unetr_loads_checkpoints_holding_the_unused_norms():
    """Earlier unetr checkpoints carry each ViT block's (never used) cross-attention norm."""
    torch.manual_seed(0)
    patch = [16, 16, 32]
    model = create_model("unetr", 3, 1, 3, plan=_plan(patch), **SMALL["unetr"]).eval()
    state = dict(model.state_dict())
    assert not any(".norm_cross_attn." in k for k in state)
    hidden = SMALL["unetr"]["hidden_size"]
    for i in range(len(model.net.vit.blocks)):
        state[f"net.vit.blocks.{i}.norm_cross_attn.weight"] = torch.ones(hidden)
        state[f"net.vit.blocks.{i}.norm_cross_attn.bias"] = torch.zeros(hidden)
    fresh = create_model("unetr", 3, 1, 3, plan=_plan(patch), **SMALL["unetr"]).eval()
    fresh.load_state_dict(state)  # strict: the extra norms are dropped, nothing else is left over
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
