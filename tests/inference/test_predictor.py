"""Predictor's steps: the slab-wise way back onto the input grid equals preprocessing's own, probabilities and
label map agree, and the split steps give what predict_logits gives."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medseg.datasets.io import read_image
from medseg.datasets.labels import LabelScheme, Region
from medseg.inference import predictor as predictor_module
from medseg.inference.predictor import Predictor, load_checkpoint, resample_rows
from medseg.preprocessing.pipeline import CaseProperties, logits_to_original


PLAIN = LabelScheme({0: "background", 1: "a", 2: "b"})
REGIONS = LabelScheme({0: "background", 1: "a", 2: "b"}, (Region("ab", (1, 2)), Region("b", (2,)), Region("a", (1,))),
                      (1, 2, 1))


@pytest.mark.parametrize("scheme", [PLAIN, REGIONS], ids=["labels", "regions"])
@pytest.mark.parametrize("transpose", [[0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_slab_wise_way_back_equals_logits_to_original(transpose, scheme):
    gen = torch.Generator().manual_seed(0)
    plan = SimpleNamespace(transpose=transpose, transpose_backward=[transpose.index(a) for a in range(3)],
                           label_scheme=scheme)
    original = [23, 17, 20]  # array order
    transposed = [original[a] for a in transpose]
    box = [[2, transposed[0] - 3], [0, transposed[1]], [4, transposed[2] - 1]]
    after_crop = [b - a for a, b in box]
    logits = torch.randn(3, 9, 14, 11, generator=gen)  # preprocessed grid: every axis resampled
    props = CaseProperties("c", original, [1.0] * 3, box, after_crop, list(logits.shape[1:]))
    expected = logits_to_original(logits, props, plan)
    cropped_away = expected.permute(0, *[a + 1 for a in transpose])[:, 0]  # planning axis 0, row 0
    assert scheme.logits_to_labels(cropped_away, 0).eq(0).all()  # background there, whichever output kind
    for step in (1, 4, 23):
        rows = [predictor_module._rows_on_input_grid(logits, props, plan, s, min(s + step, original[0]))
                for s in range(0, original[0], step)]
        torch.testing.assert_close(torch.cat(rows, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_resample_rows_is_trilinear_interpolation():
    x = torch.randn(2, 7, 5, 9)
    full = torch.nn.functional.interpolate(x[None], size=(12, 3, 9), mode="trilinear", align_corners=False)[0]
    for axis in range(3):
        shape = [12, 3, 9]
        got = resample_rows(x, shape, axis, 1, shape[axis] - 1)
        torch.testing.assert_close(got, full.narrow(axis + 1, 1, shape[axis] - 2), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor([load_checkpoint(tiny_run / "fold_0" / "checkpoints" / "last.ckpt", torch.device("cpu"))],
                     mirror_axes="all")


def test_probabilities_agree_with_the_label_map(predictor, synthetic_root, monkeypatch):
    image, geometry = read_image([synthetic_root / "imagesTs" / "synthetic_010.nii.gz"])
    monkeypatch.setattr(predictor_module, "SLAB_BYTES", 1)  # one row per slab: slabs must not show
    result = predictor.predict(image, geometry.spacing, probabilities=True)
    probs, label = result.probabilities, result.label
    assert probs.dtype == np.float16 and probs.shape == (3, *geometry.shape)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
    assert set(np.unique(label)) == {0, 1, 2}  # the untrained model still predicts every class somewhere
    # argmax of the probabilities is the label map, except where two classes tie once rounded to float16
    differ = result.labels[probs.argmax(0)] != label
    top2 = np.sort(probs, axis=0)[-2:]
    assert np.all(top2[0][differ] == top2[1][differ])
    np.testing.assert_array_equal(result.labels, [0, 1, 2])
    # the split steps are what predict_logits does
    logits = predictor.predict_logits(image, geometry.spacing)
    np.testing.assert_array_equal(result.labels[logits.argmax(0).numpy()], label)


def test_fold_ensemble_ignores_folds_set_aside_by_overwrite(tmp_path):
    from medseg.inference.predictor import find_checkpoints

    for name in ("fold_1", "fold_0", "fold_0.replaced-20260101-000000", "fold_10"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    found = find_checkpoints(tmp_path)
    assert [p.parent.parent.name for p in found] == ["fold_0", "fold_1", "fold_10"]
