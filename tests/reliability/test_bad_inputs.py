"""Bad datasets beyond tests/data/test_validation.py (which covers missing, corrupt, mismatched shape or affine,
undeclared label values, NaN, extra channels, constant and 2D images): truncated files, hostile headers,
Inf, empty labels, mixed orientations, and manifests with missing, duplicated or escaping entries. Each is
one clear message naming its file, raised before anything is planned or trained."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from medseg.datasets.adapters import build_manifest
from medseg.datasets.io import read_image, read_label
from medseg.datasets.synthetic import make_case
from medseg.errors import DatasetError, MedsegError, VolumeError
from medseg.planning.fingerprint import compute_fingerprint
from tests.conftest import compose, make_msd, write_nifti


def _good(seed, shape=(20, 24, 16)):
    return make_case(np.random.default_rng(seed), shape, (1.0, 1.0, 1.0))


def _fingerprint(root, **kwargs):
    return compute_fingerprint(build_manifest("msd", root=str(root), **kwargs), num_processes=1, progress=False)


def _huge_nifti(path, shape=(4000, 4000, 4000)):
    """A valid NIfTI header declaring a 256 GB float32 volume, followed by a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 64
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def test_truncated_inf_and_hostile_header_each_named_with_its_file(tmp_path):
    cases = {f"c{i}": _good(i) for i in range(6)}
    img, lab = cases["c1"]
    img = img.copy()
    img[2, 2, 2] = np.inf
    cases["c1"] = (img, lab)
    root = make_msd(tmp_path / "bad", cases)
    whole = (root / "imagesTr" / "c2.nii.gz").read_bytes()
    (root / "imagesTr" / "c2.nii.gz").write_bytes(whole[: len(whole) // 2])  # cut in the middle of the data
    label = (root / "labelsTr" / "c3.nii.gz").read_bytes()
    (root / "labelsTr" / "c3.nii.gz").write_bytes(label[:200])  # cut inside the gzip stream
    _huge_nifti(root / "imagesTr" / "c4.nii.gz")
    with pytest.raises(DatasetError) as err:
        _fingerprint(root)
    msg = str(err.value)
    assert len(err.value.problems) == 4, msg
    assert "imagesTr/c1.nii.gz: image contains NaN or Inf values (1 voxel(s))" in msg
    assert "imagesTr/c2.nii.gz: cannot read the voxel data; the file is truncated or corrupt" in msg
    assert "case c3: cannot read label" in msg and "labelsTr/c3.nii.gz" in msg
    assert "imagesTr/c4.nii.gz: the header declares a 4000x4000x4000 volume" in msg and "refused" in msg


@pytest.mark.parametrize("name", ["huge.nii.gz", "huge.nii", "huge.mha"])
def test_an_enormous_header_is_refused_before_any_voxel_is_allocated(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".mha"):
        path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 40000 40000 40000\nElementType = MET_FLOAT\n"
                        "ElementDataFile = LOCAL\n")
    else:
        _huge_nifti(path)
    tracemalloc.start()
    try:
        with pytest.raises(VolumeError, match=rf"{name}: the header declares .* refused before reading"):
            read_image([path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # the header was read, not the 256 GB it promises


def test_the_size_limit_is_adjustable(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "a.nii.gz", _good(0)[0])
    monkeypatch.setenv("MEDSEG_MAX_VOLUME_GB", "0.00001")  # ~10 kB: this 30 kB volume is now too large
    with pytest.raises(VolumeError, match="MEDSEG_MAX_VOLUME_GB"):
        read_image([path])
    monkeypatch.delenv("MEDSEG_MAX_VOLUME_GB")
    assert read_image([path])[0].shape == (1, 16, 24, 20)


def test_reader_errors_are_medseg_errors_naming_the_file(tmp_path):
    path = tmp_path / "lab.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(MedsegError, match="lab.nii.gz: not a readable image"):
        read_label(path)
    (tmp_path / "img.nii").write_bytes(b"")
    with pytest.raises(MedsegError, match="img.nii: not a readable image"):
        read_image([tmp_path / "img.nii"])


def test_an_empty_label_is_a_warning_naming_the_file(tmp_path, caplog):
    cases = {f"c{i}": _good(i) for i in range(5)}
    cases["c3"] = (cases["c3"][0], np.zeros_like(cases["c3"][1]))  # e.g. a healthy control
    root = make_msd(tmp_path / "empty", cases)
    fp = _fingerprint(root)  # accepted: every case is kept
    assert len(fp.cases) == 5
    assert len(fp.warnings) == 1 and fp.warnings[0].endswith("labelsTr/c3.nii.gz: label map is empty (background only)")
    assert "c3.nii.gz: label map is empty" in caplog.text
    fp.save(tmp_path / "fp.json")  # kept with the fingerprint, for later runs that reuse it
    assert type(fp).load(tmp_path / "fp.json").warnings == fp.warnings


def test_mixed_orientations_are_reported_and_each_case_keeps_its_own_geometry(tmp_path):
    cases = {f"c{i}": _good(i) for i in range(5)}
    root = make_msd(tmp_path / "mixed", cases, affine=np.diag([1.0, 1.0, 1.0, 1.0]))  # RAS
    ras = nib.load(str(root / "imagesTr" / "c1.nii.gz"))
    flipped = ras.as_reoriented(nib.orientations.axcodes2ornt("LPS"))  # voxel order of two axes reversed
    # voxel axes (i, j, k) along (S, R, A), 2 mm along i
    permuted = nib.Nifti1Image(np.transpose(np.asarray(cases["c2"][0]), (2, 0, 1)),
                               np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]]))
    nib.save(flipped, str(root / "imagesTr" / "c1.nii.gz"))
    nib.save(nib.Nifti1Image(cases["c1"][1], ras.affine).as_reoriented(nib.orientations.axcodes2ornt("LPS")),
             str(root / "labelsTr" / "c1.nii.gz"))
    nib.save(permuted, str(root / "imagesTr" / "c2.nii.gz"))
    nib.save(nib.Nifti1Image(np.transpose(cases["c2"][1], (2, 0, 1)), permuted.affine),
             str(root / "labelsTr" / "c2.nii.gz"))
    fp = _fingerprint(root)
    assert [c.orientation for c in fp.cases] == ["RAS", "LPS", "SRA", "RAS", "RAS"]
    (warning,) = fp.warnings
    assert "mixed orientations: 3 of 5 cases are RAS" in warning
    assert "imagesTr/c1.nii.gz: LPS (axes flipped)" in warning and "imagesTr/c2.nii.gz: SRA (axes permuted)" in warning
    # each case is measured along its own voxel axes (array order: the file's last axis first)
    assert fp.cases[0].shape_before_crop == [16, 24, 20] and fp.cases[0].spacing == [1.0, 1.0, 1.0]
    assert fp.cases[2].shape_before_crop == [24, 20, 16] and fp.cases[2].spacing == [1.0, 1.0, 2.0]


def _manifest(tmp_path, cases, root):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "m", "channel_names": ["MRI"], "labels": {"0": "bg", "1": "a", "2": "b"},
                                "cases": cases}))
    return build_manifest("manifest", path=str(path), root=str(root))


def test_manifest_missing_files_and_duplicated_ids_are_all_reported(tmp_path):
    root = make_msd(tmp_path / "data", {f"c{i}": _good(i) for i in range(5)})
    entry = lambda c, img=None: {"case_id": c, "images": [img or f"imagesTr/{c}.nii.gz"],  # noqa: E731
                                 "label": f"labelsTr/{c}.nii.gz"}
    m = _manifest(tmp_path, [entry("c0"), entry("c1"), entry("c1", "imagesTr/c2.nii.gz"), entry("c3"),
                             entry("c4", "imagesTr/gone.nii.gz"), entry("c9")], root)
    with pytest.raises(DatasetError) as err:
        compute_fingerprint(m, num_processes=1, progress=False)
    msg = str(err.value)
    assert "case id 'c1' appears 2 times" in msg and "imagesTr/c1.nii.gz" in msg and "imagesTr/c2.nii.gz" in msg
    with pytest.raises(DatasetError) as err:
        compute_fingerprint(_manifest(tmp_path, [entry("c0"), entry("c3"), entry("c4", "imagesTr/gone.nii.gz"),
                                                 entry("c9")], root), num_processes=1, progress=False)
    assert len(err.value.problems) == 2
    msg = str(err.value)
    assert "imagesTr/gone.nii.gz: file not found" in msg and "imagesTr/c9.nii.gz: file not found" in msg


def test_paths_leaving_the_root_are_all_refused_unless_allowed(tmp_path):
    root = make_msd(tmp_path / "data", {f"c{i}": _good(i) for i in range(2)})
    secret = write_nifti(tmp_path / "elsewhere" / "secret.nii.gz", _good(9)[0])
    (root / "imagesTr" / "link.nii.gz").symlink_to(secret)
    cases = [{"case_id": "a", "images": ["../elsewhere/secret.nii.gz"], "label": "labelsTr/c0.nii.gz"},
             {"case_id": "b", "images": [str(secret)], "label": "labelsTr/c1.nii.gz"},
             {"case_id": "c", "images": ["imagesTr/link.nii.gz"], "label": "labelsTr/c1.nii.gz"},
             {"case_id": "d", "images": ["imagesTr/c0.nii.gz"], "label": "labelsTr/../labelsTr/c0.nii.gz"}]
    with pytest.raises(DatasetError) as err:
        _manifest(tmp_path, cases, root)
    assert len(err.value.problems) == 3, str(err.value)  # '..' inside the root is fine
    assert all("points outside the dataset root" in p and "allow_outside_root=true" in p for p in err.value.problems)
    assert "case a: path '../elsewhere/secret.nii.gz'" in str(err.value) and "case c:" in str(err.value)
    m = build_manifest("manifest", path=str(tmp_path / "m.json"), root=str(root), allow_outside_root=True)
    assert m.case("a").images == [str(secret)]
    # the same for an MSD dataset.json, and the flag is a data config key
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": "../elsewhere/secret.nii.gz", "label": "./labelsTr/c0.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"dataset.json training\[2\]: path '../elsewhere/secret.nii.gz' points "):
        build_manifest("msd", root=str(root))
    cfg = compose("plan", ["data=msd", f"data.root={root}"])
    assert cfg.data.allow_outside_root is False
    from medseg.preprocessing.prepare import load_manifest

    cfg = compose("plan", ["data=msd", f"data.root={root}", "data.allow_outside_root=true", "data.num_folds=3"])
    assert len(load_manifest(cfg.data, tmp_path / "prep").cases) == 3


def test_a_malformed_manifest_is_one_clear_error(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"name": "m", "channel_names": ["MRI"], "labels": {"0": "bg"},
                                "cases": [{"case_id": "a", "label": "x.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"m.json: malformed manifest \(KeyError: 'images'\)"):
        build_manifest("manifest", path=str(path), root=str(tmp_path))
