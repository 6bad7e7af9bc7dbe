"""The cascade's inputs: each case's previous-stage prediction comes from the 3d_lowres fold that held it out, lies
voxel for voxel on the cached 3d_fullres grid, becomes one-hot channels of the foreground labels, and a missing
fold is one error naming it and the command that makes it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import layout
from medseg.datasets.labels import LabelScheme, Region
from medseg.errors import ConfigError
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.preprocessing.cache import PreprocessedCache
from medseg.preprocessing.pipeline import case_grid, label_to_grid, preprocess_image
from medseg.preprocessing.previous_stage import (foreground_labels, num_input_channels, read_previous_stage,
                                                 with_previous_stage, write_previous_stage)
from medseg.training.cascade import (NextStageExport, check_grids, check_out_of_fold_files, next_stage_export,
                                     out_of_fold_files, previous_stage_run)
from medseg.training.settings import check_config
from tests.conftest import compose


def _plan() -> Plan:
    fullres = ConfigurationPlan(name="3d_fullres", spatial_dims=3, spacing=[1.6, 1.0, 0.9],
                                median_shape=[30, 24, 26], patch_size=[16, 16, 16], batch_size=2,
                                strides=[[1, 1, 1], [2, 2, 2]], kernel_sizes=[[3, 3, 3], [3, 3, 3]], features=[4, 8],
                                normalization=["zscore"], use_mask_for_norm=[False])
    lowres = dataclasses.replace(fullres, name="3d_lowres", spacing=[2.7, 1.7, 1.5], next_stage="3d_cascade_fullres")
    cascade = dataclasses.replace(fullres, name="3d_cascade_fullres", previous_stage="3d_lowres")
    return Plan("d", ["CT"], {0: "background", 1: "organ", 2: "lesion"}, [{}],
                {c.name: c for c in (lowres, fullres, cascade)}, transpose=[2, 0, 1])


def _case(seed: int):
    """(1, z, y, x) image with a zero border (cropped away), a label of two classes, anisotropic spacing whose
    coarse axis is the last array axis (the plan transposes it first)."""
    rng = np.random.default_rng(seed)
    shape = (22, 26, 20)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    label = np.zeros(shape, np.int16)
    label[np.linalg.norm(grid - (11, 13, 10) - rng.uniform(-2, 2, 3), axis=-1) < 6] = 1
    label[np.linalg.norm(grid - (12, 12, 9), axis=-1) < 2.5] = 2
    image = rng.normal(100, 10, shape) + 50 * label
    image[:3] = 0
    image[:, -2:] = 0
    return image[None].astype(np.float32), label, (0.9, 1.0, 1.6)


def test_a_label_map_on_the_input_grid_lands_exactly_on_the_preprocessed_grid():
    plan = _plan()
    image, label, spacing = _case(0)
    for name in ("3d_fullres", "3d_cascade_fullres", "3d_lowres"):
        config = plan.configuration(name)
        data, seg, props = preprocess_image(image, spacing, plan, config, "c", label)
        assert case_grid(image, spacing, plan, config, "c") == props  # the same box and shapes, nothing resampled
        assert np.array_equal(label_to_grid(label, props, plan, config), seg)
    # the crop box is the image's: properties of the lowres grid place a map on the fullres grid as well
    _, seg, props = preprocess_image(image, spacing, plan, plan.configuration("3d_fullres"), "c", label)
    lowres_props = case_grid(image, spacing, plan, plan.configuration("3d_lowres"))
    assert np.array_equal(label_to_grid(label, lowres_props, plan, plan.configuration("3d_fullres")), seg)
    assert props.box == [[0, 20], [3, 22], [0, 24]]  # transposed (x, z, y), the zero border cropped
    assert list(seg.shape) == props.shape_after_resample != lowres_props.shape_after_resample


def test_the_lowres_export_writes_the_map_on_the_cascade_grid(tmp_path):
    plan = _plan()
    image, label, spacing = _case(1)
    export = next_stage_export(plan, plan.configuration("3d_lowres"), tmp_path / "fold_0")
    assert isinstance(export, NextStageExport) and export.config.name == "3d_cascade_fullres"
    assert export.folder == tmp_path / "fold_0" / "predicted_next_stage" / "3d_cascade_fullres"
    export.write("c1", image, spacing, label)
    _, seg, _ = preprocess_image(image, spacing, plan, plan.configuration("3d_fullres"), "c1", label)
    written = read_previous_stage(export.path("c1"), mmap=False)
    assert written.dtype == np.int8 and np.array_equal(written, seg)
    assert next_stage_export(plan, plan.configuration("3d_fullres"), tmp_path) is None  # only stages with a next


def test_the_cascade_input_is_the_image_and_one_hot_foreground_channels():
    plan = _plan()
    image, label, spacing = _case(2)
    config = plan.configuration("3d_cascade_fullres")
    data, seg, props = preprocess_image(image, spacing, plan, config, "c", label)
    assert num_input_channels(plan, config) == 3 and num_input_channels(plan, plan.configuration("3d_fullres")) == 1
    previous = label.copy()
    previous[previous == 2] = 0  # a previous stage that missed the lesion
    out = with_previous_stage(torch.from_numpy(data), previous, props, plan, config)
    moved = label_to_grid(previous, props, plan, config)
    assert out.shape == (3, *data.shape[1:]) and torch.equal(out[0], torch.from_numpy(data[0]))
    assert torch.equal(out[1], torch.from_numpy(moved == 1).float()) and not out[2].any()


def test_foreground_labels_leave_out_background_and_ignore_and_follow_regions():
    assert foreground_labels(LabelScheme({0: "background", 1: "a", 2: "b", 3: "ignore"})) == [1, 2]
    regions = LabelScheme({0: "background", 1: "label_1", 2: "label_2", 3: "label_3"},
                          (Region("wt", (1, 2, 3)), Region("tc", (2, 3)), Region("et", (3,))), (1, 2, 3))
    assert foreground_labels(regions) == [1, 2, 3]  # nnU-Net's foreground labels, not the regions


# ---- out of fold ---------------------------------------------------------------------------------------------

CASE_FOLDS = {"a": 0, "b": 1, "c": 0, "d": 1}


def _lowres_fold(run: Path, fold: int, cases: list[str], finished: bool = True) -> None:
    fold_dir = layout.fold_dir(run, fold)
    for case in cases:
        write_previous_stage(layout.next_stage_file(fold_dir, "3d_cascade_fullres", case),
                             np.full((2, 2, 2), fold, np.int8))
    if finished:
        (fold_dir / layout.VALIDATION).mkdir(parents=True, exist_ok=True)
        (fold_dir / layout.VALIDATION / layout.PER_CASE).write_text("case_id\n")
        (fold_dir / layout.METRICS).write_text("{}")


def test_each_case_comes_from_the_fold_that_held_it_out(tmp_path):
    run = tmp_path / "unet__dice_ce__3d_lowres"
    _lowres_fold(run, 0, ["a", "c", "b"])  # "b" also here: fold 0 trained on it, so it must not be used
    _lowres_fold(run, 1, ["b", "d"])
    files = check_out_of_fold_files(run, "3d_lowres", "3d_cascade_fullres", 0, CASE_FOLDS)
    assert files == out_of_fold_files(run, "3d_cascade_fullres", CASE_FOLDS)
    assert {c: p.parents[2].name for c, p in files.items()} == {"a": "fold_0", "b": "fold_1", "c": "fold_0",
                                                               "d": "fold_1"}
    assert {c: int(read_previous_stage(p)[0, 0, 0]) for c, p in files.items()} == CASE_FOLDS


def test_a_missing_lowres_fold_is_one_error_naming_it_and_the_command(tmp_path):
    run = tmp_path / "unet__dice_ce__3d_lowres"
    _lowres_fold(run, 0, ["a", "c"])
    with pytest.raises(ConfigError) as e:
        check_out_of_fold_files(run, "3d_lowres", "3d_cascade_fullres", 0, CASE_FOLDS)
    missing = run / "fold_1" / "predicted_next_stage" / "3d_cascade_fullres" / "b.npy"
    assert str(e.value) == (
        f"3d_cascade_fullres fold 0 trains on the out-of-fold predictions of the 3d_lowres run {run}, and 3d_lowres "
        f"fold(s) [1] have not made them ({missing} missing and 1 more); make them with medseg-train "
        "configuration=3d_lowres fold=1 (with this command's data, model and loss options), or name another "
        "3d_lowres run with cascade.previous_stage_run=<run folder>")
    assert "\n" not in str(e.value)


def test_an_unfinished_lowres_fold_counts_as_missing(tmp_path):
    run = tmp_path / "lowres"
    _lowres_fold(run, 0, ["a", "c"])
    _lowres_fold(run, 1, ["b", "d"], finished=False)  # its files may be from weights still being trained
    with pytest.raises(ConfigError, match=r"fold\(s\) \[1\] have not made them"):
        check_out_of_fold_files(run, "3d_lowres", "3d_cascade_fullres", "all", CASE_FOLDS)
    with pytest.raises(ConfigError, match=r"fold\(s\) \[0, 1\] .* fold=0 and medseg-train configuration=3d_lowres "
                                          r"fold=1 "):
        check_out_of_fold_files(tmp_path / "nothing", "3d_lowres", "3d_cascade_fullres", 0, CASE_FOLDS)


def test_a_map_of_another_grid_is_refused(tmp_path):
    cache = PreprocessedCache(tmp_path / "3d_fullres")
    cache.folder.mkdir()
    np.save(cache.paths("a")["image"], np.zeros((1, 3, 2, 2), np.float32))
    np.save(cache.paths("a")["label"], np.zeros((3, 2, 2), np.int8))
    path = tmp_path / "a.npy"
    write_previous_stage(path, np.zeros((2, 2, 2), np.int8))
    with pytest.raises(ConfigError, match=r"a.npy: shape \[2, 2, 2\], but the preprocessed case a is \[3, 2, 2\] "
                                          r".* medseg-train configuration=3d_lowres fold=0 overwrite=true"):
        check_grids({"a": path}, cache, "3d_lowres", {"a": 0})
    write_previous_stage(path, np.zeros((3, 2, 2), np.int8))
    check_grids({"a": path}, cache, "3d_lowres", {"a": 0})


# ---- which lowres run ------------------------------------------------------------------------------------------

def test_the_lowres_run_is_the_same_model_and_loss_by_default_or_the_configured_one(tmp_path):
    cfg = compose("train", ["configuration=3d_cascade_fullres", f"paths.output={tmp_path}", "model=resenc_unet"])
    check_config(cfg)
    assert Path(str(cfg.run_dir)).name == "resenc_unet__dice_ce__3d_cascade_fullres"
    assert previous_stage_run(cfg, "3d_lowres") == Path(str(cfg.run_dir)).with_name("resenc_unet__dice_ce__3d_lowres")
    given = compose("train", ["configuration=3d_cascade_fullres", f"cascade.previous_stage_run={tmp_path / 'x'}"])
    assert previous_stage_run(given, "3d_lowres") == tmp_path / "x"
    fixed = compose("train", ["configuration=3d_cascade_fullres", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="cascade.previous_stage_run"):
        previous_stage_run(fixed, "3d_lowres")


@pytest.mark.parametrize("override, message", [
    ("+cascade.previous_run=x", "cascade: unknown key(s) ['previous_run']; accepted: ['previous_stage_run']"),
    ("augmentation.run_on=device", "augmentation.run_on=device: 3d_cascade_fullres augments its previous-stage"),
])
def test_cascade_settings_are_checked_before_any_data_work(override, message):
    with pytest.raises(ConfigError) as e:
        check_config(compose("train", ["configuration=3d_cascade_fullres", override]))
    assert message in str(e.value)


def test_the_record_of_the_previous_stage_is_relative_to_the_cascade_run(tmp_path):
    from medseg.training.cascade import previous_stage_record

    record = previous_stage_record(tmp_path / "exp" / "unet__dice_ce__3d_lowres", "3d_lowres",
                                   tmp_path / "exp" / "unet__dice_ce__3d_cascade_fullres", CASE_FOLDS)
    assert record == {"configuration": "3d_lowres", "run": "../unet__dice_ce__3d_lowres", "folds": [0, 1]}
    assert json.loads(json.dumps(record)) == record
