"""Transformer, Mamba and xLSTM model configs bring AdamW with warm-up + cosine; the command line still wins."""

from __future__ import annotations

import pytest

from tests.conftest import compose

OWN_OPTIMISER = ["swin_unetr", "unetr", "umamba_bot", "umamba_enc", "vilu_net"]
ADAMW, SGD = "torch.optim.AdamW", "torch.optim.SGD"
POLY, COSINE = "medseg.training.schedules.poly", "medseg.training.schedules.warmup_cosine"


def _targets(cfg) -> tuple[str, str | None]:
    return cfg.optimizer._target_, cfg.scheduler._target_ if cfg.get("scheduler") else None


def _choices(overrides: list[str]) -> tuple[str, str | None]:
    return _targets(compose("train", overrides))


@pytest.mark.parametrize("model", OWN_OPTIMISER)
def test_model_brings_adamw_and_warmup_cosine(model):
    cfg = compose("train", [f"model={model}"])
    assert _targets(cfg) == (ADAMW, COSINE)
    assert cfg.model.name == model and "optimizer" not in cfg.model  # the model package holds only the model


@pytest.mark.parametrize("model", ["unet", "resenc_unet"])
def test_cnns_keep_sgd_and_poly(model):
    assert _choices([f"model={model}"]) == (SGD, POLY)


@pytest.mark.parametrize("overrides, expected", [
    (["model=swin_unetr", "optimizer=sgd"], (SGD, COSINE)),
    (["optimizer=sgd", "model=swin_unetr"], (SGD, COSINE)),
    (["model=swin_unetr", "scheduler=poly"], (ADAMW, POLY)),
    (["model=swin_unetr", "optimizer=sgd", "scheduler=poly"], (SGD, POLY)),
    (["model=vilu_net", "~scheduler"], (ADAMW, None)),
])
def test_command_line_wins_over_the_model(overrides, expected):
    assert _choices(overrides) == expected


def test_model_keys_still_override():
    cfg = compose("train", ["model=swin_unetr", "model.feature_size=24", "optimizer.lr=1e-4"])
    assert (cfg.model.feature_size, cfg.optimizer.lr) == (24, 1e-4)


def test_experiment_with_its_own_optimiser_composes_with_a_transformer():
    cfg = compose("train", ["experiment=cpu_hippocampus", "model=swin_unetr", "data.root=/x/Task04_Hippocampus"])
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.scheduler._target_) == (ADAMW, 3e-3, COSINE)
    assert cfg.run_dir.endswith("Task04_Hippocampus/swin_unetr__dice_ce")
