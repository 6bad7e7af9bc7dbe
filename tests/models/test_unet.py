import pytest
import torch

from medseg.losses import create_loss
from medseg.losses.registry import deep_supervision_weights, with_deep_supervision
from medseg.models import create_model, list_models
from medseg.planning.plan import ConfigurationPlan


def _config(features):
    return ConfigurationPlan("3d_fullres", 3, [1.0] * 3, [35, 50, 36], [40, 56, 40], 2,
                             [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 4, features,
                             ["zscore"], [False])


def test_unet_is_registered_and_built_from_the_plan():
    assert "unet" in list_models()
    model = create_model("unet", 3, 1, 3, plan=_config([4, 8, 16, 32]))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs[0].out_channels == 4 and max(c.out_channels for c in convs) == 32


def test_deep_supervision_outputs_in_training_and_logits_in_eval():
    model = create_model("unet", 3, 1, 3, plan=_config([4, 8, 16, 32]))
    x = torch.randn(2, 1, 40, 56, 40)
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 2  # 4 stages: full res + one lower level
    assert [o.shape for o in outs] == [(2, 3, 40, 56, 40), (2, 3, 20, 28, 20)]  # each head at its own resolution
    sum(o.mean() for o in outs).backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 40, 56, 40)


def test_deep_supervision_compares_each_head_with_the_downsampled_label_as_nnunet():
    """nnU-Net scores the 1/2-resolution head against the label downsampled by nearest-exact (the voxel at
    index 2i+1 of each 2x2x2 block); upsampling the head's logits to the full label gives another gradient."""
    torch.manual_seed(0)
    model = create_model("unet", 3, 1, 3, plan=_config([4, 8, 16, 32])).train()
    x = torch.randn(2, 1, 40, 56, 40)
    y = torch.randint(0, 3, (2, 1, 40, 56, 40))
    outs = model(x)
    assert outs[1].shape[2:] == (20, 28, 20)
    base = create_loss("dice_ce", batch_dice=False)
    got = with_deep_supervision(base, 2)(outs, y)
    targets = [y, y[..., 1::2, 1::2, 1::2]]
    expected = sum(w * base(o, t) for w, o, t in zip(deep_supervision_weights(2), outs, targets))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
