from medseg.training.run import _set_aside


def test_overwrite_sets_the_old_fold_aside_instead_of_deleting(tmp_path):
    fold = tmp_path / "fold_0"
    (fold / "checkpoints").mkdir(parents=True)
    (fold / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    _set_aside(fold)
    assert not fold.exists()
    (kept,) = tmp_path.glob("fold_0.replaced-*")
    assert (kept / "checkpoints" / "best.ckpt").read_bytes() == b"weights"


def test_the_2d_configuration_trains_and_validates_in_original_geometry(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    import nibabel as nib

    exe = Path(sys.executable).with_name("medseg-train")
    result = subprocess.run([str(exe), "debug=fast", "configuration=2d", "callbacks.progress=plain",
                             f"paths.data={tmp_path / 'data'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fold = tmp_path / "outputs" / "synthetic" / "unet__dice_ce__2d" / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["num_cases"] == 5 and set(metrics["dice"]) == {"outer", "inner"}
    # the fold's costs, for the benchmark leaderboard
    timing = metrics["timing"]
    assert timing["device"] == "cpu" and timing["peak_gpu_memory_gb"] is None
    assert timing["epochs_timed"] == metrics["epochs"] == 2 and timing["iterations_per_epoch"] == 4
    assert 0 < timing["train_epoch_s_median"] <= timing["epoch_s_median"] < timing["train_s"]
    assert 0 < timing["peak_rss_gb"] < 64 and timing["inference_s_per_case"] > 0
    config = json.loads((fold / "plan.json").read_text())["configurations"]["2d"]
    assert len(config["patch_size"]) == 2
    for pred in (fold / "validation").glob("*.nii.gz"):
        image = nib.load(str(tmp_path / "data" / "synthetic" / "imagesTr" / pred.name))
        assert nib.load(str(pred)).shape == image.shape
