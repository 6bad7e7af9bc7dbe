"""Every registered loss against an independent computation, in training, under deep supervision, and from its
config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from medseg.losses import create_loss, list_losses, loss_keys
from medseg.losses.registry import deep_supervision_weights, with_deep_supervision
from tests.conftest import CONFIG_DIR

LOSSES = ["dice_ce", "dice", "ce", "focal", "tversky", "dice_focal"]
SMOOTH = 1e-5


def _loss(name: str, batch_dice: bool) -> nn.Module:
    """Loss ``name`` with batch_dice where it has a Dice term (ce and focal refuse the key)."""
    return create_loss(name, **({"batch_dice": batch_dice} if "batch_dice" in loss_keys(name) else {}))


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2, 3, 4, 5) and labels (2, 1, 4, 5) with every class present in every case."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 4, 5), generator=gen)
    labels[:, 0, 0, :3] = torch.tensor([0, 1, 2])
    return logits, labels


# --- independent numpy versions: p = softmax, g = one-hot, class axis 1 -------------------------------------------

def _probs_onehot(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = logits.numpy()
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    g = (labels.numpy() == np.arange(x.shape[1]).reshape(1, -1, *[1] * (x.ndim - 2))).astype(float)
    return p, g


def _sum_axes(batch_dice: bool, ndim: int) -> tuple[int, ...]:
    # per case and class, or (batch Dice) per class over the whole batch
    return ((0,) if batch_dice else ()) + tuple(range(2, ndim))


def np_tversky(logits, labels, alpha, beta, batch_dice=False, smooth=SMOOTH) -> float:
    p, g = _probs_onehot(logits, labels)
    p, g = p[:, 1:], g[:, 1:]  # background excluded
    axes = _sum_axes(batch_dice, p.ndim)
    tp, fp, fn = (p * g).sum(axes), (p * (1 - g)).sum(axes), ((1 - p) * g).sum(axes)
    return float(np.mean(1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)))


def np_dice(logits, labels, batch_dice=False, smooth=SMOOTH) -> float:
    p, g = _probs_onehot(logits, labels)
    p, g = p[:, 1:], g[:, 1:]
    axes = _sum_axes(batch_dice, p.ndim)
    return float(np.mean(1 - (2 * (p * g).sum(axes) + smooth) / (p.sum(axes) + g.sum(axes) + smooth)))


def np_ce(logits, labels) -> float:
    p, g = _probs_onehot(logits, labels)
    return float(-(g * np.log(p)).sum(axis=1).mean())


def np_focal(logits, labels, gamma) -> float:
    # MONAI averages over voxels and classes (background included)
    p, g = _probs_onehot(logits, labels)
    return float(np.mean(-((1 - p) ** gamma) * g * np.log(p)))


# --- values ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_matches_hand_computation(batch, batch_dice):
    logits, labels = batch
    got = create_loss("dice", batch_dice=batch_dice)(logits, labels).item()
    assert got == pytest.approx(np_dice(logits, labels, batch_dice), rel=1e-6)


def test_dice_ce_is_dice_plus_ce(batch):
    logits, labels = batch
    got = create_loss("dice_ce", batch_dice=False, lambda_ce=0.5)(logits, labels).item()
    assert got == pytest.approx(np_dice(logits, labels) + 0.5 * np_ce(logits, labels), rel=1e-6)


def test_ce_matches_torch_and_hand_computation(batch):
    logits, labels = batch
    got = create_loss("ce")(logits, labels)
    assert got.item() == pytest.approx(F.cross_entropy(logits, labels[:, 0]).item(), rel=1e-9)
    assert got.item() == pytest.approx(np_ce(logits, labels), rel=1e-6)
    # labels as floats (as deep supervision passes them) give the same value
    assert create_loss("ce")(logits, labels.double()).item() == pytest.approx(got.item(), rel=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_matches_hand_computation(batch, gamma):
    logits, labels = batch
    got = create_loss("focal", gamma=gamma)(logits, labels).item()
    assert got == pytest.approx(np_focal(logits, labels, gamma), rel=1e-6)


def test_focal_without_focusing_is_ce_over_classes(batch):
    logits, labels = batch
    got = create_loss("focal", gamma=0.0)(logits, labels).item()
    assert got == pytest.approx(F.cross_entropy(logits, labels[:, 0]).item() / logits.shape[1], rel=1e-6)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_tversky_matches_hand_computation(batch, batch_dice):
    logits, labels = batch
    got = create_loss("tversky", batch_dice=batch_dice)(logits, labels).item()
    assert got == pytest.approx(np_tversky(logits, labels, 0.3, 0.7, batch_dice), rel=1e-6)


def test_tversky_with_equal_weights_is_dice(batch):
    logits, labels = batch
    got = create_loss("tversky", alpha=0.5, beta=0.5, smooth=0.0, batch_dice=False)(logits, labels).item()
    assert got == pytest.approx(np_dice(logits, labels, smooth=0.0), rel=1e-9)


def test_tversky_weighs_misses_more_than_false_alarms():
    # one foreground class; prediction A misses half the object, B adds as many false voxels
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[..., :2, :] = 1
    miss, extra = labels.clone(), labels.clone()
    miss[..., 1, :] = 0
    extra[..., 2, :] = 1
    loss = create_loss("tversky", batch_dice=False)
    as_logits = lambda lab: 20.0 * F.one_hot(lab[:, 0], 2).permute(0, 3, 1, 2).double()  # noqa: E731
    assert loss(as_logits(miss), labels) > loss(as_logits(extra), labels)


def test_dice_focal_is_dice_plus_focal(batch):
    logits, labels = batch
    got = create_loss("dice_focal", batch_dice=False, lambda_focal=2.0)(logits, labels).item()
    assert got == pytest.approx(np_dice(logits, labels) + 2.0 * np_focal(logits, labels, 2.0), rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_perfect_prediction_is_near_the_minimum_and_a_wrong_one_is_worse(batch, name):
    _, labels = batch
    one_hot = lambda lab: F.one_hot(lab[:, 0], 3).permute(0, 3, 1, 2).double()  # noqa: E731
    loss = _loss(name, batch_dice=False)
    perfect = loss(20.0 * one_hot(labels), labels).item()
    wrong = loss(20.0 * one_hot((labels + 1) % 3), labels).item()
    assert 0.0 <= perfect < 1e-4
    assert wrong > 0.5


# --- training -------------------------------------------------------------------------------------------------

def _blob(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy bright disk (label 1) on a dark background, (1, 1, size, size)."""
    gen = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    label = (((yy - 7.5) ** 2 + (xx - 6.5) ** 2) < 16).long()[None, None]
    image = label.float() + 0.3 * torch.randn(label.shape, generator=gen)
    return image, label


class _TinyNet(nn.Module):
    """Two convs; with levels > 1 also 2x and 4x average-pooled logits, as a deeply supervised decoder."""

    def __init__(self, levels: int = 1):
        super().__init__()
        self.levels = levels
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x: torch.Tensor):
        out = self.body(x)
        if self.levels == 1:
            return out
        return [out] + [F.avg_pool2d(out, 2 ** i) for i in range(1, self.levels)]


def _train(loss: nn.Module, levels: int, steps: int = 15) -> list[float]:
    torch.manual_seed(0)
    net = _TinyNet(levels)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    image, label = _blob()
    history = []
    for _ in range(steps):
        opt.zero_grad()
        value = loss(net(image), label)
        value.backward()
        opt.step()
        history.append(value.item())
    return history


@pytest.mark.parametrize("name", LOSSES)
def test_loss_decreases_when_training_a_tiny_net(name):
    history = _train(_loss(name, batch_dice=True), levels=1)
    assert all(np.isfinite(history))
    assert history[-1] < 0.8 * history[0]


@pytest.mark.parametrize("name", LOSSES)
def test_deep_supervision_over_three_resolutions(name):
    torch.manual_seed(0)
    loss = _loss(name, batch_dice=True)
    image, label = _blob()
    outputs = _TinyNet(levels=3)(image)
    assert [o.shape[-1] for o in outputs] == [16, 8, 4]
    got = with_deep_supervision(loss, 3)(outputs, label)
    # the targets by nearest-neighbour ("nearest-exact": the centre voxel of each 2x2 / 4x4 block)
    targets = [label, label[..., 1::2, 1::2], label[..., 2::4, 2::4]]
    expected = sum(w * loss(o, t) for w, o, t in zip(deep_supervision_weights(3), outputs, targets))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    history = _train(with_deep_supervision(loss, 3), levels=3)
    assert history[-1] < 0.8 * history[0]


# --- configs --------------------------------------------------------------------------------------------------

def test_every_loss_has_a_config_and_every_config_instantiates(batch):
    logits, labels = batch
    configs = sorted((CONFIG_DIR / "loss").glob("*.yaml"))
    names = set()
    for path in configs:
        kwargs = OmegaConf.to_container(OmegaConf.load(path))
        if kwargs.get("batch_dice", False) is None:  # as run.py: the plan's choice
            kwargs["batch_dice"] = True
        name = kwargs.pop("name")
        assert name == path.stem
        names.add(name)
        assert torch.isfinite(create_loss(name, **kwargs)(logits, labels))
    assert names == set(list_losses()) == set(LOSSES)
