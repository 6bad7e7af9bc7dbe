"""The model registry: strict keys, one distinct name per model config, and each model's spec (patch multiple,
default optimiser and schedule) as training asks for it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from medseg.cli.common import CONFIG_DIR
from medseg.errors import ConfigError
from medseg.losses import list_losses
from medseg.models import ModelSpec, adapt_patch_for_model, create_model, list_models, model_spec, register_model
from medseg.models import registry as model_registry
from medseg.models.transformer import PATCH_MULTIPLE, UNETR_SMALL, adapt_patch, patch_multiple
from tests.training_path import build, compose_train, model_kwargs, tiny_plan

MODEL_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
LOSS_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "loss").glob("*.yaml"))
# rounded up per model as training does (UNETR: [16, 48]; Swin: [32, 64], whose bottleneck (1/32) keeps the 2
# positions on the last axis that instance norm needs in training)
PATCH_2D = [16, 48]


# --- strict keys --------------------------------------------------------------------------------------------------

def test_a_misspelled_key_in_a_model_config_stops_the_run():
    cfg = compose_train(["model=vilu_net", "+model.vil_deptth=3"])
    with pytest.raises(ConfigError) as e:
        build(cfg, tiny_plan(2, PATCH_2D))
    message = str(e.value)
    assert "model 'vilu_net'" in message and "'vil_deptth'" in message
    assert "did you mean 'vil_depth'?" in message
    assert "accepted keys: chunk_size, control, deep_supervision, vil_depth, vil_heads, vil_max_tokens" in message
    assert "model/vilu_net.yaml" in message  # the config group option to fix


def test_every_unknown_key_is_named_and_none_reaches_the_factory():
    with pytest.raises(ConfigError, match=r"model 'unet': unknown keys 'resdual' \(did you mean 'residual'\?\), "
                                          r"'zzz'; accepted keys: deep_supervision, residual"):
        create_model("unet", 2, 1, 2, plan=tiny_plan(2, PATCH_2D), resdual=True, zzz=1)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model 'vnet'"):
        create_model("vnet", 3, 1, 2)
    with pytest.raises(ConfigError, match="unknown model 'vnet'"):
        adapt_patch_for_model("vnet", [32, 32, 32])


def test_a_factory_taking_any_keyword_cannot_be_registered():
    with pytest.raises(TypeError, match="must list its keyword arguments"):
        register_model("lenient_test_model")(lambda spatial_dims, in_channels, out_channels, plan=None, **_: None)
    assert "lenient_test_model" not in list_models()


def test_model_factories_take_no_catch_all():
    for name in list_models():
        assert "deep_supervision" in model_spec(name).keys, name  # every model config sets it


# --- one name per model config ------------------------------------------------------------------------------------

def test_every_model_config_has_its_own_registered_name_and_run_folder():
    run_dirs = {}
    for option in MODEL_CONFIGS:
        cfg = compose_train([f"model={option}", "data=msd", "data.root=/data/Task04_Hippocampus"])
        assert cfg.model.name == option, f"model/{option}.yaml names itself {cfg.model.name!r}"
        run_dirs[option] = cfg.run_dir
    assert len(set(run_dirs.values())) == len(run_dirs), run_dirs
    assert run_dirs["unetr"].endswith("/unetr__dice_ce") and run_dirs["unetr_small"].endswith("/unetr_small__dice_ce")
    assert set(MODEL_CONFIGS) == set(list_models())


def test_every_loss_config_is_named_after_its_file():
    for option in LOSS_CONFIGS:
        assert compose_train([f"loss={option}"]).loss.name == option
    assert set(LOSS_CONFIGS) == set(list_losses())


# --- specs --------------------------------------------------------------------------------------------------------

def test_specs_declare_patch_multiples_and_adapt_patches():
    assert {n: model_spec(n).patch_multiple for n in list_models()} == {
        "resenc_unet": 1, "swin_unetr": 32, "umamba_bot": 1, "umamba_enc": 1, "unet": 1, "unetr": 16,
        "unetr_small": 16, "vilu_net": 1, "swin_unetr_control": 32, "umamba_bot_control": 1,
        "umamba_enc_control": 1, "unetr_control": 16, "unetr_small_control": 16, "vilu_net_control": 1}
    assert adapt_patch_for_model("swin_unetr", (40, 56, 40)) == [64, 64, 64]
    assert adapt_patch_for_model("unetr_small", [40, 56, 40]) == [48, 64, 48]
    patch = [40, 56, 40]
    assert adapt_patch_for_model("unet", patch) == patch and adapt_patch_for_model("unet", patch) is not patch
    # the transformer module's helpers still answer, from the registry
    assert patch_multiple("unetr_small") == PATCH_MULTIPLE["unetr"] and patch_multiple("not_a_model") == 1
    assert adapt_patch(patch, 16) == [48, 64, 48]


def test_spec_is_a_frozen_record():
    spec = model_spec("unetr")
    assert isinstance(spec, ModelSpec) and spec.deep_supervision and spec.base is None
    with pytest.raises(AttributeError):
        spec.patch_multiple = 1  # type: ignore[misc]


def test_unetr_small_is_a_preset_of_unetr_with_its_config_values():
    spec = model_spec("unetr_small")
    assert spec.base == "unetr" and spec.factory is model_spec("unetr").factory
    assert dict(spec.defaults) == UNETR_SMALL
    _, kwargs = model_kwargs(compose_train(["model=unetr_small"]))
    assert {k: kwargs[k] for k in UNETR_SMALL} == UNETR_SMALL
    # the preset's values apply without the config, and the config's win over them
    plan = tiny_plan(2, [32, 32])
    small = create_model("unetr_small", 2, 1, 2, plan=plan)
    assert small.net.vit.blocks[0].mlp.linear1.out_features == UNETR_SMALL["mlp_dim"]
    wider = create_model("unetr_small", 2, 1, 2, plan=plan, mlp_dim=256)
    assert wider.net.vit.blocks[0].mlp.linear1.out_features == 256


def _target(group: str, option: str) -> str:
    return str(OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml")._target_)


@pytest.mark.parametrize("option", MODEL_CONFIGS)
def test_default_optimizer_and_scheduler_are_those_the_model_config_selects(option):
    spec = model_spec(option)
    cfg = compose_train([f"model={option}"])
    assert spec.default_optimizer is not None and spec.default_scheduler is not None
    assert cfg.optimizer._target_ == _target("optimizer", spec.default_optimizer)
    assert cfg.scheduler._target_ == _target("scheduler", spec.default_scheduler)


def test_a_registered_preset_must_use_its_base_keys():
    with pytest.raises(ConfigError, match="unknown key 'hiden_size'"):
        model_registry.register_preset("bad_preset_test", "unetr", hiden_size=8)
    assert "bad_preset_test" not in list_models()


# --- every model config and every loss config, built as training builds them ------------------------------------

@pytest.fixture
def one_thread():
    # ~5 s of CPU in all; several threads on a loaded 2-core machine spin-wait it up to minutes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_model_and_loss_config_builds_runs_and_trains_one_step(one_thread):
    """Each model config (full size as shipped, on a 2D plan of 4-32 features) through the training path: patch
    adapted, model built from its config's keys, forward in training and eval, deep-supervised dice_ce loss, a
    backward pass; then every loss config on one model's outputs."""
    start = time.perf_counter()
    torch.manual_seed(0)
    outputs = None
    for option in MODEL_CONFIGS:
        model, loss_fn, config = build(compose_train([f"model={option}"]), tiny_plan(2, PATCH_2D))
        x = torch.randn(2, 1, *config.patch_size)
        y = torch.randint(0, 3, (2, 1, *config.patch_size))
        out = model.train()(x)
        assert isinstance(out, list) and len(out) == model.heads + 1, option
        loss = loss_fn(out, y)
        assert torch.isfinite(loss), option
        loss.backward()
        with torch.no_grad():
            assert model.eval()(x).shape == (2, 3, *config.patch_size), option
        if option == "unet":
            outputs, labels, cfg_plan = [o.detach() for o in out], y, config
    for option in LOSS_CONFIGS:
        _, loss_fn, _ = build(compose_train([f"loss={option}"]), cfg_plan)
        assert torch.isfinite(loss_fn(outputs, labels)), option
    assert isinstance(loss_fn, nn.Module)
    print(f"built and ran {len(MODEL_CONFIGS)} model and {len(LOSS_CONFIGS)} loss configs in "
          f"{time.perf_counter() - start:.1f} s")


def test_model_keys_can_be_checked_before_anything_is_built():
    from medseg.models import check_model_keys

    assert check_model_keys("unetr_small", {"deep_supervision": True, "hidden_size": 96}) is model_spec("unetr_small")
    with pytest.raises(ConfigError, match="model 'umamba_enc': unknown key 'mamba_max_token'"):
        check_model_keys("umamba_enc", {"mamba_max_token": 4})
