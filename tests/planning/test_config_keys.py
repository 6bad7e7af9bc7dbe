"""Planner settings and dataset adapters refuse keys they do not take, on the path preparation reads them."""

from __future__ import annotations

import pytest

from medseg.datasets.adapters import build_manifest
from medseg.errors import ConfigError
from medseg.planning.planner import PlannerSettings
from medseg.preprocessing.prepare import load_manifest
from tests.training_path import compose_train


def test_a_misspelled_planner_key_stops_the_run():
    cfg = compose_train(["+planner.patch_sise=[16,16,16]"])
    with pytest.raises(ConfigError) as e:
        PlannerSettings.from_config(cfg.planner)  # as medseg.preprocessing.prepare.prepare reads it
    message = str(e.value)
    assert "planner settings: unknown key 'patch_sise' (did you mean 'patch_size'?)" in message
    assert "config group 'planner'" in message and "batch_size" in message


def test_every_planner_config_holds_only_settings():
    for preset in ("default", "resenc_m", "resenc_l"):
        assert PlannerSettings.from_config(compose_train([f"planner={preset}"]).planner).preset == preset


def test_a_misspelled_data_key_stops_the_run_before_any_file_is_read(tmp_path):
    cfg = compose_train(["data=msd", f"data.root={tmp_path / 'absent'}", "+data.alow_outside_root=true"])
    with pytest.raises(ConfigError) as e:
        load_manifest(cfg.data, tmp_path / "preprocessed")
    message = str(e.value)
    assert "dataset adapter 'msd': unknown key 'alow_outside_root' (did you mean 'allow_outside_root'?)" in message
    assert "config group 'data'" in message


def test_adapters_take_the_data_config_keys_they_are_given(tmp_path):
    with pytest.raises(ConfigError, match="dataset adapter 'nnunet_raw': unknown key 'allow_outside_root'"):
        build_manifest("nnunet_raw", root=str(tmp_path), allow_outside_root=True)


def test_every_data_config_holds_only_keys_its_adapter_takes():
    from pathlib import Path

    from medseg.cli.common import CONFIG_DIR
    from medseg.datasets.adapters import SHARED_DATA_KEYS, adapter_keys

    for path in sorted((Path(CONFIG_DIR) / "data").glob("*.yaml")):
        data = compose_train([f"data={path.stem}"]).data
        # as load_manifest hands them over: adapter selects, synthetic generates the data beforehand
        keys = set(data.keys()) - {"adapter", "synthetic"}
        assert keys <= set(adapter_keys(data.adapter)) | set(SHARED_DATA_KEYS), (path.name, keys)
