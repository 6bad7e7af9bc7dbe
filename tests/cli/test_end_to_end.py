"""The README's main job on real data, shortened: plan, train (loss must fall), predict in input geometry."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medseg.inference.predictor import find_checkpoints
from medseg.inference.probability_files import read_probabilities

SUBSET = 30  # cases of Hippocampus used: enough for 5 folds, quick on 2 cores


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def hippo_subset(hippocampus, tmp_path_factory):
    """A manifest over the first cases of the real data, read in place."""
    manifest = json.loads((Path(__file__).parents[2] / "data_manifests" / "Task04_Hippocampus.json").read_text())
    manifest["cases"] = manifest["cases"][:SUBSET]
    for i, case in enumerate(manifest["cases"]):
        case["fold"] = i % 5
    path = tmp_path_factory.mktemp("manifests") / "hippo_subset.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def trained_run(hippocampus, hippo_subset, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    args = ["data=manifest", f"data.path={hippo_subset}", f"data.root={hippocampus}", "debug=fast", "fold=0",
            "trainer.max_epochs=4", "sampling.iterations_per_epoch=6", "callbacks.progress=plain",
            "paths.output=outputs", "paths.preprocessed=outputs/preprocessed"]
    result = _run("medseg-train", *args, cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    (work / "train_console.txt").write_text(result.stdout + result.stderr)  # what the person saw
    return work, work / "outputs" / "hippo_subset" / "unet__dice_ce", args


def test_training_console_says_each_thing_once_and_where_the_results_are(trained_run):
    work, run_dir, _ = trained_run
    seen = (work / "train_console.txt").read_text()
    assert seen.count("GPU available") == 1 and seen.count("`Trainer.fit` stopped") == 1, seen[-3000:]
    assert "💡" not in seen and "litlogger" not in seen
    assert f"run folder: {run_dir.absolute()}" in seen
    assert f"metrics: {(run_dir / 'fold_0' / 'metrics.json').absolute()} (mean Dice " in seen


def test_training_writes_metrics_checkpoints_and_logs_and_loss_falls(trained_run):
    work, run_dir, _ = trained_run
    fold = run_dir / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["num_cases"] == SUBSET // 5
    assert set(metrics["dice"]) == {"Anterior", "Posterior"}
    assert 0.0 <= metrics["dice_mean"] <= 1.0
    assert (fold / "checkpoints" / "last.ckpt").is_file() and (fold / "checkpoints" / "best.ckpt").is_file()
    assert len(list((fold / "validation").glob("*.nii.gz"))) == SUBSET // 5
    assert (fold / "plan.json").is_file() and (fold / "config.yaml").is_file()
    # the command line's overrides, from which medseg-select writes the fold=all command
    assert yaml.safe_load((fold / "overrides.yaml").read_text()) == trained_run[2]
    events = EventAccumulator(str(fold / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss_epoch")]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.05, losses
    # the plan travels in the checkpoint, loadable without unpickling arbitrary objects
    ckpt = torch.load(fold / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["medseg"]["plan"]["configurations"]["3d_fullres"]["patch_size"] == [40, 56, 40]


def test_rerunning_a_finished_fold_does_nothing(trained_run):
    work, run_dir, args = trained_run
    ckpt = run_dir / "fold_0" / "checkpoints" / "last.ckpt"
    stamp = ckpt.stat().st_mtime_ns
    result = _run("medseg-train", *args, cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to do" in result.stderr + result.stdout
    assert ckpt.stat().st_mtime_ns == stamp
    # asking a finished fold for its held-out probabilities (for medseg-select) writes them and changes nothing else
    validation = run_dir / "fold_0" / "validation"
    metrics = (run_dir / "fold_0" / "metrics.json").read_bytes()
    assert not list(validation.glob("*_probabilities.npz"))
    result = _run("medseg-train", *args, "validation.save_probabilities=true", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(validation.glob("*_probabilities.npz"))
    assert len(files) == SUBSET // 5
    assert (run_dir / "fold_0" / "metrics.json").read_bytes() == metrics and ckpt.stat().st_mtime_ns == stamp
    probabilities = read_probabilities(files[0])
    label = np.asarray(nib.load(validation / files[0].name.replace("_probabilities.npz", ".nii.gz")).dataobj)
    agree = probabilities.labels[probabilities.values.argmax(0)] == label.transpose(2, 1, 0)
    assert agree.mean() > 0.999  # the validation's label map, up to float16 ties


def test_predict_writes_input_geometry_and_never_into_the_input(trained_run, hippocampus, tmp_path):
    work, run_dir, _ = trained_run
    inputs = tmp_path / "scans"
    inputs.mkdir()
    held_out = ["hippocampus_387", "hippocampus_389", "hippocampus_390"]  # beyond the training subset
    for case in held_out:
        shutil.copy(hippocampus / "imagesTr" / f"{case}.nii.gz", inputs)
    # a reoriented copy (flipped voxel order, same world positions): output on its own grid and affine
    img = nib.load(str(inputs / "hippocampus_387.nii.gz"))
    flipped = nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ np.array(
        [[-1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), img.header)
    nib.save(flipped, str(inputs / "flipped_387.nii.gz"))
    before = sorted(p.name for p in inputs.iterdir())
    out = tmp_path / "preds"
    result = _run("medseg-predict", f"ckpt_dir={run_dir}", f"input={inputs}", f"output={out}",
                  "paths.output=outputs", cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in inputs.iterdir()) == before
    for name in before:
        src, pred = nib.load(str(inputs / name)), nib.load(str(out / name))
        assert pred.shape == src.shape
        np.testing.assert_array_equal(pred.affine, src.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    # a second run skips the finished cases and leaves them untouched
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _run("medseg-predict", f"ckpt_dir={run_dir}", f"input={inputs}", f"output={out}",
                 "paths.output=outputs", cwd=work)
    assert again.returncode == 0 and f"skipped {len(before)}" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # into the input folder: refused before anything is written
    refused = _run("medseg-predict", f"ckpt_dir={run_dir}", f"input={inputs}", f"output={inputs / 'sub'}",
                   "paths.output=outputs", cwd=work)
    assert refused.returncode == 2 and "inside the input folder" in refused.stderr
    assert sorted(p.name for p in inputs.iterdir()) == before
    assert len(find_checkpoints(run_dir)) == 1


def test_cv_summary_table(trained_run):
    work, run_dir, _ = trained_run
    result = _run("medseg-cv-summary", f"experiment_dir={run_dir.parent}", "paths.output=outputs", cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (run_dir.parent / "cv_summary.md").read_text()
    assert "| unet__dice_ce | all | dice_Anterior |" in table
    assert "| unet__dice_ce | fold_0 | dice_mean |" in table
