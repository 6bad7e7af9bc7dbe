import torch

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
    assert all(o.shape == (2, 3, 40, 56, 40) for o in outs)
    sum(o.mean() for o in outs).backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 40, 56, 40)
