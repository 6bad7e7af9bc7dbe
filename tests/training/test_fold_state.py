"""A fold's state decided from its run record: finished folds are reused only with the settings they were trained
with, impossible folds and bad overrides fail before any data work, fold=all trains on every case, and an
interrupted final validation continues where it stopped."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medseg.errors import ConfigError, DatasetError
from medseg.layout import RUN_RECORD
from medseg.record import Component, RunRecord
from medseg.training.run import train_fold
from tests.conftest import compose


def _overrides(root, *extra):
    return ["debug=fast", f"paths.data={root / 'data'}", f"paths.output={root / 'out'}",
            f"paths.preprocessed={root / 'pre'}", "callbacks.progress=plain", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold_state")
    metrics = train_fold(compose("train", _overrides(root)))
    (fold_dir,) = (root / "out").glob("*/*/fold_0")
    return root, fold_dir, metrics


def test_a_finished_fold_with_the_same_settings_is_not_trained_again(finished):
    root, fold_dir, metrics = finished
    last = fold_dir / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    again = train_fold(compose("train", _overrides(root)))
    assert again["dice"] == metrics["dice"] and last.stat().st_mtime_ns == before
    record = RunRecord.load(fold_dir / RUN_RECORD)
    assert record.fold == 0 and record.model.name == "unet" and record.loss.name == "dice_ce"
    # every "decided elsewhere" is decided in the record: batch Dice from the plan, workers, precision, mirroring
    assert record.loss.kwargs["batch_dice"] in (True, False) and record.num_workers == 0
    assert record.precision == "32-true" and record.validation["mirror_axes"] == []  # debug=fast: no mirroring
    assert record.num_train_cases + record.num_val_cases == 24 and record.num_val_cases == metrics["num_cases"]


@pytest.mark.parametrize("override, listed", [("optimizer.lr=0.02", "optimizer.kwargs.lr: 0.01 -> 0.02"),
                                               ("sampling.batch_size=3", "batch_size: 2 -> 3"),
                                               ("++augmentation.p_rotation=0", "augmentation.p_rotation: 0.2 -> 0")])
def test_a_finished_fold_is_refused_with_other_settings_and_the_differences_listed(finished, override, listed):
    root, fold_dir, _ = finished
    last = fold_dir / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    with pytest.raises(ConfigError) as e:
        train_fold(compose("train", _overrides(root, override)))
    assert listed in str(e.value) and "overwrite=true" in str(e.value)
    assert last.stat().st_mtime_ns == before  # nothing touched


def test_more_epochs_on_a_finished_fold_needs_extend(finished):
    root, _, metrics = finished
    with pytest.raises(ConfigError, match="extend=true"):
        train_fold(compose("train", _overrides(root, f"trainer.max_epochs={metrics['epochs'] + 1}")))


def _nothing_written(root):
    return not (root / "pre").exists() and not (root / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("+trainer.max_epoch=2", "trainer: unknown key(s) ['max_epoch']"),
    ("+optimizer.lrr=0.1", "optimizer:"),
    ("fold=minus", "fold='minus'"),
    ("configuration=3d_cascade", "cannot be trained"),
    ("+cascade.previous_stage=x", "cascade: unknown key(s) ['previous_stage']"),
])
def test_bad_overrides_fail_before_any_data_work(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        train_fold(compose("train", _overrides(tmp_path, override)))
    assert message in str(e.value)
    assert _nothing_written(tmp_path)


def test_an_impossible_fold_fails_before_fingerprinting(tmp_path):
    with pytest.raises(DatasetError, match="fold 7 does not exist"):
        train_fold(compose("train", _overrides(tmp_path, "fold=7")))
    assert not (tmp_path / "pre").exists() or not any((tmp_path / "pre").rglob("fingerprint.json"))
    assert not (tmp_path / "out").exists()


def test_fold_all_trains_on_every_case_and_holds_none_out(tmp_path):
    from medseg.inference.predictor import find_checkpoints

    metrics = train_fold(compose("train", _overrides(tmp_path, "fold=all")))
    (fold_dir,) = (tmp_path / "out").glob("*/*/fold_all")
    assert metrics["fold"] == "all" and metrics["held_out"] == 0 and metrics["epochs"] == 2
    record = RunRecord.load(fold_dir / RUN_RECORD)
    assert record.fold == "all" and record.num_val_cases == 0 and record.num_train_cases == 24
    assert (fold_dir / "checkpoints" / "last.ckpt").is_file() and not (fold_dir / "checkpoints" / "best.ckpt").exists()
    # a run with no cross-validation folds predicts with its fold_all model
    assert find_checkpoints(fold_dir.parent) == [fold_dir / "checkpoints" / "last.ckpt"]
    # and re-running it is a no-op, as for any finished fold
    assert train_fold(compose("train", _overrides(tmp_path, "fold=all")))["held_out"] == 0


def test_record_differences_name_nested_keys_and_ignore_speed_only_settings():
    base = dict(fold=0, configuration="3d_fullres", dataset="d", num_train_cases=4, num_val_cases=1,
                model=Component("unet", {"deep_supervision": True}), loss=Component("dice_ce", {"batch_dice": False}),
                optimizer=Component("torch.optim.SGD", {"lr": 0.01}), scheduler=None, spatial_dims=3,
                patch_size=[8, 8, 8], batch_size=2, oversample_foreground=0.33, iterations_per_epoch=4, max_epochs=2,
                seed=1, precision="32-true", accelerator="cpu", devices=1, gradient_clip_val=12.0,
                augmentation={"mirror_axes": [0, 1, 2]}, augment_on_device=False, num_workers=0, plan_key="k",
                validation={"overlap": 0.5})
    a = RunRecord(**base)
    b = RunRecord(**{**base, "num_workers": 8, "augment_on_device": True, "devices": 2,
                     "model": Component("unet", {"deep_supervision": False}), "patch_size": [16, 8, 8]})
    assert a.differences(b) == ["model.kwargs.deep_supervision: True -> False", "patch_size: [8, 8, 8] -> [16, 8, 8]"]
    assert RunRecord.from_dict(json.loads(json.dumps(a.to_dict()))) == a


class _CountingPredictor:
    """Predicts the reference label; counts the cases it was asked for and can fail after ``fail_after``."""

    def __init__(self, manifest, fail_after=None):
        from medseg.datasets.io import read_label

        self.labels = {c.case_id: read_label(c.label)[0] for c in manifest.cases}
        self.calls, self.fail_after, self.models = [], fail_after, []

    def predict_label(self, image, spacing):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt("stopped")
        case = self.pending.pop(0)
        self.calls.append(case)
        return self.labels[case]


def test_an_interrupted_final_validation_continues_where_it_stopped(tmp_path, synthetic_root):
    from medseg.datasets.adapters import build_manifest
    from medseg.training.validation import JOURNAL, validate_fold

    manifest = build_manifest("msd", root=str(synthetic_root))
    cases = [c.case_id for c in manifest.cases[:4]]
    fold_dir = tmp_path / "fold_0"
    first = _CountingPredictor(manifest, fail_after=2)
    first.pending = list(cases)
    with pytest.raises(KeyboardInterrupt):
        validate_fold(first, manifest, cases, fold_dir, 0, progress=False)
    assert (fold_dir / "validation" / JOURNAL).is_file() and not (fold_dir / "metrics.json").exists()
    second = _CountingPredictor(manifest)
    second.pending = cases[2:]
    metrics = validate_fold(second, manifest, cases, fold_dir, 0, progress=False)
    assert first.calls == cases[:2] and second.calls == cases[2:]  # nothing predicted twice
    assert metrics["num_cases"] == 4 and all(math.isclose(d, 1.0) for d in metrics["dice"].values())
    rows = (fold_dir / "validation" / "per_case.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == cases
    assert not (fold_dir / "validation" / JOURNAL).exists()
    assert np.isfinite(metrics["dice_mean"])
