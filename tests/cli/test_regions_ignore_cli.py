"""Datasets in nnU-Net v2's raw layout with region-based labels (BraTS style, two channels, nested regions) and
with an ignore label covering most voxels (sparse annotation), through the CLIs: plan, train a few iterations,
predict, evaluate. Predicted values and geometry are checked exactly."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.conftest import write_nifti

SHAPE = (20, 24, 22)
AFFINE = np.array([[0.0, 0.0, 1.5, -12.0], [0.0, -1.1, 0.0, 30.0], [1.2, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def tumour_case(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Two channels and nested labels: 1 (edema) around 2 (core) around 3 (enhancing)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(np.float32)
    centre = np.array(SHAPE) / 2 + rng.uniform(-3, 3, 3)
    dist = np.linalg.norm(grid - centre, axis=-1)
    r = rng.uniform(6.5, 8.5)
    label = np.zeros(SHAPE, np.int16)
    label[dist < r] = 1
    label[dist < 0.65 * r] = 2
    label[dist < 0.35 * r] = 3
    t1 = rng.normal(100, 10, SHAPE) + 40 * (label == 3) + 15 * (label == 2)
    flair = rng.normal(80, 10, SHAPE) + 60 * (label >= 1)
    return [t1.astype(np.float32), flair.astype(np.float32)], label


def vessel_case(seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One channel with a bright tube (label 1) annotated on three slices only: everything else is ignore (2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    cy, cx = rng.integers(8, SHAPE[1] - 8), rng.integers(8, SHAPE[2] - 8)
    tube = np.broadcast_to((yy - cy) ** 2 + (xx - cx) ** 2 <= 9, SHAPE)
    image = rng.normal(50, 8, SHAPE) + 70 * tube
    label = np.full(SHAPE, 2, np.int16)
    for z in (4, 10, 16):
        label[z] = tube[z]
    return [image.astype(np.float32)], label


def make_raw(root: Path, make_case, num_cases: int, labels: dict, channels: dict, **extra) -> Path:
    for i in range(num_cases):
        images, label = make_case(i)
        for c, image in enumerate(images):
            write_nifti(root / "imagesTr" / f"case{i:02d}_{c:04d}.nii.gz", image, AFFINE)
        write_nifti(root / "labelsTr" / f"case{i:02d}.nii.gz", label, AFFINE)
    (root / "dataset.json").write_text(json.dumps({"channel_names": channels, "labels": labels,
                                                   "numTraining": num_cases, "file_ending": ".nii.gz", **extra}))
    return root


def _train_predict_evaluate(tmp_path: Path, root: Path, make_case, num_channels: int):
    """plan -> train fold 0 -> predict two new cases -> evaluate; returns (fold metrics, predictions and
    references as {case: (prediction, reference)}, evaluation summary)."""
    common = ["data=nnunet_raw", f"data.root={root}", "paths.output=outputs",
              "paths.preprocessed=outputs/preprocessed", "num_processes=1"]
    plan = _run("medseg-plan", *common, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    train = _run("medseg-train", *common, "debug=fast", "fold=0", "trainer.max_epochs=1",
                 "sampling.iterations_per_epoch=3", "callbacks.progress=plain", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = next((tmp_path / "outputs" / root.name).glob("unet__dice_ce*"))
    metrics = json.loads((run_dir / "fold_0" / "metrics.json").read_text())

    images, refs = tmp_path / "imagesTs", tmp_path / "labelsTs"
    for i in range(2):
        channels, label = make_case(100 + i)
        for c, image in enumerate(channels):
            write_nifti(images / f"new{i}_{c:04d}.nii.gz", image, AFFINE)
        write_nifti(refs / f"new{i}.nii.gz", label, AFFINE)
    preds = tmp_path / "preds"
    predict = _run("medseg-predict", f"ckpt_dir={run_dir}", f"input={images}", f"output={preds}", "device=cpu",
                   "save_probabilities=true", cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr[-3000:]
    pairs = {}
    for i in range(2):
        pred = nib.load(str(preds / f"new{i}.nii.gz"))
        ref = nib.load(str(refs / f"new{i}.nii.gz"))
        assert pred.shape == SHAPE and np.array_equal(pred.affine, ref.affine)  # the input's own grid
        pairs[f"new{i}"] = (np.asarray(pred.dataobj), np.asarray(ref.dataobj))
        probabilities = np.load(preds / f"new{i}_probabilities.npz")
        assert probabilities["probabilities"].shape[1:] == SHAPE[::-1]  # (channels, z, y, x) array order
    evaluate = _run("medseg-evaluate", f"pred={preds}", f"ref={refs}", f"labels={root / 'dataset.json'}",
                    "num_processes=1", cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    summary = json.loads((preds / "evaluation" / "summary.json").read_text())
    return metrics, pairs, summary, preds


def test_region_based_dataset_end_to_end(tmp_path):
    labels = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}
    root = make_raw(tmp_path / "raw" / "Dataset901_Tumour", tumour_case, 10, labels, {"0": "T1", "1": "FLAIR"},
                    regions_class_order=[1, 2, 3])
    metrics, pairs, summary, preds = _train_predict_evaluate(tmp_path, root, tumour_case, 2)
    regions = ["whole_tumor", "tumor_core", "enhancing_tumor"]
    assert list(metrics["dice"]) == regions and metrics["num_cases"] == 2
    for pred, _ in pairs.values():
        assert set(np.unique(pred).tolist()) <= {0, 1, 2, 3}
    # saved probabilities are one sigmoid per region, and the label map is what regions_class_order paints
    probs = np.load(preds / "new0_probabilities.npz")
    assert probs["probabilities"].shape[0] == 3 and probs["labels"].tolist() == [1, 2, 3]
    p = probs["probabilities"].astype(np.float32)
    painted = np.zeros(p.shape[1:], np.int16)
    for channel, value in zip(p, (1, 2, 3)):
        painted[channel > 0.5] = value
    pred0 = pairs["new0"][0].transpose(2, 1, 0)  # (z, y, x) array order, as the probabilities
    assert np.mean(painted == pred0) > 0.999  # float16 rounding may flip a voxel sitting at 0.5
    assert summary["classes"] == {"1": "whole_tumor", "2": "tumor_core", "3": "enhancing_tumor"}
    # post-processing is decided on the regions, from the fold's validation
    run_dir = next((tmp_path / "outputs" / root.name).glob("unet__dice_ce*"))
    decided = _run("medseg-postprocess", f"run_dir={run_dir}", cwd=tmp_path)
    assert decided.returncode == 0, decided.stderr[-3000:]
    spec = json.loads((run_dir / "postprocessing.json").read_text())
    assert set(spec["evidence"]["per_class"]) == set(regions)
    assert [e["label"] for e in spec["evidence"]["per_class"].values()] == [[1, 2, 3], [2, 3], [3]]
    # the evaluation's region Dice is computed from the label maps: check one case by hand
    pred, ref = pairs["new0"]
    wt_p, wt_r = pred >= 1, ref >= 1
    per_case = (preds / "evaluation" / "per_case.csv").read_text().splitlines()
    header, row = per_case[0].split(","), per_case[1].split(",")
    expected = 2 * (wt_p & wt_r).sum() / (wt_p.sum() + wt_r.sum())
    assert abs(float(row[header.index("dice_whole_tumor")]) - expected) < 1e-9


def test_ignore_label_dataset_end_to_end(tmp_path):
    labels = {"background": 0, "vessel": 1, "ignore": 2}
    root = make_raw(tmp_path / "raw" / "Dataset902_Sparse", vessel_case, 10, labels, {"0": "MRI"})
    metrics, pairs, summary, _ = _train_predict_evaluate(tmp_path, root, vessel_case, 1)
    assert list(metrics["dice"]) == ["vessel"]  # the ignore label is not a class
    for pred, ref in pairs.values():
        assert (ref == 2).mean() > 0.8  # most voxels are unannotated
        assert set(np.unique(pred).tolist()) <= {0, 1}  # and never predicted
    assert summary["classes"] == {"1": "vessel"} and summary["unscored_label_values"] == []
    # Dice counts annotated voxels only
    pred, ref = pairs["new0"]
    annotated = ref != 2
    p, r = (pred == 1) & annotated, (ref == 1) & annotated
    expected = 2 * (p & r).sum() / (p.sum() + r.sum()) if p.sum() + r.sum() else float("nan")
    per_case = (_ := (tmp_path / "preds" / "evaluation" / "per_case.csv").read_text().splitlines())
    header, row = per_case[0].split(","), per_case[1].split(",")
    got = float(row[header.index("dice_vessel")])
    assert (np.isnan(expected) and np.isnan(got)) or abs(got - expected) < 1e-9
