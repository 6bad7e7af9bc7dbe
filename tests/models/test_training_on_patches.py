"""Every registered model learns: 30 iterations on real Hippocampus patches lower the deep-supervised loss."""

import numpy as np
import pytest
import torch

from medseg.data.io import read_image, read_label
from medseg.data.sampling import pad_to
from medseg.losses import create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import create_model, list_models
from medseg.planning.plan import ConfigurationPlan

PATCH = [40, 56, 40]
PLAN = ConfigurationPlan("3d_fullres", 3, [1.0] * 3, [36, 50, 35], PATCH, 2,
                         [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, [8, 16, 32, 64], ["zscore"], [False],
                         network="resenc", encoder_blocks=[1, 3, 4, 6], decoder_convs=[1, 1, 1])


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


@pytest.mark.parametrize("name", list_models())
def test_thirty_iterations_lower_the_loss(name, patches):
    torch.manual_seed(0)
    x, y = patches
    model = create_model(name, 3, 1, 3, plan=PLAN).train()
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
