"""medseg-export and medseg-predict model_file=... from the command line: the CLI writes what the Python API
(medseg.Segmenter) predicts, and backend=onnxruntime on the ONNX export writes the labels of backend=torch."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg import Segmenter
from medseg.datasets.io import read_image
from tests.inference.finished_run import HIPPOCAMPUS_CASES, export_finished_run


@pytest.fixture(scope="module")
def exported(synthetic_root, tmp_path_factory):
    return export_finished_run(synthetic_root, tmp_path_factory)


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _label(path: Path) -> np.ndarray:
    return read_image([path])[0][0]


def test_cli_export_and_predict_equal_the_api_and_onnxruntime_equals_torch(exported, hippocampus, tmp_path):
    run, _ = exported
    inputs = tmp_path / "scans"
    inputs.mkdir()
    cases = HIPPOCAMPUS_CASES[:2]
    for case in cases:
        shutil.copy(hippocampus / "imagesTr" / f"{case}.nii.gz", inputs)
    archive = tmp_path / "hippo.zip"
    done = _run("medseg-export", f"run_dir={run}", f"output={archive}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {archive}" in done.stdout

    common = ["mirror_axes=null", "device=cpu", f"input={inputs}"]
    both = _run("medseg-predict", f"ckpt_dir={run}", f"model_file={archive}", f"output={tmp_path / 'x'}", *common,
                cwd=tmp_path)
    assert both.returncode == 2, both.stderr[-2000:]
    assert "give exactly one of ckpt_dir=<run or fold folder> and model_file=" in both.stderr
    assert "both were given" in both.stderr

    preds = tmp_path / "preds"
    done = _run("medseg-predict", f"model_file={archive}", f"output={preds}", *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    api = Segmenter.from_run(archive, device="cpu", mirror_axes=None)
    for case in cases:
        expected = api.predict(inputs / f"{case}.nii.gz").label
        assert len(np.unique(expected)) > 1
        np.testing.assert_array_equal(_label(preds / f"{case}.nii.gz"), expected)
    summary = json.loads((preds / "prediction_summary.json").read_text())
    assert summary["model"] == str(archive) and summary["backend"] == "torch"

    onnx_dir = tmp_path / "onnx"
    done = _run("medseg-export", f"run_dir={run}", f"output={onnx_dir}", "format=onnx", "name=hippo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["hippo.json", "hippo_fold_0.onnx", "hippo_fold_1.onnx"]
    description = json.loads((onnx_dir / "hippo.json").read_text())
    assert description["sliding_window"]["patch_size"] == [32, 32, 32]
    assert description["preprocessing"]["normalization"][0]["scheme"] == "zscore"
    assert description["output"]["channel_label_values"] == [0, 1, 2]
    onnx_preds = tmp_path / "onnx_preds"
    done = _run("medseg-predict", f"model_file={onnx_dir / 'hippo.json'}", "backend=onnxruntime",
                f"output={onnx_preds}", *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in cases:
        np.testing.assert_array_equal(_label(onnx_preds / f"{case}.nii.gz"), _label(preds / f"{case}.nii.gz"))


def test_export_config_composes_and_predict_takes_model_file():
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose

    cfg = compose("export", ["run_dir=r", "output=o.zip"])
    assert cfg.format == "zip" and cfg.checkpoint == "last" and cfg.folds is None and cfg.overwrite is False
    predict = compose("predict", ["model_file=m.zip", "input=b", "output=c"])
    assert predict.ckpt_dir is None and predict.backend == "torch"
    with pytest.raises(ConfigCompositionException):
        compose("export", ["run_dir=r", "output=o.zip", "formt=onnx"])  # a misspelled key is an error
    # the API is exported from the package lazily: importing medseg alone does not import torch
    light = subprocess.run([sys.executable, "-c", "import sys, medseg; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=600)
    assert light.stdout.split() == ["False"], light.stderr[-2000:]
    import medseg

    assert medseg.Segmenter is Segmenter
