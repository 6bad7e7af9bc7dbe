"""nnU-Net's cascade through the CLIs: plan -> 3d_lowres folds 0 and 1 -> 3d_cascade_fullres fold 0 -> predict ->
evaluate, on a CT-like set in nnU-Net's raw layout that plans 3d_lowres.

What makes the small images plan a cascade: planner.gpu_memory_gb=0.002 (with debug=fast's 4 base features) shrinks
the 3d_fullres patch to 16^3, under 25% of the median image (~37x36x32 after cropping), and the 3d_lowres stage found
by coarsening the spacing differs from it by more than 2x in voxels. data.num_folds=2, so lowres folds 0 and 1 predict
every case out of fold. Predicted values and geometry are checked exactly; the cascade's inputs against the lowres
validation predictions, and the CLI's prediction against the two stages chained by hand.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import write_nifti

DATASET = "Dataset950_CascadeCT"
SHAPE = (40, 36, 32)
# the coarse axis (1.6 mm) is the first voxel axis: the plan transposes it first
AFFINE = np.array([[0.0, 0.0, 1.0, -30.0], [0.0, -0.9, 0.0, 20.0], [1.6, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
LOWRES_RUN = "unet__dice_ce__3d_lowres"
CASCADE_RUN = "unet__dice_ce__3d_cascade_fullres"


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name(tool)
    # one thread: on a loaded 2-core machine torch's thread pool spins against itself (30x slower here)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def ct_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Air (-1000) around a body, an organ (1) with a lesion (2) in it; the first slices are outside the field of
    view (0) and cropped away."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(np.float32)
    centre = np.array(SHAPE) / 2 + rng.uniform(-2, 2, 3)
    body = np.linalg.norm((grid - centre) / (np.array(SHAPE) * 0.42), axis=-1) < 1
    organ_centre = centre + rng.uniform(-2, 2, 3)
    organ = np.linalg.norm((grid - organ_centre) / np.array([8.0, 7.0, 6.0]), axis=-1) < 1
    lesion = np.linalg.norm(grid - organ_centre - rng.uniform(-1.5, 1.5, 3), axis=-1) < rng.uniform(2.5, 3.2)
    label = np.zeros(SHAPE, np.int16)
    label[organ] = 1
    label[organ & lesion] = 2
    image = np.where(body, rng.normal(10, 15, SHAPE), -1000.0)
    image[label == 1] += 60
    image[label == 2] += 130
    image[:3] = 0
    return image.astype(np.float32), label


def make_raw(root: Path, num_cases: int) -> Path:
    for i in range(num_cases):
        image, label = ct_case(i)
        write_nifti(root / "imagesTr" / f"ct{i:02d}_0000.nii.gz", image, AFFINE)
        write_nifti(root / "labelsTr" / f"ct{i:02d}.nii.gz", label, AFFINE)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": num_cases, "file_ending": ".nii.gz"}))
    return root


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    work = tmp_path_factory.mktemp("cascade")
    root = make_raw(work / "raw" / DATASET, 4)
    common = ["data=nnunet_raw", f"data.root={root}", "data.num_folds=2", "paths.output=outputs",
              "paths.preprocessed=outputs/preprocessed", "num_processes=1", "planner.gpu_memory_gb=0.002"]
    train = [*common, "debug=fast", "trainer.max_epochs=1", "sampling.iterations_per_epoch=2",
             "callbacks.progress=plain"]
    steps = {"plan": _run("medseg-plan", *common, "planner.base_features=4", "preprocess=[3d_lowres,3d_fullres]",
                          cwd=work)}
    steps["lowres0"] = _run("medseg-train", *train, "configuration=3d_lowres", "fold=0", cwd=work)
    steps["cascade_early"] = _run("medseg-train", *train, "configuration=3d_cascade_fullres", "fold=0", cwd=work)
    steps["lowres1"] = _run("medseg-train", *train, "configuration=3d_lowres", "fold=1", cwd=work)
    steps["cascade"] = _run("medseg-train", *train, "configuration=3d_cascade_fullres", "fold=0", cwd=work)
    images, refs = work / "imagesTs", work / "labelsTs"
    for i in range(2):
        image, label = ct_case(100 + i)
        write_nifti(images / f"new{i}_0000.nii.gz", image, AFFINE)
        write_nifti(refs / f"new{i}.nii.gz", label, AFFINE)
    out = work / "outputs" / DATASET
    steps["predict"] = _run("medseg-predict", f"ckpt_dir={out / CASCADE_RUN}", f"input={images}",
                            f"output={work / 'preds'}", "device=cpu", "mirror_axes=null", cwd=work)
    steps["evaluate"] = _run("medseg-evaluate", f"pred={work / 'preds'}", f"ref={refs}",
                             f"labels={root / 'dataset.json'}", "num_processes=1", cwd=work)
    return work, out, steps, train


def _ok(steps, name):
    result = steps[name]
    assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"


def test_the_plan_has_a_lowres_stage_and_a_cascade(cascade):
    work, _, steps, _ = cascade
    _ok(steps, "plan")
    plan = json.loads((work / "outputs" / "preprocessed" / DATASET / "plans.json").read_text())
    configs = plan["configurations"]
    assert configs["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
    assert configs["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
    assert configs["3d_fullres"]["patch_size"] == [16, 16, 16] and plan["transpose"] == [2, 0, 1]


def test_each_lowres_fold_writes_its_held_out_cases_on_the_fullres_grid(cascade):
    from medseg.datasets.io import read_image, read_label
    from medseg.planning.plan import Plan
    from medseg.preprocessing.pipeline import case_grid, label_to_grid

    work, out, steps, _ = cascade
    _ok(steps, "lowres0")
    _ok(steps, "lowres1")
    pre = work / "outputs" / "preprocessed" / DATASET
    manifest = json.loads((pre / "manifest.json").read_text())
    plan = Plan.load(pre / "plans.json")
    fullres = plan.configuration("3d_cascade_fullres")
    for fold in (0, 1):
        held_out = sorted(c["case_id"] for c in manifest["cases"] if c["fold"] == fold)
        folder = out / LOWRES_RUN / f"fold_{fold}" / "predicted_next_stage" / "3d_cascade_fullres"
        assert sorted(p.stem for p in folder.glob("*.npy")) == held_out and len(held_out) == 2
        for case in held_out:
            written = np.load(folder / f"{case}.npy")
            assert written.shape == np.load(pre / "3d_fullres" / f"{case}_seg.npy").shape  # the cached grid
            # the fold's validation prediction (input geometry), moved as preprocessing moves a label
            image, geometry = read_image([work / "raw" / DATASET / "imagesTr" / f"{case}_0000.nii.gz"])
            prediction, _ = read_label(out / LOWRES_RUN / f"fold_{fold}" / "validation" / f"{case}.nii.gz")
            expected = label_to_grid(prediction, case_grid(image, geometry.spacing, plan, fullres), plan, fullres)
            assert np.array_equal(written, expected)


def test_the_cascade_before_every_lowres_fold_is_one_error_naming_the_missing_fold(cascade):
    work, out, steps, _ = cascade
    early = steps["cascade_early"]
    assert early.returncode == 2
    errors = [line for line in early.stderr.splitlines() if line.startswith("medseg: error:")]
    assert len(errors) == 1, early.stderr[-3000:]
    assert (f"3d_cascade_fullres fold 0 trains on the out-of-fold predictions of the 3d_lowres run "
            f"outputs/{DATASET}/{LOWRES_RUN}, and 3d_lowres fold(s) [1] have not made them ") in errors[0]
    assert "make them with medseg-train configuration=3d_lowres fold=1 " in errors[0]
    assert "Traceback" not in early.stderr


def test_the_cascade_trains_on_the_image_and_the_lowres_classes(cascade):
    work, out, steps, _ = cascade
    _ok(steps, "cascade")
    fold = out / CASCADE_RUN / "fold_0"
    record = json.loads((fold / "run.json").read_text())
    assert record["configuration"] == "3d_cascade_fullres" and record["augment_on_device"] is False
    assert record["previous_stage"] == {"configuration": "3d_lowres", "run": f"../{LOWRES_RUN}", "folds": [0, 1]}
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["num_cases"] == 2 and list(metrics["dice"]) == ["organ", "lesion"]
    ckpt = torch.load(fold / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    first_conv = next(v for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.ndim == 5)
    assert first_conv.shape[1] == 3  # CT + one-hot organ and lesion
    assert ckpt["medseg"]["previous_stage"] == record["previous_stage"]
    # the cascade trained on 3d_fullres's preprocessed data: no folder of its own
    assert not (work / "outputs" / "preprocessed" / DATASET / "3d_cascade_fullres").exists()


def test_predict_runs_the_lowres_stage_first_by_itself(cascade):
    from medseg.inference.cascade import previous_stage_predictor
    from medseg.inference.predictor import Predictor, find_checkpoints, load_checkpoint

    work, out, steps, _ = cascade
    _ok(steps, "predict")
    summary = json.loads((work / "preds" / "prediction_summary.json").read_text())
    assert summary["previous_stage"] == [str(out / LOWRES_RUN / f"fold_{k}" / "checkpoints" / "last.ckpt")
                                         for k in (0, 1)]
    cpu = torch.device("cpu")
    models = [load_checkpoint(p, cpu) for p in find_checkpoints(out / CASCADE_RUN)]
    lowres = previous_stage_predictor(models, "last", 0.5, None, 1, cpu)
    by_hand = Predictor(models, 0.5, None, 1, cpu, previous_stage=lowres)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLIs above (OMP_NUM_THREADS=1): a loaded 2-core machine
    try:
        _compare_with_the_cli(work, by_hand)
    finally:
        torch.set_num_threads(threads)


def _compare_with_the_cli(work, by_hand):
    for i in range(2):
        written = nib.load(str(work / "preds" / f"new{i}.nii.gz"))
        source = nib.load(str(work / "imagesTs" / f"new{i}_0000.nii.gz"))
        assert written.shape == SHAPE and np.array_equal(written.affine, source.affine)  # the input's own grid
        values = np.asarray(written.dataobj)
        assert set(np.unique(values).tolist()) <= {0, 1, 2}
        image = np.asarray(source.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]  # medseg's array order
        spacing = tuple(np.linalg.norm(AFFINE[:3, :3], axis=0))[::-1]
        assert np.array_equal(by_hand.predict_label(image, spacing).transpose(2, 1, 0), values)


def test_a_missing_lowres_fold_at_prediction_is_one_error_naming_it(cascade):
    work, out, _, _ = cascade
    checkpoint = out / LOWRES_RUN / "fold_1" / "checkpoints" / "last.ckpt"
    aside = checkpoint.with_name("last.ckpt.aside")
    checkpoint.rename(aside)
    try:
        result = _run("medseg-predict", f"ckpt_dir={out / CASCADE_RUN}", f"input={work / 'imagesTs'}",
                      f"output={work / 'preds_missing'}", "device=cpu", cwd=work)
    finally:
        aside.rename(checkpoint)
    assert result.returncode == 2
    assert (f"medseg: error: {out / LOWRES_RUN}: 3d_lowres fold(s) [1] have no checkpoint "
            f"({out / LOWRES_RUN / 'fold_1' / 'checkpoints' / 'last.ckpt'} missing)") in result.stderr
    assert "medseg-train configuration=3d_lowres fold=1" in result.stderr
    assert not list((work / "preds_missing").glob("*.nii.gz"))


def test_evaluate_scores_the_cascade_prediction(cascade):
    work, _, steps, _ = cascade
    _ok(steps, "evaluate")
    summary = json.loads((work / "preds" / "evaluation" / "summary.json").read_text())
    assert summary["classes"] == {"1": "organ", "2": "lesion"}
    pred = np.asarray(nib.load(str(work / "preds" / "new0.nii.gz")).dataobj)
    ref = np.asarray(nib.load(str(work / "labelsTs" / "new0.nii.gz")).dataobj)
    per_case = (work / "preds" / "evaluation" / "per_case.csv").read_text().splitlines()
    header, row = per_case[0].split(","), per_case[1].split(",")
    p, r = pred == 1, ref == 1
    expected = 2 * (p & r).sum() / (p.sum() + r.sum())
    assert abs(float(row[header.index("dice_organ")]) - expected) < 1e-9


def test_a_finished_lowres_fold_run_again_writes_missing_next_stage_files(cascade):
    work, out, _, train = cascade
    folder = out / LOWRES_RUN / "fold_1" / "predicted_next_stage" / "3d_cascade_fullres"
    removed = sorted(folder.glob("*.npy"))[0]
    before = np.load(removed)
    removed.unlink()  # as for a fold validated before cascades were written
    again = _run("medseg-train", *train, "configuration=3d_lowres", "fold=1", cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "wrote the 3d_cascade_fullres predictions of 1 held-out case(s)" in again.stdout + again.stderr
    assert np.array_equal(np.load(removed), before)  # from the weights the fold validated with
