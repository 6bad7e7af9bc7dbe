"""Closed-form epoch schedules: values, checkpoint round trip, extension to a new horizon, configs."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hydra.utils import instantiate
from torch.optim.lr_scheduler import LambdaLR, PolynomialLR

from medseg.training.schedules import (PolyFactor, WarmupCosineFactor, poly, set_total_epochs,
                                       warmup_cosine)
from tests.conftest import compose


def _optimizer(lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler, epochs: int) -> list[float]:
    """The lr used in each of the first `epochs` epochs, stepping once per epoch."""
    lrs = []
    for _ in range(epochs):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_poly_is_the_closed_form_and_torchs_polynomial_lr():
    total = 10
    ours = _lrs(poly(_optimizer(), total), total + 3)
    torchs = _lrs(PolynomialLR(_optimizer(), total_iters=total, power=0.9), total + 3)
    closed = [1e-2 * max(0.0, 1 - e / total) ** 0.9 for e in range(total + 3)]
    assert ours == pytest.approx(closed, abs=1e-12)
    assert ours == pytest.approx(torchs, abs=1e-12)
    assert ours[0] == 1e-2 and ours[total:] == [0.0] * 3


def test_warmup_rises_then_cosine_reaches_the_minimum():
    total, warmup = 20, 4
    lrs = _lrs(warmup_cosine(_optimizer(1.0), total, warmup, min_lr_ratio=0.1), total + 2)
    assert lrs[0] == pytest.approx(1 / (warmup + 1))
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # linear rise
    assert lrs[warmup] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[warmup:total], lrs[warmup + 1:total + 1]))  # cosine decay
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[total:] == pytest.approx([0.1, 0.1])


def test_warmup_defaults_to_five_percent():
    assert warmup_cosine(_optimizer(), 200).lr_lambdas[0].warmup_epochs == 10
    assert warmup_cosine(_optimizer(), 6).lr_lambdas[0].warmup_epochs == 1


def test_state_dict_round_trip_restores_the_factor():
    scheduler = poly(_optimizer(), 10, power=0.5)
    _lrs(scheduler, 4)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain numbers only: loads without unpickling objects

    restored = poly(_optimizer(), 99)
    restored.load_state_dict(state)
    factor = restored.lr_lambdas[0]
    assert isinstance(factor, PolyFactor)
    assert (factor.total_epochs, factor.power, restored.last_epoch) == (10, 0.5, 4)
    assert restored.get_last_lr() == scheduler.get_last_lr()


def test_set_total_epochs_moves_the_horizon_of_a_restored_run():
    # a 10-epoch run, finished: its restored state ends the schedule at epoch 10 with lr 0
    finished = poly(_optimizer(), 10)
    _lrs(finished, 10)
    extended = poly(_optimizer(), 10)
    extended.load_state_dict(finished.state_dict())
    extended.optimizer.param_groups[0]["lr"] = 0.0  # the optimizer's state is restored too
    set_total_epochs(extended, 20)
    assert extended.lr_lambdas[0].total_epochs == 20
    expected = [1e-2 * (1 - e / 20) ** 0.9 for e in range(10, 20)]
    assert extended.get_last_lr() == pytest.approx(expected[:1])
    assert _lrs(extended, 10) == pytest.approx(expected)


def test_set_total_epochs_on_warmup_cosine():
    scheduler = warmup_cosine(_optimizer(1.0), 10, 2)
    _lrs(scheduler, 6)
    set_total_epochs(scheduler, 22)
    factor = scheduler.lr_lambdas[0]
    assert (factor.total_epochs, factor.warmup_epochs) == (22, 2)
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 20)))


def test_factors_hold_plain_numbers_only():
    for factor in (PolyFactor(5), WarmupCosineFactor(5, 1, 0.1)):
        assert all(isinstance(v, (int, float)) for v in vars(factor).values())
    with pytest.raises(ValueError):
        PolyFactor(0)
    assert WarmupCosineFactor(3, 3, 0.1)(3) == pytest.approx(0.1)  # no division by zero at the horizon


@pytest.mark.parametrize("name, factor", [("poly", PolyFactor), ("warmup_cosine", WarmupCosineFactor)])
def test_scheduler_configs_instantiate(name, factor):
    cfg = compose("train", [f"scheduler={name}", "trainer.max_epochs=40"])
    scheduler = instantiate(cfg.scheduler)(_optimizer())
    assert isinstance(scheduler, LambdaLR) and isinstance(scheduler.lr_lambdas[0], factor)
    assert scheduler.lr_lambdas[0].total_epochs == 40
    if name == "warmup_cosine":
        assert scheduler.lr_lambdas[0].warmup_epochs == 2  # null: 5% of max_epochs
