"""An RGB PNG dataset in nnU-Net v2's raw layout through the CLIs, shortened: plan (2d only), train a couple of
iterations, predict PNG label maps of the input size, evaluate them against PNG references."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from tests.datasets.test_natural_images import disc_case, make_raw, write_picture

DATASET = "Dataset120_Discs"


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_png_dataset_plans_trains_predicts_and_evaluates(tmp_path):
    root = make_raw(tmp_path / "raw" / DATASET, 12, {"0": "R", "1": "G", "2": "B"})
    common = ["data=nnunet_raw", f"data.root={root}", "paths.output=outputs",
              "paths.preprocessed=outputs/preprocessed"]

    # the default preprocess=[auto] is the plan's main configuration, 2d for pictures
    plan = _run("medseg-plan", *common, "num_processes=1", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    plans = json.loads((tmp_path / "outputs" / "preprocessed" / DATASET / "plans.json").read_text())
    assert list(plans["configurations"]) == ["2d"]
    cached = list((tmp_path / "outputs" / "preprocessed" / DATASET).glob("*/*_seg.npy"))
    assert len(cached) == 12 and {p.parent.name for p in cached} == {"2d"}
    assert plans["configurations"]["2d"]["normalization"] == ["zscore"] * 3  # R, G, B: nnU-Net's default

    # the default configuration is not planned for pictures: one clear line, before any training
    refused = _run("medseg-train", *common, "configuration=3d_fullres", "debug=fast", cwd=tmp_path)
    assert refused.returncode == 2
    assert "configuration '3d_fullres' is not in the plan of Dataset120_Discs (planned: ['2d'])" in refused.stderr

    train = _run("medseg-train", *common, "configuration=2d", "debug=fast", "fold=0", "trainer.max_epochs=1",
                 "sampling.iterations_per_epoch=2", "validation.iterations=1", "callbacks.progress=plain",
                 "num_processes=1", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = tmp_path / "outputs" / DATASET / "unet__dice_ce__2d"
    metrics = json.loads((run_dir / "fold_0" / "metrics.json").read_text())
    assert set(metrics["dice"]) == {"disc"} and metrics["num_cases"] == 3  # 12 cases, 5 folds

    images, refs = tmp_path / "imagesTs", tmp_path / "labelsTs"
    cases = [f"test{i}" for i in range(3)]
    for i, case in enumerate(cases):
        image, label = disc_case(100 + i)
        write_picture(images / f"{case}_0000.png", image)
        write_picture(refs / f"{case}.png", label)
    preds = tmp_path / "preds"
    predict = _run("medseg-predict", f"ckpt_dir={run_dir}", f"input={images}", f"output={preds}", "device=cpu",
                   cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "predicted 3, skipped 0 (already done), failed 0" in predict.stdout + predict.stderr
    assert sorted(p.name for p in preds.glob("*.png")) == [f"{c}.png" for c in cases]
    for case in cases:
        pred = sitk.ReadImage(str(preds / f"{case}.png"))
        assert pred.GetDimension() == 2 and pred.GetSize() == (64, 48)  # the input picture's size
        assert pred.GetNumberOfComponentsPerPixel() == 1 and pred.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1}

    evaluate = _run("medseg-evaluate", f"pred={preds}", f"ref={refs}", f"labels={root / 'dataset.json'}",
                    "num_processes=1", cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    summary = json.loads((preds / "evaluation" / "summary.json").read_text())
    assert summary["classes"] == {"1": "disc"} and summary["num_cases"] == 3
    per_case = (preds / "evaluation" / "per_case.csv").read_text().splitlines()
    assert len(per_case) == 4 and per_case[0].startswith("case_id,dice_disc")
    dice = summary["per_class"]["disc"]["dice"]
    assert dice["n"] == 3 and 0.0 <= dice["mean"] <= 1.0  # every reference holds the disc: Dice is defined
