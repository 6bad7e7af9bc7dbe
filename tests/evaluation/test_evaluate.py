"""medseg-evaluate and the metrics behind it: values in mm against known answers, empty-mask conventions,
input errors, and the metrics reaching validation and the cross-validation summary."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.atomic import number
from medseg.datasets.io import read_label, write_label
from medseg.datasets.manifest import Case, Manifest
from medseg.errors import MedsegError
from medseg.evaluation.cv_summary import summarize_experiment
from medseg.evaluation.evaluate import evaluate_folders, format_table
from medseg.evaluation.leaderboard import build_leaderboard, leaderboard_markdown
from medseg.evaluation.metrics import case_metrics, summarize, write_case_csv
from medseg.training.validation import validate_fold

# file (i, j, k) spacing 0.5 x 0.5 x 2 mm: the arrays medseg reads are (z, y, x), spacing (2, 0.5, 0.5)
AFFINE = np.diag([0.5, 0.5, 2.0, 1.0])
SPACING_ZYX = (2.0, 0.5, 0.5)


def _save(path: Path, label: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(path))
    return path


def _cube(shape=(30, 30, 30), start=(5, 5, 5), size=10, value=1) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[tuple(slice(s, s + size) for s in start)] = value
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _numpy_dice(pred: np.ndarray, ref: np.ndarray, c: int) -> float:
    p, r = pred == c, ref == c
    return 2 * np.logical_and(p, r).sum() / (p.sum() + r.sum())


def test_cli_dice_equals_numpy_and_writes_csv_summary_and_table(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for i in range(3):
        ref = np.zeros((16, 18, 12), np.uint8)
        ref[2:10, 3:14, 2:9] = 1
        ref[9:15, 5:12, 6:11] = 2
        pred = ref.copy()
        noise = rng.random(ref.shape) < 0.1
        pred[noise] = rng.integers(0, 3, noise.sum())
        _save(tmp_path / "ref" / f"case{i}.nii.gz", ref)
        # file axes (i, j, k) are the reversed array axes medseg reads; Dice does not care
        expected[f"case{i}"] = {c: _numpy_dice(pred, ref, c) for c in (1, 2)}
        if i == 2:  # a prediction in another format on the same grid is paired and accepted
            label, geometry = read_label(_save(tmp_path / "tmp" / "case2.nii.gz", pred))
            write_label(label, geometry, tmp_path / "pred" / "case2.nrrd")
        else:
            _save(tmp_path / "pred" / f"case{i}.nii.gz", pred)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    exe = Path(sys.executable).with_name("medseg-evaluate")
    result = subprocess.run([str(exe), f"pred={tmp_path / 'pred'}", f"ref={tmp_path / 'ref'}",
                             f"labels={tmp_path / 'dataset.json'}", f"paths.output={tmp_path / 'outputs'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(tmp_path / "pred" / "evaluation" / "per_case.csv")
    assert [r["case_id"] for r in rows] == ["case0", "case1", "case2"]
    assert list(rows[0]) == ["case_id", "dice_a", "dice_b", "hd95_a", "hd95_b", "nsd_a", "nsd_b"]
    for row in rows:
        for c, name in ((1, "a"), (2, "b")):
            assert math.isclose(float(row[f"dice_{name}"]), expected[row["case_id"]][c], rel_tol=1e-9)
    summary = json.loads((tmp_path / "pred" / "evaluation" / "summary.json").read_text())
    assert math.isclose(summary["dice"]["a"], np.mean([e[1] for e in expected.values()]))
    assert summary["num_cases"] == 3 and summary["per_class"]["b"]["hd95"]["n"] == 3
    assert "| a |" in result.stdout and "| mean over classes |" in result.stdout


def test_hd95_is_in_millimetres_on_anisotropic_offset_cubes(tmp_path):
    ref = _cube(value=1) + _cube(start=(5, 5, 18), size=8, value=2)
    pred = np.zeros_like(ref)
    pred[_cube(start=(5, 5, 8)) > 0] = 1  # class 1 shifted 3 voxels along k (2 mm): 6 mm
    pred[_cube(start=(7, 5, 18), size=8) > 0] = 2  # class 2 shifted 2 voxels along i (0.5 mm): 1 mm
    _save(tmp_path / "ref" / "c.nii.gz", ref)
    _save(tmp_path / "pred" / "c.nii.gz", pred)
    (row,), summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", num_processes=1)
    # a fifth of each cube's edge voxels (one face) lies exactly at the full offset, so the 95th percentile is it
    assert row["hd95_1"] == pytest.approx(6.0, abs=1e-5)
    assert row["hd95_2"] == pytest.approx(1.0, abs=1e-5)
    assert summary["hd95"] == {"1": pytest.approx(6.0, abs=1e-5), "2": pytest.approx(1.0, abs=1e-5)}


def test_surface_dice_is_one_for_identical_masks_and_grows_with_tolerance():
    ref = _cube()
    same = case_metrics(ref, ref, {1: "a"}, SPACING_ZYX, tolerance_mm=0.0)
    assert same == {"dice_a": 1.0, "hd95_a": 0.0, "nsd_a": 1.0}
    shifted = _cube(start=(8, 5, 5))  # 3 voxels along the 2 mm axis: the surfaces are at most 6 mm apart
    nsd = {t: case_metrics(shifted, ref, {1: "a"}, SPACING_ZYX, tolerance_mm=t)["nsd_a"] for t in (0, 2, 4, 5.9, 6)}
    assert 0.5 < nsd[0] < nsd[2] < nsd[4] < nsd[6], nsd
    assert nsd[5.9] < 1.0 and nsd[6] == pytest.approx(1.0), nsd  # the far faces lie exactly 6 mm apart
    # tolerance per class, by name; far-apart masks score 0 but still have a distance
    far = _cube(start=(20, 5, 5), size=5)
    scores = case_metrics(shifted, ref, {1: "a"}, SPACING_ZYX, tolerance_mm={"a": 6.0})
    assert scores["nsd_a"] == pytest.approx(1.0)
    apart = case_metrics(far, _cube(size=5), {1: "a"}, SPACING_ZYX)
    assert apart["dice_a"] == 0.0 and apart["nsd_a"] == 0.0 and apart["hd95_a"] == pytest.approx(30.0)


def test_absent_and_one_sided_classes_follow_the_conventions():
    ref, pred = _cube(value=1), _cube(value=1)
    ref[0:3, 0:3, 0:3] = 2  # class 2 only in the reference (missed)
    pred[25:28, 25:28, 25:28] = 3  # class 3 only in the prediction (false positive); class 4 nowhere
    names = {1: "a", 2: "b", 3: "c", 4: "d"}
    row = case_metrics(pred, ref, names, SPACING_ZYX)
    for name in ("b", "c"):
        assert row[f"dice_{name}"] == 0.0 and row[f"nsd_{name}"] == 0.0 and math.isnan(row[f"hd95_{name}"])
    assert all(math.isnan(row[f"{m}_d"]) for m in ("dice", "hd95", "nsd"))
    summary = summarize([row, case_metrics(ref, ref, names, SPACING_ZYX)], names)
    assert summary["dice"]["b"] == 0.5 and summary["hd95"]["b"] == 0.0 and summary["per_class"]["b"]["hd95"]["n"] == 1
    assert summary["per_class"]["b"]["cases"] == {"in_both": 1, "in_one_only": 1, "in_neither": 0}
    assert summary["per_class"]["d"]["cases"] == {"in_both": 0, "in_one_only": 0, "in_neither": 2}
    assert math.isnan(summary["dice"]["d"]) and summary["dice_mean"] == pytest.approx(np.mean([1.0, 0.5, 0.0]))


def test_default_classes_come_from_the_references_and_nan_is_null_in_json(tmp_path):
    ref, pred = _cube(value=1), _cube(value=1)
    pred[0:2, 0:2, 0:2] = 7  # never in a reference: not scored, but reported
    _save(tmp_path / "ref" / "c.nii.gz", ref)
    _save(tmp_path / "pred" / "c.nii.gz", pred)
    ref2 = np.zeros_like(ref)
    ref2[1:4, 1:4, 1:4] = 2
    _save(tmp_path / "ref" / "d.nii.gz", ref2)
    _save(tmp_path / "pred" / "d.nii.gz", np.zeros_like(ref))
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", num_processes=2, output=tmp_path / "ev")
    assert [k for k in rows[0] if k.startswith("dice_")] == ["dice_1", "dice_2"]
    assert math.isnan(rows[0]["dice_2"]) and rows[1]["dice_2"] == 0.0
    assert summary["unscored_label_values"] == [7]
    on_disk = _strict_json(tmp_path / "ev" / "summary.json")
    assert on_disk["per_class"]["2"]["hd95"] == {"mean": None, "std": None, "n": 0}
    # the table from the summary read back shows what the one computed in memory shows
    assert format_table(on_disk) == format_table(summary) and "n/a" in format_table(on_disk)


def test_nnunet_dataset_json_names_the_classes(tmp_path):
    _save(tmp_path / "ref" / "c.nii.gz", _cube(value=2))
    _save(tmp_path / "pred" / "c.nii.gz", _cube(value=2))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
    (row,), _ = evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels=tmp_path, num_processes=1)
    assert row["dice_tumour"] == 1.0 and math.isnan(row["dice_liver"])
    with pytest.raises(MedsegError, match="unknown classes"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels=tmp_path, tolerance_mm={"tumor": 2.0})


@pytest.mark.parametrize("problem", ["shape", "spacing", "origin"])
def test_a_grid_mismatch_names_the_file(tmp_path, problem):
    _save(tmp_path / "ref" / "good.nii.gz", _cube())
    _save(tmp_path / "pred" / "good.nii.gz", _cube())
    _save(tmp_path / "ref" / "bad.nii.gz", _cube())
    affine = AFFINE.copy()
    if problem == "spacing":
        affine[2, 2] = 2.5
    elif problem == "origin":
        affine[:3, 3] = (0.0, 1.0, 0.0)
    _save(tmp_path / "pred" / "bad.nii.gz", _cube(shape=(30, 30, 31)) if problem == "shape" else _cube(), affine)
    with pytest.raises(MedsegError, match=rf"pred/bad\.nii\.gz: {problem}"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", num_processes=2)
    assert not (tmp_path / "pred" / "evaluation").exists()


def test_unmatched_cases_are_listed_before_anything_is_computed(tmp_path):
    for case in ("a", "b", "c"):
        _save(tmp_path / "ref" / f"{case}.nii.gz", _cube())
    for case in ("a", "c", "extra"):
        _save(tmp_path / "pred" / f"{case}.nii.gz", _cube())
    with pytest.raises(MedsegError) as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    message = str(err.value)
    assert "1 reference case(s) without a prediction" in message and ": b" in message
    assert "1 prediction(s) without a reference" in message and ": extra" in message
    assert not (tmp_path / "pred" / "evaluation").exists()
    with pytest.raises(MedsegError, match="inside the reference folder"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", output=tmp_path / "ref" / "scores")


class _ReferencePredictor:
    """Stands in for a trained model: predicts the reference with a one-voxel-thick slab removed."""

    def __init__(self, label: np.ndarray):
        self.label = label

    def predict_label(self, image, spacing):
        out = self.label.copy()
        out[:, :, 5] = 0
        return out


def test_validation_rows_and_metrics_carry_all_three_metrics(tmp_path):
    ref = _cube(value=1)
    ref[20:25, 20:25, 20:25] = 2
    image = _save(tmp_path / "img.nii.gz", ref.astype(np.float32) * 10)
    label = _save(tmp_path / "lab.nii.gz", ref)
    reference, _ = read_label(label)
    manifest = Manifest("m", ["MRI"], {0: "background", 1: "a", 2: "b"}, [Case("c0", [str(image)], str(label), 0)])
    metrics = validate_fold(_ReferencePredictor(reference), manifest, ["c0"], tmp_path / "fold_0", 0, progress=False)
    (row,) = _read_csv(tmp_path / "fold_0" / "validation" / "per_case.csv")
    assert list(row) == ["case_id", "fold", "dice_a", "dice_b", "hd95_a", "hd95_b", "nsd_a", "nsd_b"]
    assert float(row["dice_b"]) == 1.0 and 0 < float(row["dice_a"]) < 1 and float(row["hd95_a"]) > 0
    saved = json.loads((tmp_path / "fold_0" / "metrics.json").read_text())
    assert set(saved["dice"]) == {"a", "b"} and saved["num_cases"] == 1 and "dice_mean" in saved
    assert set(saved["hd95"]) == {"a", "b"} and saved["nsd_mean"] == metrics["nsd_mean"]


def _strict_json(path: Path):
    """Parse as jq, JavaScript or Go would: a bare NaN or Infinity is an error."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


class _Misses:
    """Predicts the reference without class 2: class b is never predicted (HD95 undefined in every case)."""

    def __init__(self, label: np.ndarray):
        self.label = label

    def predict_label(self, image, spacing):
        return np.where(self.label == 2, 0, self.label)


def test_metrics_json_of_a_class_never_predicted_is_strict_and_summaries_still_say_nan(tmp_path):
    ref = _cube(value=1)
    ref[20:25, 20:25, 20:25] = 2
    image = _save(tmp_path / "img.nii.gz", ref.astype(np.float32) * 10)
    label = _save(tmp_path / "lab.nii.gz", ref)
    reference, _ = read_label(label)
    # class c is in no mask at all: Dice, HD95 and NSD undefined
    manifest = Manifest("m", ["MRI"], {0: "background", 1: "a", 2: "b", 3: "c"},
                        [Case("c0", [str(image)], str(label), 0)])
    run = tmp_path / "exp" / "unet__dice_ce"
    metrics = validate_fold(_Misses(reference), manifest, ["c0"], run / "fold_0", 0, progress=False,
                            extra={"timing": {"peak_gpu_memory_gb": None, "train_s": 10.0}})
    assert math.isnan(metrics["hd95"]["b"]) and math.isnan(metrics["dice"]["c"])  # in memory: NaN as before
    saved = _strict_json(run / "fold_0" / "metrics.json")
    assert saved["hd95"]["b"] is None and saved["dice"]["c"] is None and saved["dice"]["b"] == 0.0
    assert saved["per_class"]["b"]["hd95"] == {"mean": None, "std": None, "n": 0}
    assert math.isnan(number(saved["hd95"]["b"])) and number(saved["dice_mean"]) == metrics["dice_mean"]
    table = summarize_experiment(tmp_path / "exp")
    assert "| unet__dice_ce | all | hd95_b | nan | nan | 0 |" in table
    assert "| unet__dice_ce | all | dice_c | nan | nan | 0 |" in table
    board = build_leaderboard(tmp_path / "exp")
    (row,) = board.rows
    assert math.isnan(row["hd95_b"]) and row["train_h_total"] == pytest.approx(10 / 3600)
    assert row["peak_gpu_memory_gb"] is None
    assert "| `unet__dice_ce` | 1.0000 ± 0.0000 | 0.0000 ± 0.0000 | - |" in leaderboard_markdown(board)


def test_cv_summary_reports_every_metric_and_its_mean_over_classes(tmp_path):
    run = tmp_path / "exp" / "unet__dice_ce"
    for fold in range(2):
        rows = [{"case_id": f"c{fold}{i}", "fold": fold, **case_metrics(_cube(start=(5 + i, 5, 5)), _cube(),
                                                                       {1: "a"}, SPACING_ZYX)} for i in range(2)]
        write_case_csv(rows, run / f"fold_{fold}" / "validation" / "per_case.csv")
        (run / f"fold_{fold}" / "metrics.json").write_text("{}")
    # a fold validated before HD95 and NSD existed has only Dice columns; it still counts for Dice
    write_case_csv([{"case_id": "old", "fold": 2, "dice_a": 0.5}], run / "fold_2" / "validation" / "per_case.csv")
    (run / "fold_2" / "metrics.json").write_text("{}")
    table = summarize_experiment(tmp_path / "exp")
    for metric in ("dice_a", "dice_mean", "hd95_a", "hd95_mean", "nsd_a", "nsd_mean"):
        assert f"| unet__dice_ce | all | {metric} |" in table and f"| unet__dice_ce | fold_1 | {metric} |" in table
    assert "| unet__dice_ce | all | dice_a | 0.8600 |" in table  # (1 + 0.9) * 2 folds and the old 0.5, over 5
    assert "| unet__dice_ce | fold_0 | hd95_a | 1.0000 | 1.0000 | 2 |" in table


def test_regions_per_label_and_ignore_from_an_nnunet_dataset_json(tmp_path):
    """Regions are scored from the label maps (whole = {1, 2}, inner = {2}); per_label adds each value; reference
    voxels holding the ignore label (3) count in no class."""
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[3:5, 3:5, 3:5] = 2
    ref[:, :, 7] = 3  # unannotated
    pred = ref.copy()
    pred[:, :, 7] = 1  # whatever is predicted there is not scored
    pred[3:5, 3:5, 3:5] = 1  # the inner region missed
    _save(tmp_path / "ref" / "a.nii.gz", ref)
    _save(tmp_path / "pred" / "a.nii.gz", pred)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "whole": [1, 2], "inner": [2], "ignore": 3}, "regions_class_order": [1, 2]}))
    rows, summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels=tmp_path / "dataset.json",
                                     num_processes=1, per_label=True)
    assert summary["classes"] == {"1": "whole", "2": "inner", "3": "label_1", "4": "label_2"}
    assert rows[0]["dice_whole"] == 1.0 and rows[0]["dice_inner"] == 0.0 and rows[0]["dice_label_2"] == 0.0
    # label 1: predicted 64 voxels (56 + the 8 of the inner cube), reference 56, overlap 56
    assert rows[0]["dice_label_1"] == pytest.approx(2 * 56 / (64 + 56))
    assert summary["unscored_label_values"] == []
    with pytest.raises(MedsegError, match="per_label=true needs labels="):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", num_processes=1, per_label=True)
