"""planner.plan_like: a dataset planned with a trained run's network, on its own spacing and statistics."""

from __future__ import annotations

import dataclasses

import pytest

from medseg.errors import ConfigError
from medseg.planning.plan_like import TOPOLOGY
from medseg.preprocessing.prepare import prepare
from tests.conftest import compose
from tests.training.hippocampus_variants import make_variant, paths


def test_plan_like_takes_the_source_network_and_keeps_the_datasets_spacing(tmp_path):
    source_data = make_variant(tmp_path, "Source")
    other = make_variant(tmp_path, "Other", channels=2)
    plan_cfg = ["data=nnunet_raw"] + paths(tmp_path)
    source = prepare(compose("plan", plan_cfg + [f"data.root={source_data}", "planner.base_features=4",
                                                 "planner.patch_size=[32,32,16]"])).plan
    # a source trained at another spacing: the new dataset keeps its own
    for name, config in source.configurations.items():
        source.configurations[name] = dataclasses.replace(config, spacing=[2.0] * config.spatial_dims)
    fold = tmp_path / "run" / "fold_0"
    fold.mkdir(parents=True)
    source.save(fold / "plan.json")

    own = prepare(compose("plan", plan_cfg + [f"data.root={other}"])).plan
    liked = prepare(compose("plan", plan_cfg + [f"data.root={other}", f"planner.plan_like={tmp_path / 'run'}"])).plan
    assert set(liked.configurations) == set(own.configurations) == {"2d", "3d_fullres"}
    for name, config in liked.configurations.items():
        for key in TOPOLOGY:
            assert getattr(config, key) == getattr(source.configurations[name], key), (name, key)
        assert config.spacing == own.configurations[name].spacing != source.configurations[name].spacing
        assert config.median_shape == own.configurations[name].median_shape
        assert config.normalization == ["zscore", "zscore"]  # 2 channels here, 1 in the source: its own
    assert own.configurations["3d_fullres"].features[0] == 32 and own.configurations["3d_fullres"].patch_size != \
        liked.configurations["3d_fullres"].patch_size
    assert any(line.startswith("plan_like: 3d_fullres takes the network of ") for line in liked.explanations)
    assert any("has 2 channels" in line and "own normalisation" in line for line in liked.explanations)
    assert liked.overridden[-1] == f"plan_like ({fold / 'plan.json'})"


def test_plan_like_names_what_it_cannot_read(tmp_path):
    from medseg.planning.plan_like import read_source_plan

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        read_source_plan(tmp_path / "empty")
    assert str(e.value) == (f"planner.plan_like={tmp_path / 'empty'}: no plan.json in it or in its fold_* folders "
                            "(expected a medseg run or fold folder)")
