"""Keep-largest-component post-processing: the operation, nnU-Net's decision rule, its file, the CLI and
the candidates validation writes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.evaluation.metrics import write_case_csv
from medseg.evaluation.postprocessing import CANDIDATES_FILE, candidate_rows, decide, decide_for_run
from medseg.inference.postprocessing import (PostprocessingSpec, apply_postprocessing, keep_largest_component,
                                             load_postprocessing, save_postprocessing)

LABELS = {0: "background", 1: "liver", 2: "tumor"}


def _blob(shape, lo, hi, value, out=None):
    out = np.zeros(shape, np.int16) if out is None else out
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


def _organ_with_tumor():
    """Liver (1) with a tumour (2) touching it, a spurious liver island and a spurious tumour island."""
    label = _blob((20, 24, 24), (2, 2, 2), (12, 14, 14), 1)
    _blob(None, (5, 14, 5), (9, 17, 9), 2, label)     # tumour, touching the liver
    _blob(None, (16, 20, 20), (18, 22, 22), 1, label)  # far liver island (8 voxels)
    _blob(None, (16, 2, 20), (17, 3, 21), 2, label)    # far tumour island (1 voxel)
    return label


def test_per_class_keeps_each_classes_largest_component_and_leaves_background_alone():
    label = _organ_with_tumor()
    out = keep_largest_component(label, classes=[1])
    assert out[16:18, 20:22, 20:22].max() == 0  # liver island gone
    assert out[16, 2, 20] == 2  # other class untouched
    assert (out[label == 0] == 0).all() and out.dtype == label.dtype
    assert np.count_nonzero(out == 1) == 10 * 12 * 12 and (out[label != 1] == label[label != 1]).all()
    out = keep_largest_component(label)  # every class present
    assert out[16, 2, 20] == 0 and out[16:18, 20:22, 20:22].max() == 0
    assert np.count_nonzero(out == 2) == 4 * 3 * 4
    assert np.count_nonzero(label == 1) == 10 * 12 * 12 + 8  # input not modified


def test_two_blobs_of_one_class_keep_the_bigger():
    label = _blob((10, 30, 30), (1, 1, 1), (4, 4, 4), 1)
    _blob(None, (1, 10, 10), (8, 20, 20), 1, label)
    out = keep_largest_component(label, classes=[1])
    assert np.count_nonzero(out) == 7 * 10 * 10 and out[2, 2, 2] == 0
    # foreground reaching every border (no crop to make): the same, and the input stays as it was
    label[0, 0, 0] = label[-1, -1, -1] = 1
    out = keep_largest_component(label, all_foreground=True)
    assert np.count_nonzero(out) == 7 * 10 * 10 and np.count_nonzero(label) == 7 * 10 * 10 + 27 + 2


def test_all_foreground_keeps_touching_classes_together_and_drops_far_islands():
    label = _organ_with_tumor()
    out = keep_largest_component(label, all_foreground=True)
    assert np.count_nonzero(out == 2) == 4 * 3 * 4  # tumour touches the liver: same component
    assert out[16, 2, 20] == 0 and out[16:18, 20:22, 20:22].max() == 0
    with pytest.raises(ValueError):
        keep_largest_component(label, classes=[1], all_foreground=True)


def test_full_connectivity_joins_voxels_touching_at_a_corner():
    label = np.zeros((4, 4, 4), np.uint8)
    label[0, 0, 0] = label[1, 1, 1] = label[2, 2, 2] = 1  # a diagonal line: one component
    label[3, 3, 0] = 1
    out = keep_largest_component(label, classes=[1])
    assert out.sum() == 3 and out[3, 3, 0] == 0


def test_empty_and_absent_classes_pass_through():
    label = np.zeros((3, 4, 5), np.uint8)
    assert (keep_largest_component(label, all_foreground=True) == 0).all()
    assert (keep_largest_component(label, classes=[1, 2]) == 0).all()


def test_apply_postprocessing_runs_all_foreground_then_per_class():
    label = _organ_with_tumor()
    assert (apply_postprocessing(label, PostprocessingSpec(False, [])) == label).all()
    out = apply_postprocessing(label, PostprocessingSpec(all_foreground=True, classes=[2]))
    assert (out == keep_largest_component(label, all_foreground=True)).all()
    out = apply_postprocessing(label, PostprocessingSpec(all_foreground=False, classes=[2]))
    assert out[16, 2, 20] == 0 and out[16:18, 20:22, 20:22].min() == 1


# ---- decisions --------------------------------------------------------------------------------------------

def _reference():
    return _blob((20, 24, 24), (2, 2, 2), (12, 14, 14), 1, _blob((20, 24, 24), (5, 14, 5), (9, 17, 9), 2))


def test_candidate_rows_score_each_candidate():
    row = candidate_rows("case_a", _organ_with_tumor(), _reference(), LABELS)
    assert row["case_id"] == "case_a"
    assert row["none_dice_liver"] < row["allfg_dice_liver"] == row["lcc_dice_liver"] == 1.0
    assert row["none_dice_tumor"] < row["allfg_dice_tumor"] == row["allfg_lcc_dice_tumor"] == 1.0
    assert set(row) == {"case_id"} | {f"{c}_dice_{n}" for c in ("none", "allfg", "lcc", "allfg_lcc")
                                      for n in ("liver", "tumor")}


def test_decide_turns_all_foreground_on_when_islands_are_spurious():
    rows = [candidate_rows(f"c{i}", _organ_with_tumor(), _reference(), LABELS) for i in range(3)]
    spec, evidence = decide(rows, LABELS)
    assert spec.all_foreground
    # on top of the all-foreground step nothing is left for the per-class step: a tie, so off
    assert spec.classes == []
    assert evidence["num_cases"] == 3 and evidence["all_foreground"]["classes_worse"] == []
    fg = evidence["all_foreground"]
    assert fg["foreground_mean_after"] > fg["foreground_mean_before"]
    assert evidence["per_class"]["liver"] == {"label": 1, "before": 1.0, "after": 1.0, "enabled": False}


def test_decide_keeps_all_foreground_off_when_a_class_has_two_true_parts():
    # the tumour truly has a second, separate part: the all-foreground step drops it; removing a large
    # spurious liver island raises the foreground mean all the same, so only the veto keeps the step off
    reference = _blob(None, (16, 2, 2), (18, 4, 4), 2, _reference())
    pred = _blob(None, (14, 16, 16), (20, 23, 23), 1, reference.copy())
    row = candidate_rows("c", pred, reference, LABELS)
    assert row["allfg_dice_tumor"] < row["none_dice_tumor"] and row["allfg_dice_liver"] > row["none_dice_liver"]
    spec, evidence = decide([row], LABELS)
    fg = evidence["all_foreground"]
    assert fg["foreground_mean_after"] > fg["foreground_mean_before"]
    assert not spec.all_foreground and fg["classes_worse"] == ["tumor"]
    # per class, on the raw prediction: the liver island is spurious (on), the tumour's parts are not (off)
    assert spec.classes == [1]


def test_decide_uses_strict_improvement_and_skips_nans():
    nan = float("nan")
    rows = [{"none_dice_liver": 0.9, "allfg_dice_liver": 0.9, "lcc_dice_liver": 0.9, "allfg_lcc_dice_liver": 0.9,
             "none_dice_tumor": 0.5, "allfg_dice_tumor": 0.5, "lcc_dice_tumor": 0.6, "allfg_lcc_dice_tumor": 0.6},
            {"none_dice_liver": 0.8, "allfg_dice_liver": 0.8, "lcc_dice_liver": 0.8, "allfg_lcc_dice_liver": 0.8,
             "none_dice_tumor": nan, "allfg_dice_tumor": nan, "lcc_dice_tumor": nan, "allfg_lcc_dice_tumor": nan}]
    spec, evidence = decide(rows, LABELS)
    assert spec == PostprocessingSpec(all_foreground=False, classes=[2])
    assert evidence["per_class"]["tumor"]["before"] == 0.5 and evidence["per_class"]["tumor"]["after"] == 0.6
    # CSV rows hold strings
    spec_str, _ = decide([{k: str(v) for k, v in r.items()} for r in rows], LABELS)
    assert spec_str == spec


def test_json_round_trip(tmp_path):
    assert load_postprocessing(tmp_path) is None
    spec = PostprocessingSpec(all_foreground=True, classes=[2, 3])
    evidence = {"num_cases": 4, "per_class": {"tumor": {"before": 0.5, "after": None}}}
    path = save_postprocessing(tmp_path, spec, evidence)
    assert load_postprocessing(tmp_path) == spec
    assert json.loads(path.read_text())["evidence"] == evidence
    assert PostprocessingSpec.from_dict(spec.to_dict()) == spec
    path.write_text("{}")
    with pytest.raises(MedsegError):
        load_postprocessing(tmp_path)


# ---- a run directory and the CLI -----------------------------------------------------------------------------

def _fake_run(root: Path, folds: dict[int, list[dict]], finished=True) -> Path:
    run_dir = root / "exp" / "unet__dice_ce"
    for fold, rows in folds.items():
        fold_dir = run_dir / f"fold_{fold}"
        write_case_csv(rows, fold_dir / "validation" / CANDIDATES_FILE)
        (fold_dir / "plan.json").write_text(json.dumps({"labels": {str(k): v for k, v in LABELS.items()}}))
        if finished:
            (fold_dir / "metrics.json").write_text("{}")
    return run_dir


def _cli(monkeypatch, tmp_path, run_dir: Path) -> int:
    """medseg-postprocess in this process (a subprocess would spend most of the test importing torch)."""
    from medseg.cli.postprocess import main

    monkeypatch.setattr(sys, "argv", ["medseg-postprocess", f"run_dir={run_dir}", f"paths.output={tmp_path / 'out'}"])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_cli_decides_from_every_finished_fold(tmp_path, monkeypatch, capsys):
    spurious = [candidate_rows(f"a{i}", _organ_with_tumor(), _reference(), LABELS) for i in range(2)]
    clean = [candidate_rows(f"b{i}", _reference(), _reference(), LABELS) for i in range(2)]
    run_dir = _fake_run(tmp_path, {0: spurious, 1: clean})
    _fake_run(tmp_path, {2: spurious}, finished=False)  # a fold still training: not read
    assert _cli(monkeypatch, tmp_path, run_dir) == 0
    saved = json.loads((run_dir / "postprocessing.json").read_text())
    assert saved["all_foreground"] is True and saved["classes"] == []
    assert saved["evidence"]["num_cases"] == 4 and saved["evidence"]["folds"] == ["fold_0", "fold_1"]
    assert load_postprocessing(run_dir) == PostprocessingSpec(True, [])
    out = capsys.readouterr().out
    assert "keep largest foreground component: on" in out and "| per class | tumor |" in out


def test_cli_refuses_without_candidates(tmp_path, monkeypatch, capsys):
    run_dir = _fake_run(tmp_path, {0: []}, finished=False)  # unfinished fold: not read
    with pytest.raises(MedsegError, match="no finished fold"):
        decide_for_run(run_dir)
    assert _cli(monkeypatch, tmp_path, run_dir) == 2
    assert "no finished fold" in capsys.readouterr().err
    assert not (run_dir / "postprocessing.json").exists()


# ---- validation writes the candidates ---------------------------------------------------------------------

class _IslandPredictor:
    """Predicts the reference plus a one-voxel island of label 1 in a corner."""

    def __init__(self, manifest):
        self.manifest = manifest
        self.calls = 0

    def predict_label(self, image, spacing):
        from medseg.datasets.io import read_label

        case = self.manifest.cases[self.calls]
        self.calls += 1
        label, _ = read_label(case.label)
        label = label.copy()
        label[0, 0, 0] = 1
        return label


def test_validate_fold_writes_postprocessing_candidates(synthetic_root, tmp_path):
    import csv

    from medseg.datasets.adapters import build_manifest
    from medseg.training.validation import validate_fold

    manifest = build_manifest("msd", root=str(synthetic_root))
    case_ids = [c.case_id for c in manifest.cases[:2]]
    validate_fold(_IslandPredictor(manifest), manifest, case_ids, tmp_path / "fold_0", 0, progress=False)
    with open(tmp_path / "fold_0" / "validation" / CANDIDATES_FILE) as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == case_ids
    for r in rows:
        assert float(r["none_dice_outer"]) < 1.0 and float(r["lcc_dice_outer"]) == 1.0
        assert float(r["none_dice_inner"]) == float(r["allfg_dice_inner"]) == 1.0


def test_regions_are_post_processed_as_regions():
    """nnU-Net's region-based post-processing: a region's largest component is kept over all its values, and a
    stray blob of an inner label outside the tumour is removed from every region holding it."""
    ref = np.zeros((20, 20, 20), np.int16)
    ref[4:12, 4:12, 4:12] = 1
    ref[6:10, 6:10, 6:10] = 2  # core inside the whole tumour
    pred = ref.copy()
    pred[15:18, 15:18, 15:18] = 2  # a stray core blob far away: wrong for both regions
    members = {1: (1, 2), 2: (2,)}
    names = {1: "whole", 2: "core"}
    rows = [candidate_rows(f"c{i}", pred, ref, names, None, members) for i in range(2)]
    assert rows[0]["none_dice_whole"] < 1.0 and rows[0]["lcc_dice_whole"] == 1.0
    assert rows[0]["lcc_dice_core"] == 1.0
    spec, evidence = decide(rows, names, members)
    assert spec.all_foreground  # one component over all foreground already removes the blob
    assert PostprocessingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # per region: the whole-tumour region keeps its largest component across labels 1 and 2
    cleaned = apply_postprocessing(pred, PostprocessingSpec(classes=[[1, 2]]))
    assert np.array_equal(cleaned, ref)
    # a region spec keeps a region's component even where its values differ: label 1 and 2 touch, one component
    assert np.array_equal(keep_largest_component(ref, [[1, 2]]), ref)
    # the one-value region (core) alone also removes the blob, as label 2's own step does
    assert np.array_equal(keep_largest_component(pred, [[2]]), keep_largest_component(pred, [2]))
