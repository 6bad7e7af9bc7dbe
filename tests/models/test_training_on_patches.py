"""Every registered model learns: 30 iterations on real Hippocampus patches lower the deep-supervised loss."""

import dataclasses

import numpy as np
import pytest
import torch

from medseg.datasets.io import read_image, read_label
from medseg.loading.sampling import pad_to
from medseg.losses import create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import create_model, list_models
from medseg.models.transformer import adapt_patch, patch_multiple
from medseg.planning.plan import ConfigurationPlan

PATCH = [40, 56, 40]
PLANS = {dims: ConfigurationPlan(f"{dims}d", dims, [1.0] * dims, [36, 50, 35][-dims:], PATCH[-dims:], 2,
                                 [[1] * dims] + [[2] * dims] * 3, [[3] * dims] * 4, [8, 16, 32, 64], ["zscore"],
                                 [False], network="resenc", encoder_blocks=[1, 3, 4, 6], decoder_convs=[1, 1, 1])
         for dims in (2, 3)}


@pytest.fixture(scope="module")
def patches(hippocampus):
    images, labels = [], []
    for case in ("hippocampus_001", "hippocampus_003"):
        image, _ = read_image([hippocampus / "imagesTr" / f"{case}.nii.gz"])
        label, _ = read_label(hippocampus / "labelsTr" / f"{case}.nii.gz")
        image = (image - image.mean()) / image.std()
        images.append(pad_to(image, PATCH))
        labels.append(pad_to(label[None], PATCH))
    return torch.from_numpy(np.stack(images)).float(), torch.from_numpy(np.stack(labels)).long()


# small widths where the defaults are large, so the test stays quick on a CPU
SMALL = {"swin_unetr": {"feature_size": 12}, "unetr": {"hidden_size": 96, "mlp_dim": 192, "num_heads": 4,
                                                      "feature_size": 8}}


@pytest.mark.parametrize("dims", [3, 2])
# controls (<family>_control: the family less a block): tests/models/test_controls.py runs each forward and backward
@pytest.mark.parametrize("name", [n for n in list_models() if not n.endswith("_control")])
def test_thirty_iterations_lower_the_loss(name, dims, patches):
    torch.manual_seed(0)
    x, y = patches
    if dims == 2:  # the 2d configuration's input: slices through the labelled middle of each case
        x, y = x[:, :, 18:22].transpose(1, 2).flatten(0, 1), y[:, :, 18:22].transpose(1, 2).flatten(0, 1)
    else:  # the labelled middle [32, 56, 32] of one case: windowed attention then runs at [32, 64, 32], not 64^3
        # (4x cheaper); one axis keeps 64 so that SwinUNETR's bottleneck holds more than one voxel to normalise
        x, y = x[:1, :, 4:36, :, 4:36], y[:1, :, 4:36, :, 4:36]
    patch = adapt_patch(list(x.shape[2:]), patch_multiple(name))  # as training adapts it
    x, y = torch.from_numpy(pad_to(x.numpy(), patch)), torch.from_numpy(pad_to(y.numpy(), patch))
    plan = dataclasses.replace(PLANS[dims], patch_size=patch)
    model = create_model(name, dims, 1, 3, plan=plan, **SMALL.get(name, {})).train()
    loss_fn = with_deep_supervision(create_loss("dice_ce"), getattr(model, "heads", 0) + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
