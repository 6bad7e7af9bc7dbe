"""Decisions that only a GPU run reaches, taken on CPU stand-ins: the device the final validation runs on, the
mixed precision chosen per GPU generation, deterministic mode, and prediction under autocast."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
from lightning.pytorch.strategies import Strategy

from medseg.precision import deterministic_setting, inference_precision, training_precision
from medseg.training import run as run_module
from medseg.training.settings import trainer_kwargs
from tests.conftest import compose


def _cfg(tmp_path, *extra):
    return compose("train", ["debug=fast", f"paths.data={tmp_path / 'data'}", f"paths.output={tmp_path / 'out'}",
                             f"paths.preprocessed={tmp_path / 'pre'}", *extra])


def test_final_validation_runs_on_the_device_the_run_trained_on(tmp_path, monkeypatch):
    # Lightning's teardown moves the module off the accelerator at the end of fit (to the CPU); here it is moved
    # to the meta device instead, which holds no data: validating "where the module is" then cannot work
    teardown = Strategy.teardown

    def teardown_moving_the_module(self):
        module = self.lightning_module
        teardown(self)
        module.to("meta")

    monkeypatch.setattr(Strategy, "teardown", teardown_moving_the_module)
    metrics = run_module.train_fold(_cfg(tmp_path))
    assert metrics["timing"]["device"] == "cpu" and metrics["num_cases"] == 5
    assert 0.0 <= metrics["dice_mean"] <= 1.0
    assert metrics["precision"] == {"training": "32-true", "validation": "32-true"}


@pytest.mark.parametrize("capability, expected", [((7, 0), "16-mixed"), ((7, 5), "16-mixed"), ((8, 0), "bf16-mixed"),
                                                  ((9, 0), "bf16-mixed")])
def test_bf16_only_where_the_gpu_has_it_natively(tmp_path, capability, expected):
    assert training_precision("cuda", capability) == expected
    cfg = _cfg(tmp_path, "trainer=default", "trainer.precision=null")
    # a V100/T4-class GPU where torch.cuda.is_bf16_supported() answers True (it counts emulation)
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True), \
            mock.patch("torch.cuda.get_device_capability", return_value=capability):
        assert trainer_kwargs(cfg)["precision"] == expected
    assert trainer_kwargs(cfg)["precision"] == "32-true"  # this CPU machine


def test_prediction_precision_follows_training_only_where_safe():
    assert inference_precision("bf16-mixed", "cuda", (9, 0)) == "bf16-mixed"
    assert inference_precision("bf16-mixed", "cuda", (7, 5)) == "16-mixed"
    assert inference_precision("16-mixed", "cuda", (9, 0)) == "16-mixed"
    assert inference_precision("bf16-mixed", "cpu", None) == "32-true"
    assert inference_precision("32-true", "cuda", (9, 0)) == "32-true"
    assert inference_precision(None, "cuda", (9, 0)) == "32-true"


def test_deterministic_mode_warns_for_ops_without_a_deterministic_implementation(tmp_path):
    import lightning as L

    kwargs = trainer_kwargs(_cfg(tmp_path, "trainer.deterministic=true"))
    assert kwargs["deterministic"] == "warn" and kwargs["benchmark"] is False
    assert deterministic_setting(False) is False
    try:
        L.Trainer(accelerator="cpu", deterministic=kwargs["deterministic"], logger=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        # put_ without accumulation has no deterministic implementation, on the CPU too: it stands in for
        # NLLLoss, AvgPool3d's backward and cumsum on CUDA, which strict mode stops mid-run
        x = torch.zeros(4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x.put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]), accumulate=False)
        assert any("does not have a deterministic implementation" in str(w.message) for w in caught)
    finally:
        torch.use_deterministic_algorithms(False)


def test_whole_volume_pseudo_dice_stays_available(tmp_path):
    from medseg.errors import ConfigError

    metrics = run_module.train_fold(_cfg(tmp_path, "validation.mode=volumes"))
    assert metrics["num_cases"] == 5 and 0.0 <= metrics["dice_mean"] <= 1.0
    with pytest.raises(ConfigError, match="validation.mode='slices': expected one of"):
        run_module.train_fold(_cfg(tmp_path, "validation.mode=slices", "overwrite=true"))
    # refused before the finished fold was set aside
    assert (tmp_path / "out" / "synthetic" / "unet__dice_ce" / "fold_0" / "metrics.json").is_file()
