"""An ensemble of runs of different configurations (a 3d_fullres and a 2d run) predicted by medseg-predict equals
the ensemble that configuration selection forms from the runs' stored out-of-fold probabilities, voxel for voxel;
and the stored compact probabilities are the predictor's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medseg.cli.predict import model_source, postprocessing_choice
from medseg.datasets.adapters import build_manifest
from medseg.datasets.io import read_image, read_label
from medseg.errors import MedsegError
from medseg.inference.api import Segmenter
from medseg.inference.ensemble import average_probabilities
from medseg.inference.predictor import Predictor, load_checkpoint
from medseg.inference.probability_files import probability_file, read_probabilities
from medseg.training.validation import validate_fold
from tests.inference.conftest import save_untrained_checkpoint

CASES = ["synthetic_000", "synthetic_001"]


@pytest.fixture(scope="module")
def two_runs(tiny_plan, tmp_path_factory) -> list[Path]:
    """fold_0 of a 3d_fullres and of a 2d run, each validated on two cases with their probabilities kept."""
    experiment = tmp_path_factory.mktemp("experiment")
    folds = []
    for name, configuration, seed in (("unet__dice_ce", "3d_fullres", 0), ("unet__dice_ce__2d", "2d", 1)):
        fold = experiment / name / "fold_0"
        save_untrained_checkpoint(tiny_plan, configuration, fold / "checkpoints" / "last.ckpt", seed=seed)
        folds.append(fold)
    return folds


def test_predicted_ensemble_equals_the_one_formed_from_stored_probabilities(two_runs, synthetic_root, tmp_path):
    manifest = build_manifest("msd", root=str(synthetic_root))
    predictors = [Predictor([load_checkpoint(f / "checkpoints" / "last.ckpt", torch.device("cpu"))], overlap=0.5,
                            mirror_axes=None, sw_batch_size=2) for f in two_runs]
    for fold, predictor in zip(two_runs, predictors):
        validate_fold(predictor, manifest, CASES, fold, 0, progress=False, save_probabilities=True)
    # the compact files hold exactly the predictor's probabilities
    image, geometry = read_image(manifest.case(CASES[0]).images)
    full = predictors[1].predict(image, geometry.spacing, probabilities=True).probabilities
    assert np.array_equal(read_probabilities(probability_file(two_runs[1] / "validation", CASES[0])).values, full)

    listing = tmp_path / "cases.txt"
    listing.write_text("\n".join(str(manifest.case(c).images[0]) for c in CASES))
    cfg = OmegaConf.create({"ckpt_dir": [str(f) for f in two_runs], "model_file": None})
    sources = model_source(cfg)
    assert sources == two_runs
    segmenter = Segmenter.from_run(sources, device="cpu", mirror_axes=None, sw_batch_size=2, postprocessing=True)
    summary = segmenter.predict_folder(listing, tmp_path / "out", progress=False)
    assert sorted(summary.written) == CASES
    scheme = segmenter.plan.label_scheme
    for case in CASES:
        stored = [read_probabilities(probability_file(f / "validation", case)).values for f in two_runs]
        expected = np.asarray(scheme.to_labels(average_probabilities(stored), dim=0))
        predicted, _ = read_label(tmp_path / "out" / f"{case}.nii.gz")
        assert np.array_equal(predicted, expected)
        # and it is an ensemble: it differs from either run's own label map somewhere
        own = [read_label(f / "validation" / f"{case}.nii.gz")[0] for f in two_runs]
        assert all(not np.array_equal(predicted, o) for o in own)


def test_a_decision_file_must_exist_and_an_exported_model_is_no_ensemble_member(two_runs, tmp_path):
    with pytest.raises(MedsegError, match="no such file"):
        Segmenter.from_run(two_runs, device="cpu", postprocessing=tmp_path / "missing.json")
    assert postprocessing_choice("false") is False and postprocessing_choice(True) is True
    assert postprocessing_choice("sel/selection_postprocessing.json") == Path("sel/selection_postprocessing.json")
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="an ensemble of runs is given as their run or fold folders"):
        model_source(OmegaConf.create({"ckpt_dir": [str(two_runs[0]), "model.zip"], "model_file": None}))
