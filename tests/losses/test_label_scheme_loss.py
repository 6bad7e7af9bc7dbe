"""Losses for region-based labels and an ignore label: ignored voxels change neither the loss nor its gradients,
regions train sigmoid heads on the region masks, and ordinary labels give MONAI's Dice+CE exactly."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from medseg.datasets.labels import LabelScheme, scheme_from_nnunet
from medseg.errors import ConfigError
from medseg.losses import check_loss_for_scheme, create_loss
from medseg.losses.registry import with_deep_supervision

PLAIN = LabelScheme({0: "background", 1: "a", 2: "b"})
IGNORE = LabelScheme({0: "background", 1: "a", 2: "b", 3: "ignore"})
BRATS = scheme_from_nnunet({"background": 0, "wt": [1, 2, 3], "tc": [2, 3], "et": [3], "ignore": 4}, [1, 2, 3],
                           "d.json")


def _batch(channels: int, values: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, channels, 6, 8, 8, generator=g, requires_grad=True)
    label = torch.randint(0, values, (2, 1, 6, 8, 8), generator=g)
    return logits, label


def test_without_ignored_voxels_it_is_monais_dice_ce():
    logits, label = _batch(3, 3)
    reference = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5,
                           smooth_dr=1e-5)(logits, label)
    assert torch.allclose(create_loss("dice_ce", IGNORE)(logits, label), reference, atol=1e-6)


@pytest.mark.parametrize("name", ["dice_ce", "dice", "ce"])
@pytest.mark.parametrize("scheme, channels", [(IGNORE, 3), (BRATS, 3)])
def test_ignored_voxels_count_for_nothing(name, scheme, channels):
    """The loss over a volume whose right half is ignored equals the loss over its left half alone, and the
    ignored voxels get no gradient."""
    logits, label = _batch(channels, scheme.ignore_label)
    label[..., 4:] = scheme.ignore_label
    loss = create_loss(name, scheme)
    full = loss(logits, label)
    full.backward()
    assert torch.count_nonzero(logits.grad[..., 4:]) == 0 and torch.count_nonzero(logits.grad[..., :4]) > 0
    left = loss(logits.detach()[..., :4], label[..., :4])
    assert torch.allclose(full, left, atol=1e-6)


def test_regions_train_sigmoid_heads_on_the_region_masks():
    logits, label = _batch(3, 4)
    targets = torch.cat([torch.isin(label, torch.tensor(v)) for v in ([1, 2, 3], [2, 3], [3])], 1).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, targets)
    assert torch.allclose(create_loss("dice_ce", BRATS)(logits, label), bce + dice, atol=1e-6)
    assert torch.allclose(create_loss("ce", BRATS)(logits, label), bce, atol=1e-6)


def test_a_batch_with_nothing_annotated_gives_zero_not_nan():
    logits, label = _batch(3, 3)
    label[:] = 3
    assert create_loss("ce", IGNORE)(logits, label).item() == 0.0


def test_deep_supervision_keeps_the_ignore_label_in_lower_targets():
    logits, label = _batch(3, 3)
    label[..., 4:] = 3
    low = torch.randn(2, 3, 3, 4, 4, requires_grad=True)
    loss = with_deep_supervision(create_loss("dice_ce", IGNORE), 2)([logits, low], label)
    loss.backward()
    assert torch.count_nonzero(low.grad[..., 2:]) == 0  # the ignored half at half resolution


@pytest.mark.parametrize("name", ["focal", "tversky", "dice_focal"])
def test_losses_that_cannot_train_regions_or_ignore_are_refused(name):
    with pytest.raises(ConfigError, match=f"loss={name} cannot train a dataset with region-based labels; use one "
                                          r"of \['ce', 'dice', 'dice_ce'\]"):
        check_loss_for_scheme(name, BRATS)
    with pytest.raises(ConfigError, match="an ignore label"):
        create_loss(name, IGNORE)
    create_loss(name, PLAIN)  # ordinary labels: every loss
