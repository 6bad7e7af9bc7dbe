"""Ablation controls (<family>_control): each hybrid family's network with its distinctive block (Mamba layer,
mLSTM stack, Swin or ViT transformer block) replaced by identity. The control's parameters are the family's less
the replaced blocks', counted from the built modules; it holds no module of the block's class, trains (every
parameter reaches the loss) and gives the family's outputs in training and eval; its config is the family's plus
its name and ``control: true``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from mambapy.mamba import MambaBlock
from omegaconf import OmegaConf
from monai.networks.blocks.selfattention import SABlock
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets.swin_unetr import SwinTransformerBlock, WindowAttention

from medseg.losses import create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import create_model, list_models, model_spec
from medseg.models.mlstm import mLSTMLayer
from medseg.models.registry import encoder_prefixes, register_control
from medseg.models.umamba import MambaLayer
from medseg.models.vilu_net import FeatureMapMLSTM
from tests.conftest import CONFIG_DIR
from tests.training_path import compose_train, model_kwargs, tiny_plan


@dataclasses.dataclass(frozen=True)
class Family:
    replaced: type[nn.Module]  # the block the control replaces (what is counted out of the parameters)
    absent: tuple[type[nn.Module], ...]  # no module of these classes may remain in the control
    patch: list[int]
    keys: dict  # tiny sizes, so the whole file runs in seconds


# 3D patches of the tiny plan (4 stages, 4-32 features); the Swin patch is a multiple of 32 with 2 positions at the
# bottleneck's last axis (instance norm needs more than one in training)
FAMILIES = {
    "umamba_bot": Family(MambaLayer, (MambaLayer, MambaBlock), [16, 16, 16], {}),
    # a Mamba layer on every stage of at most 64 positions: three of the four
    "umamba_enc": Family(MambaLayer, (MambaLayer, MambaBlock), [16, 16, 16], {"mamba_max_tokens": 64}),
    "vilu_net": Family(FeatureMapMLSTM, (FeatureMapMLSTM, mLSTMLayer), [16, 16, 16],
                       {"vil_max_tokens": 64, "vil_heads": 2}),
    "swin_unetr": Family(SwinTransformerBlock, (SwinTransformerBlock, WindowAttention), [32, 32, 64],
                         {"feature_size": 12, "depths": [1, 2, 1, 1], "num_heads": [1, 1, 2, 2]}),
    "unetr": Family(TransformerBlock, (TransformerBlock, SABlock), [16, 16, 16],
                    {"feature_size": 4, "hidden_size": 32, "mlp_dim": 32, "num_heads": 2}),
    "unetr_small": Family(TransformerBlock, (TransformerBlock, SABlock), [16, 16, 16], {}),  # the preset's sizes
}


def _build(name: str, family: Family) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, 3, 1, 3, plan=tiny_plan(3, family.patch), **family.keys)


def _count(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_every_hybrid_family_has_a_registered_control():
    controls = {n for n in list_models() if n.endswith("_control")}
    assert controls == {f"{f}_control" for f in FAMILIES}
    for family in FAMILIES:
        spec = model_spec(f"{family}_control")
        assert spec.defaults["control"] is True and spec.base == (model_spec(family).base or family)
        assert (spec.patch_multiple, spec.default_optimizer, spec.default_scheduler) == (
            model_spec(family).patch_multiple, model_spec(family).default_optimizer,
            model_spec(family).default_scheduler)
        assert encoder_prefixes(f"{family}_control") == encoder_prefixes(family)
    with pytest.raises(ValueError, match="'unet' has no control"):
        register_control("unet")  # a plain CNN has no distinctive block to remove
    assert "unet_control" not in list_models()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_control_is_the_family_less_its_blocks(family):
    spec = FAMILIES[family]
    full, control = _build(family, spec), _build(f"{family}_control", spec)
    blocks = [m for m in full.modules() if isinstance(m, spec.replaced)]
    assert blocks, f"{family} has no {spec.replaced.__name__} at this plan"
    assert _count([control]) == _count([full]) - _count(blocks) > 0
    assert not [type(m).__name__ for m in control.modules() if isinstance(m, spec.absent)]
    # every parameter the control keeps is the family's, under the same name and shape
    kept = {k: v.shape for k, v in full.state_dict().items()}
    assert all(kept.get(k) == v.shape for k, v in control.state_dict().items())
    assert any(n.startswith(encoder_prefixes(family)) for n, _ in control.named_parameters())

    x = torch.randn(2, 1, *spec.patch)
    y = torch.randint(0, 3, (2, 1, *spec.patch))
    out = control.train()(x)
    assert isinstance(out, list) and len(out) == control.heads + 1 == full.heads + 1
    # finest first, each at half the resolution of the one before
    assert [tuple(o.shape) for o in out] == [(2, 3, *(s // 2 ** k for s in spec.patch)) for k in range(len(out))]
    loss = with_deep_supervision(create_loss("dice_ce"), len(out))(out, y)
    loss.backward()
    # every parameter reaches the loss (DDP with find_unused_parameters=False fails otherwise)
    assert not [n for n, p in control.named_parameters() if p.grad is None]
    with torch.no_grad():
        assert control.eval()(x).shape == (2, 3, *spec.patch)


def test_resenc_based_controls_are_the_residual_encoder_unet():
    """U-Mamba's and ViLU-Net's blocks were added to nnU-Net's residual-encoder U-Net: without them, that is what
    is left (same state dict), so the control isolates the block from the optimiser and schedule."""
    plan = tiny_plan(3, [16, 16, 16])
    resenc = create_model("resenc_unet", 3, 1, 3, plan=plan).state_dict()
    for family in ("umamba_bot", "umamba_enc", "vilu_net"):
        control = _build(f"{family}_control", FAMILIES[family]).state_dict()
        assert {k: v.shape for k, v in control.items()} == {k: v.shape for k, v in resenc.items()}, family


def _target(group: str, option: str | None) -> str:
    return str(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")._target_)


def test_control_configs_are_the_family_configs_plus_the_switch():
    for family in FAMILIES:
        cfg = compose_train([f"model={family}_control"])
        name, keys = model_kwargs(cfg)
        family_cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{family}.yaml"))
        assert isinstance(family_cfg, dict)
        del family_cfg["defaults"], family_cfg["name"]
        assert name == f"{family}_control" and keys == {**family_cfg, "control": True}
        # the family's optimiser and schedule, so that only the block differs
        spec = model_spec(family)
        assert cfg.optimizer._target_ == _target("optimizer", spec.default_optimizer)
        assert cfg.scheduler._target_ == _target("scheduler", spec.default_scheduler)
