"""The loss registry refuses keys its losses do not take, from a config as from Python."""

from __future__ import annotations

import pytest

from medseg.errors import ConfigError
from medseg.losses import create_loss, list_losses, loss_keys
from medseg.losses.registry import register_loss
from tests.training_path import build, compose_train, tiny_plan


def test_a_misspelled_key_in_a_loss_config_stops_the_run():
    cfg = compose_train(["loss=dice_ce", "+loss.smoth=1.0e-5"])
    with pytest.raises(ConfigError) as e:
        build(cfg, tiny_plan(2, [32, 32]))
    message = str(e.value)
    assert "loss 'dice_ce'" in message and "'smoth' (did you mean 'smooth'?)" in message
    assert "accepted keys: batch_dice, lambda_ce, lambda_dice, smooth" in message
    assert "loss/dice_ce.yaml" in message


def test_a_key_of_another_loss_is_refused():
    # cross-entropy has no Dice term: batch Dice is not a setting of it
    with pytest.raises(ConfigError, match=r"loss 'ce': unknown key 'batch_dice'; accepted keys: \(none\)"):
        create_loss("ce", batch_dice=True)
    with pytest.raises(ConfigError, match="loss 'focal': unknown key 'alpha'"):
        create_loss("focal", alpha=0.25)


def test_unknown_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown loss 'dice_bce'"):
        create_loss("dice_bce")


def test_losses_list_their_keys_and_take_no_catch_all():
    assert loss_keys("tversky") == ("alpha", "beta", "smooth", "batch_dice")
    with pytest.raises(TypeError, match="must list its keyword arguments"):
        register_loss("lenient_test_loss")(lambda **_: None)
    assert "lenient_test_loss" not in list_losses()


def test_loss_keys_can_be_checked_before_anything_is_built():
    from medseg.losses import check_loss_keys

    check_loss_keys("dice_focal", {"gamma": 1.0, "batch_dice": None})
    with pytest.raises(ConfigError, match="loss 'dice_focal': unknown key 'lambda_ce'"):
        check_loss_keys("dice_focal", {"lambda_ce": 1.0})
