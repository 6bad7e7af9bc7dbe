"""Batch prediction with the untrained tiny model: list-file input, probabilities, background I/O equal to
sequential, failures per case, and geometry kept for ITK formats and reoriented NIfTI."""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.datasets.synthetic import make_case
from medseg.inference.batch import SUMMARY_FILE
from medseg.inference.predictor import Predictor
from tests.inference.conftest import SCAN_CASES, predict_on_cpu

CASES = SCAN_CASES
_predict = predict_on_cpu


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_list_file_input_with_a_missing_file_fails_only_that_case(tiny_run, scans, tmp_path):
    listing = tmp_path / "lists" / "test.txt"
    listing.parent.mkdir()
    listing.write_text(f"# held-out cases\n../scans/{CASES[0]}.nii.gz\n\n{scans / CASES[1]}.nii.gz  # absolute\n"
                       "../scans/not_there.nii.gz\n")
    out = tmp_path / "preds"
    summary = _predict(tiny_run, listing, out)
    assert summary.written == CASES[:2]
    assert list(summary.failed) == ["not_there"] and "file not found" in summary.failed["not_there"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{c}.nii.gz" for c in CASES[:2]] + [SUMMARY_FILE])
    record = json.loads((out / SUMMARY_FILE).read_text())
    assert record["counts"] == {"written": 2, "skipped": 0, "failed": 1}
    assert record["mirror_axes"] == "all" and record["checkpoints"][0].endswith("last.ckpt")
    assert set(record["seconds"][CASES[0]]) == {"read", "predict", "write"}
    # the listed files' folder is an input folder: refused before anything is loaded
    with pytest.raises(Exception, match="listed input"):
        _predict(tiny_run, listing, scans / "preds")


def test_background_io_equals_sequential_prediction(tiny_run, scans, tmp_path):
    seq, bg = tmp_path / "sequential", tmp_path / "background"
    a = _predict(tiny_run, scans, seq, background_io=False, save_probabilities=True)
    b = _predict(tiny_run, scans, bg, background_io=True, save_probabilities=True)
    assert a.written == b.written == CASES and not a.failed and not b.failed
    labels_a, labels_b = _labels(seq), _labels(bg)
    assert labels_a.keys() == labels_b.keys() and len(labels_a) == 3
    for name in labels_a:
        np.testing.assert_array_equal(labels_a[name], labels_b[name])
    for case in CASES:
        pa, pb = np.load(seq / f"{case}_probabilities.npz"), np.load(bg / f"{case}_probabilities.npz")
        np.testing.assert_array_equal(pa["probabilities"], pb["probabilities"])


def test_reading_and_writing_overlap_inference_one_case_each_way(tiny_run, scans, tmp_path, monkeypatch):
    events = []  # (step, case index, thread name) in the order they happened

    def traced(step, fn, pause=0.0):
        count = iter(range(100))

        def wrapper(self, *args, **kwargs):
            i = next(count)
            events.append((f"{step} start", i, threading.current_thread().name))
            time.sleep(pause)  # every step takes a while, so overlaps show whatever the machine's load
            out = fn(self, *args, **kwargs)
            events.append((f"{step} end", i, threading.current_thread().name))
            return out
        return wrapper

    monkeypatch.setattr(Predictor, "prepare", traced("prepare", Predictor.prepare, pause=0.2))
    monkeypatch.setattr(Predictor, "infer", traced("infer", Predictor.infer, pause=0.6))
    monkeypatch.setattr(Predictor, "finish", traced("finish", Predictor.finish, pause=0.2))
    assert _predict(tiny_run, scans, tmp_path / "preds").written == CASES
    at = {(step, i): n for n, (step, i, _) in enumerate(events)}
    threads = {step.split()[0]: name for step, _, name in events}
    assert threads["infer"] == "MainThread" and threads["prepare"] != "MainThread" != threads["finish"]

    def overlap(a, b):
        return at[(f"{a[0]} start", a[1])] < at[(f"{b[0]} end", b[1])] and \
            at[(f"{b[0]} start", b[1])] < at[(f"{a[0]} end", a[1])]

    # while case 1 is inferred, case 2 is prepared and case 0 finished and written ...
    assert overlap(("infer", 1), ("prepare", 2)) and overlap(("infer", 1), ("finish", 0))
    # ... and never more than one case ahead: case 2 is read only once case 1 is taken up for inference
    assert at[("infer end", 0)] < at[("prepare start", 2)]


def test_probabilities_file(tiny_run, scans, tmp_path):
    out = tmp_path / "preds"
    _predict(tiny_run, scans, out, save_probabilities=True)
    for case in CASES:
        label = nib.load(str(out / f"{case}.nii.gz"))
        with np.load(out / f"{case}_probabilities.npz") as npz:
            probs, values = npz["probabilities"], npz["labels"]
        # (classes, z, y, x): the file's voxel axes reversed
        assert probs.dtype == np.float16 and probs.shape == (3, *label.shape[::-1])
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
        top2 = np.sort(probs, axis=0)[-2:]
        clear = top2[1] > top2[0]  # where float16 rounding left no tie
        argmax = values[probs.argmax(0)].transpose(2, 1, 0)
        np.testing.assert_array_equal(argmax[clear.T], np.asarray(label.dataobj)[clear.T])
    # a case counts as done only with every output asked for
    (out / f"{CASES[1]}_probabilities.npz").unlink()
    again = _predict(tiny_run, scans, out, save_probabilities=True)
    assert again.written == [CASES[1]] and again.skipped == [CASES[0], CASES[2]]
    assert not list(out.glob(".*"))  # no temp files left behind
    # with nothing left to do the folder stays as it was, the summary of the run that wrote it included
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _predict(tiny_run, scans, out, save_probabilities=True).skipped == CASES
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_a_corrupt_file_does_not_stop_the_others(tiny_run, scans, tmp_path):
    (scans / "synthetic_000b.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")  # sorts between good cases
    (scans / "synthetic_001x.nii.gz").write_bytes(b"")
    summary = _predict(tiny_run, scans, tmp_path / "preds")
    assert summary.written == CASES
    assert sorted(summary.failed) == ["synthetic_000b", "synthetic_001x"]
    assert "synthetic_001x" in json.loads((tmp_path / "preds" / SUMMARY_FILE).read_text())["failed"]


def _oblique_direction() -> tuple[float, ...]:
    """A rotation about two axes combined with a flip: LPS world, far from identity."""
    a, b = np.deg2rad(25.0), np.deg2rad(-10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx @ np.diag([1.0, -1.0, 1.0])).ravel())


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_keep_direction_origin_and_spacing(tiny_run, tmp_path, suffix):
    scans = tmp_path / "scans"
    scans.mkdir()
    image, _ = make_case(np.random.default_rng(3), (18, 30, 26), (2.5, 0.7, 0.9))  # (z, y, x)
    img = sitk.GetImageFromArray(image.astype(np.int16))
    img.SetSpacing((0.9, 0.7, 2.5))  # (x, y, z): anisotropic, and resampled to the plan's spacing
    img.SetDirection(_oblique_direction())
    img.SetOrigin((-120.5, 87.25, -33.75))
    sitk.WriteImage(img, str(scans / f"ct{suffix}"))
    src = sitk.ReadImage(str(scans / f"ct{suffix}"))
    summary = _predict(tiny_run, scans, tmp_path / "preds")
    assert summary.written == ["ct"], summary.report()
    pred = sitk.ReadImage(str(tmp_path / "preds" / f"ct{suffix}"))
    assert pred.GetSize() == src.GetSize()
    assert pred.GetOrigin() == src.GetOrigin()
    assert pred.GetSpacing() == src.GetSpacing()
    if suffix == ".mha":  # spacing and direction stored apart: bit for bit
        assert pred.GetDirection() == src.GetDirection()
    else:
        # NRRD stores spacing x direction products, so even SimpleITK's own copy of the input's geometry
        # (CopyInformation, write, read) can differ in the last bit of a cosine: ours equals that copy exactly
        copy = sitk.GetImageFromArray(sitk.GetArrayFromImage(pred))
        copy.CopyInformation(src)
        sitk.WriteImage(copy, str(tmp_path / f"copy{suffix}"), useCompression=True)
        assert pred.GetDirection() == sitk.ReadImage(str(tmp_path / f"copy{suffix}")).GetDirection()
        np.testing.assert_allclose(pred.GetDirection(), src.GetDirection(), rtol=0, atol=1e-15)
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def test_prediction_turns_with_a_reoriented_input(tiny_run, tmp_path):
    """The same scan stored RAS and reoriented to LPS (voxel order of two axes flipped, affine adjusted, same
    world positions): the LPS prediction, brought back to RAS, equals the RAS prediction.

    Exactly up to float rounding: with mirroring over all axes both inputs get the same set of flips, the
    Gaussian window weights are symmetric, the shape is chosen so that the sliding windows sit at mirrored
    positions in both (preprocessed 16 x 24 x 32, patch 16, step 8) and no resampling or cropping happens.
    Only the order of floating-point sums differs: the logits agree to one float16 step (~2e-4 here), so the
    argmax can differ only where two classes tie that closely. Hence at most 0.1% of voxels may differ
    (none in this test). The check is not vacuous: without mirroring a third of the voxels differ, and the
    prediction is not symmetric itself."""
    scans = tmp_path / "scans"
    scans.mkdir()
    image, _ = make_case(np.random.default_rng(5), (32, 24, 16), (1.0, 1.0, 1.5))  # nibabel (i, j, k)
    image += 10.0  # nonzero everywhere: the crop keeps the whole volume, so the tiling stays as chosen
    ras = nib.Nifti1Image(image, np.diag([1.0, 1.0, 1.5, 1.0]) @ _translation(-16, -12, -8))
    ras_to_lps = nib.orientations.ornt_transform(nib.io_orientation(ras.affine), nib.orientations.axcodes2ornt("LPS"))
    lps = ras.as_reoriented(ras_to_lps)
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    nib.save(ras, str(scans / "ras.nii.gz"))
    nib.save(lps, str(scans / "lps.nii.gz"))
    out = tmp_path / "preds"
    assert _predict(tiny_run, scans, out, mirror_axes="all").written == ["lps", "ras"]
    pred_ras, pred_lps = nib.load(str(out / "ras.nii.gz")), nib.load(str(out / "lps.nii.gz"))
    np.testing.assert_array_equal(pred_lps.affine, lps.affine)
    back = pred_lps.as_reoriented(nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("LPS"),
                                                                  nib.io_orientation(ras.affine)))
    np.testing.assert_allclose(back.affine, pred_ras.affine, atol=1e-6)
    a, b = np.asarray(pred_ras.dataobj), np.asarray(back.dataobj)
    assert not np.array_equal(a, a[::-1, ::-1])  # the prediction itself is not symmetric: the check has teeth
    assert np.mean(a != b) <= 1e-3, np.mean(a != b)
    plain = tmp_path / "no_mirroring"
    _predict(tiny_run, scans, plain, mirror_axes=None)
    unmirrored = nib.load(str(plain / "lps.nii.gz")).as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("LPS"), nib.io_orientation(ras.affine)))
    assert np.mean(np.asarray(nib.load(str(plain / "ras.nii.gz")).dataobj) != np.asarray(unmirrored.dataobj)) > 0.05


def _translation(*t) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def test_cli_list_file_probabilities_and_refusal(tiny_run, scans, tmp_path):
    listing = tmp_path / "cases.txt"
    listing.write_text(f"scans/{CASES[0]}.nii.gz\nscans/missing.nii.gz\n")
    out = tmp_path / "preds"
    exe = Path(sys.executable).with_name("medseg-predict")
    common = [f"ckpt_dir={tiny_run}", f"input={listing}", "device=cpu", f"paths.output={tmp_path / 'outputs'}"]
    run = subprocess.run([str(exe), *common, f"output={out}", "save_probabilities=true"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]  # a failed case is reported in the exit status
    assert "predicted 1, skipped 0 (already done), failed 1" in run.stdout
    assert (out / f"{CASES[0]}.nii.gz").is_file() and (out / f"{CASES[0]}_probabilities.npz").is_file()
    assert f"[2/2] {CASES[0]}: written in" in run.stderr + run.stdout  # a plain line per case off a terminal
    record = json.loads((out / SUMMARY_FILE).read_text())
    assert list(record["failed"]) == ["missing"] and record["save_probabilities"] is True
    refused = subprocess.run([str(exe), *common, f"output={scans / 'preds'}"], capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and "listed input" in refused.stderr
    assert not (scans / "preds").exists()


def test_the_runs_cross_validated_post_processing_is_applied_to_label_maps(tiny_run, scans, tmp_path):
    from scipy import ndimage

    from medseg.inference.postprocessing import PostprocessingSpec, keep_largest_component, save_postprocessing

    plain = _predict(tiny_run, scans, tmp_path / "plain")
    assert plain.written
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    save_postprocessing(run, PostprocessingSpec(all_foreground=True), {"num_cases": 0})
    fold = run / "fold_0"  # a single fold dir finds its run's decision too
    _predict(fold, scans, tmp_path / "post")
    record = json.loads((tmp_path / "post" / SUMMARY_FILE).read_text())
    assert record["postprocessing"] == {"all_foreground": True, "classes": []}
    for case in plain.written:
        before = np.asarray(nib.load(str(tmp_path / "plain" / f"{case}.nii.gz")).dataobj)
        after = np.asarray(nib.load(str(tmp_path / "post" / f"{case}.nii.gz")).dataobj)
        assert np.array_equal(after, keep_largest_component(before, all_foreground=True))
        assert ndimage.label(after > 0, np.ones((3, 3, 3)))[1] <= 1
