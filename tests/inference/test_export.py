"""medseg-export's model archive: it predicts what its run predicts, carries plan, post-processing, card and
manifest, is never unpickled, and is refused, naming the member, when damaged, altered or truncated."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

from medseg import Segmenter
from medseg.datasets.io import read_image
from medseg.errors import CheckpointError, MedsegError
from medseg.inference.export import MANIFEST, ModelArchive, export_run
from tests.inference.finished_run import HIPPOCAMPUS_CASES, export_finished_run

WEIGHTS = "folds/fold_0/weights.npz"

@pytest.fixture(scope="module")
def exported(synthetic_root, tmp_path_factory):
    return export_finished_run(synthetic_root, tmp_path_factory)



def test_archive_predicts_the_labels_of_its_run(exported, hippocampus):
    run, archive = exported
    from_run = Segmenter.from_run(run, device="cpu", mirror_axes=None)
    from_zip = Segmenter.from_run(archive, device="cpu", mirror_axes=None)
    assert from_zip.postprocessing is not None and from_zip.postprocessing == from_run.postprocessing
    assert len(from_zip.predictor.models) == 2
    for case in HIPPOCAMPUS_CASES:
        path = hippocampus / "imagesTr" / f"{case}.nii.gz"
        a, b = from_run.predict(path), from_zip.predict(path)
        assert len(np.unique(a.label)) > 1  # a varied label map, not one class everywhere
        assert b.label.shape == b.geometry.shape
        np.testing.assert_array_equal(a.label, b.label)
    image, geometry = read_image([path])
    c = from_zip.predict_array(image[0], geometry.spacing, probabilities=True)  # (z, y, x): one channel
    np.testing.assert_array_equal(c.label, b.label)
    assert c.probabilities is not None and c.probabilities.shape == (3, *image.shape[1:])
    np.testing.assert_allclose(c.probabilities.astype(np.float32).sum(0), 1.0, atol=2e-3)
    one_fold = Segmenter.from_run(archive, device="cpu", mirror_axes=None, folds=[1]).predict(path).label
    np.testing.assert_array_equal(one_fold, Segmenter.from_run(run / "fold_1", device="cpu",
                                                               mirror_axes=None).predict(path).label)


def test_archive_holds_manifest_card_and_pickle_free_weights(exported):
    _, archive = exported
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read(MANIFEST))
        for name, entry in manifest["members"].items():
            assert hashlib.sha256(z.read(name)).hexdigest() == entry["sha256"]
        with np.load(io.BytesIO(z.read(WEIGHTS)), allow_pickle=False) as npz:
            assert all(npz[k].dtype == np.float32 for k in npz.files)
        card_md = z.read("MODEL_CARD.md").decode()
    assert names == set(manifest["members"]) | {MANIFEST}
    assert {"plan.json", "labels.json", "postprocessing.json", "model_card.json", "folds/fold_1/run.json",
            "folds/fold_1/metrics.json", "folds/fold_1/model.json"} <= names
    card = ModelArchive.open(archive).card
    assert card["dataset"] == "synthetic" and card["folds"] == ["fold_0", "fold_1"]
    assert card["cross_validation"]["dice_mean_over_folds"] == pytest.approx(0.425)
    assert "`medseg-train data=msd fold=1 trainer.max_epochs=2`" in card_md and "| fold_1 | 2 | 0.4500 |" in card_md


def test_export_never_overwrites_unless_asked(exported):
    run, archive = exported
    before = archive.read_bytes()
    with pytest.raises(MedsegError, match=f"^{archive} exists; medseg-export never replaces a file unless "
                                          "overwrite=true$"):
        export_run(run, archive)
    assert archive.read_bytes() == before
    with pytest.raises(MedsegError, match="no finished fold"):
        (run.parent / "empty" / "fold_0").mkdir(parents=True)
        export_run(run.parent / "empty", run.parent / "x.zip")
    assert not (run.parent / "x.zip").exists()


def _rewrite(archive, target, replace: dict[str, bytes], keep_manifest: bool = True):
    """A copy of the archive with members replaced (valid zip CRCs; the manifest as it was)."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, replace.get(name, src.read(name)))
        for name in set(replace) - set(src.namelist()):
            dst.writestr(name, replace[name])
    return target


def test_damaged_altered_and_truncated_archives_are_refused(exported, tmp_path):
    _, archive = exported
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo(WEIGHTS)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF  # one flipped byte inside the weights' stored data
    flipped = tmp_path / "flipped.zip"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        Segmenter.from_run(flipped, device="cpu")
    assert str(e.value) == (f"{flipped}: member {WEIGHTS} is corrupt (fails its CRC-32 check or does not "
                            "decompress); the archive is damaged or was altered, so the model is not loaded")

    weights = zipfile.ZipFile(archive).read(WEIGHTS)
    altered = _rewrite(archive, tmp_path / "altered.zip", {WEIGHTS: weights[:-1] + bytes([weights[-1] ^ 1])})
    with pytest.raises(CheckpointError, match=f"^{altered}: member {WEIGHTS} does not match the manifest "
                                              r"\(SHA-256 [0-9a-f]{12}\.\.\., expected [0-9a-f]{12}\.\.\.\); the "
                                              "archive is damaged or was altered, so the model is not loaded$"):
        Segmenter.from_run(altered, device="cpu")

    added = _rewrite(archive, tmp_path / "added.zip", {"folds/fold_9/weights.npz": weights})
    with pytest.raises(CheckpointError, match="member folds/fold_9/weights.npz is not listed in the manifest"):
        ModelArchive.open(added)

    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[:len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        Segmenter.from_run(truncated, device="cpu")
    assert str(e.value) == (f"{truncated}: not a readable model archive; it is truncated or damaged "
                            "(File is not a zip file)")


def test_weights_are_never_unpickled(exported, tmp_path):
    """An archive whose weights hold a pickled object, with a manifest matching it: refused, nothing run."""
    _, archive = exported
    buffer = io.BytesIO()
    np.savez(buffer, payload=np.array([print], dtype=object))  # loading it would need the pickle module
    hostile = buffer.getvalue()
    manifest = json.loads(zipfile.ZipFile(archive).read(MANIFEST))
    manifest["members"][WEIGHTS] = {"sha256": hashlib.sha256(hostile).hexdigest(), "bytes": len(hostile)}
    path = _rewrite(archive, tmp_path / "hostile.zip", {WEIGHTS: hostile, MANIFEST: json.dumps(manifest).encode()})
    with pytest.raises(CheckpointError, match=f"member {WEIGHTS} is not a weights archive \\(Object arrays cannot "
                                              "be loaded when allow_pickle=False\\)"):
        Segmenter.from_run(path, device="cpu")
