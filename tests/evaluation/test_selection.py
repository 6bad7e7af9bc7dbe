"""Configuration selection on generated experiments: runs validated by the real fold validation
(medseg.training.validation.validate_fold, which stores the compact probability files) with predictors whose
errors are controlled, so that whether an ensemble of two runs beats the best run is known in advance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medseg.datasets.adapters import build_manifest
from medseg.datasets.manifest import assign_folds
from medseg.errors import MedsegError
from medseg.evaluation.metrics import dice_of_masks
from medseg.evaluation.selection import POSTPROCESSING_FILE, SELECTION_JSON, SELECTION_MD, select, write_selection
from medseg.inference.predictor import Prediction
from medseg.inference.probability_files import probability_file, read_probabilities
from medseg.planning.fingerprint import compute_fingerprint
from medseg.planning.planner import PlannerSettings, plan_dataset
from tests.conftest import write_nifti

SHAPE = (10, 14, 12)
NUM_CASES = 6
LABELS = {"background": 0, "a": 1, "b": 2}
REGIONS = {"background": 0, "whole": [1, 2], "b": 2}


def _case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Two touching blocks (labels 1 and 2) at a per-case place; the image is the label map (plus 0.1 noise),
    so a predictor can find the truth in it and add errors of its own."""
    rng = np.random.default_rng(i)
    label = np.zeros(SHAPE, np.int16)
    z, y, x = rng.integers(1, 4), rng.integers(1, 5), rng.integers(1, 4)
    label[z:z + 6, y:y + 5, x:x + 4] = 1
    label[z:z + 6, y + 5:y + 9, x:x + 4] = 2
    return (label + rng.normal(0, 0.1, SHAPE)).astype(np.float32), label


def make_dataset(root: Path, labels: dict, **extra) -> Path:
    for i in range(NUM_CASES):
        image, label = _case(i)
        write_nifti(root / "imagesTr" / f"case{i:02d}_0000.nii.gz", image)
        write_nifti(root / "labelsTr" / f"case{i:02d}.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": labels,
                                                   "numTraining": NUM_CASES, "file_ending": ".nii.gz", **extra}))
    return root


class NoisyPredictor:
    """The truth hidden in the image, plus Gaussian noise of ``sigma`` on the logits (seeded per case): larger
    sigma, more wrong voxels; two seeds make independent errors, which averaging reduces."""

    def __init__(self, plan, sigma: float, seed: int):
        self.plan, self.sigma, self.seed = plan, sigma, seed

    def predict(self, image, spacing, probabilities: bool = False) -> Prediction:
        scheme = self.plan.label_scheme
        truth = np.rint(image[0]).astype(np.int64)
        rng = np.random.default_rng([self.seed, int(image[0].sum() * 10) % 100003])
        if scheme.has_regions:
            target = scheme.labels_to_regions(truth).astype(np.float32)
        else:
            target = np.stack([truth == v for v in scheme.values]).astype(np.float32)
        logits = torch.from_numpy(4 * target - 2 + rng.normal(0, self.sigma, target.shape).astype(np.float32))
        probs = scheme.probabilities(logits, 0)
        values = np.asarray(scheme.regions_class_order if scheme.has_regions else scheme.values, np.int16)
        return Prediction(np.asarray(scheme.logits_to_labels(logits, 0), dtype=np.int16), values,
                          probs.numpy().astype(np.float16) if probabilities else None)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = {}
    for kind, labels, extra in (("labels", LABELS, {}), ("regions", REGIONS, {"regions_class_order": [1, 2]})):
        root = make_dataset(tmp_path_factory.mktemp(kind) / f"Dataset9{len(out)}_{kind}", labels, **extra)
        manifest = assign_folds(build_manifest("nnunet_raw", root=str(root), num_folds=2), 1)
        fingerprint = compute_fingerprint(manifest, num_processes=1, progress=False)
        plan = plan_dataset(fingerprint, manifest.channel_names, manifest.label_scheme,
                            PlannerSettings(patch_size=[8, 8, 8], base_features=4))
        out[kind] = (root, manifest, plan)
    return out


def make_run(experiment: Path, name: str, dataset, sigma: float, seed: int, folds=(0, 1),
             probabilities: bool = True) -> Path:
    from medseg.training.validation import validate_fold

    root, manifest, plan = dataset
    cfg = OmegaConf.create({"data": {"adapter": "nnunet_raw", "root": str(root), "name": root.name, "num_folds": 2,
                                     "fold_seed": 1},
                            "paths": {"preprocessed": str(experiment.parent / "preprocessed")},
                            "trainer": {"max_epochs": 2}, "sampling": {"iterations_per_epoch": 5, "batch_size": 2}})
    for k in folds:
        fold_dir = experiment / name / f"fold_{k}"
        fold_dir.mkdir(parents=True)
        OmegaConf.save(cfg, fold_dir / "config.yaml")
        plan.save(fold_dir / "plan.json")
        (fold_dir / "overrides.yaml").write_text(f"- data=nnunet_raw\n- data.root={root}\n- fold={k}\n")
        held_out = [c.case_id for c in manifest.cases if c.fold == k]
        validate_fold(NoisyPredictor(plan, sigma, seed), manifest, held_out, fold_dir, k, progress=False,
                      save_probabilities=probabilities)
    return experiment / name


def _dice_by_hand(experiment: Path, runs: list[str], root: Path, values: list[list[int]]) -> dict[str, float]:
    """Each case's mean Dice of the runs' averaged probabilities, recomputed from the files with numpy alone."""
    out = {}
    for fold_dir in sorted((experiment / runs[0]).glob("fold_*")):
        for f in sorted((fold_dir / "validation").glob("*_probabilities.npz")):
            case = f.name[: -len("_probabilities.npz")]
            probs = [read_probabilities(experiment / r / fold_dir.name / "validation" / f.name).values for r in runs]
            mean = sum(p.astype(np.float32) for p in probs) / len(probs)
            reference = np.asarray(nib.load(root / "labelsTr" / f"{case}.nii.gz").dataobj).transpose(2, 1, 0)
            if len(values) == mean.shape[0]:  # regions: each sigmoid over 0.5 paints regions_class_order [1, 2]
                label = np.zeros(mean.shape[1:], np.int16)
                for i in range(len(values)):
                    label[mean[i] > 0.5] = i + 1
                dice = [dice_of_masks(np.isin(label, v), np.isin(reference, v)) for v in values]
            else:
                label = mean.argmax(0)
                dice = [dice_of_masks(label == v[0], reference == v[0]) for v in values]
            out[case] = float(np.mean(dice))
    return out


def test_the_ensemble_is_chosen_when_it_beats_the_best_run_and_scored_from_the_stored_files(datasets, tmp_path):
    experiment = tmp_path / "experiment"
    make_run(experiment, "unet__dice_ce", datasets["labels"], sigma=1.6, seed=1)
    make_run(experiment, "unet__dice_ce__2d", datasets["labels"], sigma=1.8, seed=2)
    selection = select(experiment, n_resamples=2000)
    winner = selection.winner
    assert winner["runs"] == ["unet__dice_ce", "unet__dice_ce__2d"] and winner["rank"] == 1
    singles = [r for r in selection.candidates if len(r["runs"]) == 1]
    assert winner["dice_mean"] > max(r["dice_mean"] for r in singles)
    # the ensemble's Dice is that of the averaged stored probabilities, case by case
    by_hand = _dice_by_hand(experiment, winner["runs"], datasets["labels"][0], [[1], [2]])
    assert winner["cases"] == NUM_CASES == len(by_hand)
    assert winner["dice_mean"] == pytest.approx(np.mean(list(by_hand.values())), abs=1e-12)
    assert winner["dice_diff"] > 0 and winner["paired_cases"] == NUM_CASES
    # a single run's score is its validation's own (per_case.csv, as the leaderboard reads it)
    best = singles[0]
    per_case = [json.loads((experiment / best["runs"][0] / f"fold_{k}" / "metrics.json").read_text())
                for k in (0, 1)]
    assert best["cases"] == sum(m["num_cases"] for m in per_case)
    # the recipe predicts with both runs, post-processing as decided for the ensemble, the validation's mirroring
    markdown = write_selection(selection)
    recipe = selection.recipe["predict"]
    assert "ckpt_dir=[" in recipe and all(str((experiment / r).resolve()) in recipe for r in winner["runs"])
    assert f"postprocessing={(experiment / POSTPROCESSING_FILE).resolve()}" in recipe
    assert json.loads((experiment / POSTPROCESSING_FILE).read_text()) == selection.postprocessing
    assert selection.recipe["recommendation"] == "fold_ensemble"
    assert "unet__dice_ce + unet__dice_ce__2d" in markdown and recipe in markdown
    saved = json.loads((experiment / SELECTION_JSON).read_text())
    assert saved["winner"] == "unet__dice_ce + unet__dice_ce__2d" and len(saved["ranking"]) == 3


def test_a_single_run_is_chosen_when_the_ensemble_is_worse(datasets, tmp_path):
    experiment = tmp_path / "experiment"
    make_run(experiment, "unet__dice_ce", datasets["labels"], sigma=1.0, seed=1)
    make_run(experiment, "swin_unetr__dice_ce", datasets["labels"], sigma=6.0, seed=2)
    selection = select(experiment, n_resamples=2000)
    assert selection.winner["runs"] == ["unet__dice_ce"]
    ensemble = next(r for r in selection.candidates if len(r["runs"]) == 2)
    assert ensemble["dice_mean"] < selection.winner["dice_mean"] and ensemble["dice_diff"] < 0
    by_hand = _dice_by_hand(experiment, ensemble["runs"], datasets["labels"][0], [[1], [2]])
    assert ensemble["dice_mean"] == pytest.approx(np.mean(list(by_hand.values())), abs=1e-12)
    write_selection(selection)
    recipe = selection.recipe["predict"]
    assert f"ckpt_dir={(experiment / 'unet__dice_ce').resolve()} " in recipe and "[" not in recipe
    # the all-data alternative: the run's own command line with fold=all
    assert selection.recipe["all_data_train"] == [f"medseg-train data=nnunet_raw data.root={datasets['labels'][0]} "
                                                   "fold=all"]
    assert selection.recipe["all_data_predict"] is None and "no all-data model" in selection.recipe["notes"][0]


def test_missing_folds_and_probability_files_are_listed_not_fatal(datasets, tmp_path):
    experiment = tmp_path / "experiment"
    make_run(experiment, "unet__dice_ce", datasets["labels"], sigma=1.6, seed=1)
    make_run(experiment, "resenc_unet__dice_ce", datasets["labels"], sigma=1.6, seed=2, folds=(0,))
    kept_no_probabilities = make_run(experiment, "umamba_bot__dice_ce", datasets["labels"], sigma=1.6, seed=3)
    gone = sorted(kept_no_probabilities.glob("fold_1/validation/*_probabilities.npz"))[0]
    gone.unlink()
    selection = select(experiment, n_resamples=500)
    names = {r["candidate"] for r in selection.candidates}
    # the incomplete run is no candidate; the one lacking a file is ranked alone, never in an ensemble
    assert names == {"unet__dice_ce", "umamba_bot__dice_ce"}
    assert any("resenc_unet__dice_ce: fold(s) 1 of 2 not finished" in n for n in selection.notes)
    assert any(n.startswith("umamba_bot__dice_ce: no stored probabilities for 1 of 6") for n in selection.notes)


def test_regions_are_ensembled_per_region_and_scored_by_region(datasets, tmp_path):
    experiment = tmp_path / "experiment"
    make_run(experiment, "unet__dice_ce", datasets["regions"], sigma=1.6, seed=1)
    make_run(experiment, "unet__dice_ce__2d", datasets["regions"], sigma=1.6, seed=2)
    selection = select(experiment, n_resamples=500)
    assert selection.classes == ["whole", "b"]
    ensemble = next(r for r in selection.candidates if len(r["runs"]) == 2)
    assert set(ensemble["dice_per_class"]) == {"whole", "b"}
    by_hand = _dice_by_hand(experiment, ensemble["runs"], datasets["regions"][0], [[1, 2], [2]])
    assert ensemble["dice_mean"] == pytest.approx(np.mean(list(by_hand.values())), abs=1e-12)
    assert selection.winner is ensemble  # independent errors: the average is better here too


def test_the_command_gives_the_same_selection_for_the_same_seed(datasets, tmp_path):
    experiment = tmp_path / "experiment"
    make_run(experiment, "unet__dice_ce", datasets["labels"], sigma=1.6, seed=1)
    make_run(experiment, "unet__dice_ce__2d", datasets["labels"], sigma=1.8, seed=2)
    result = subprocess.run([sys.executable, "-m", "medseg.cli.select", f"experiment_dir={experiment}",
                             "n_resamples=1000", "seed=3"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    first = (experiment / SELECTION_JSON).read_bytes()
    assert "Inference recipe" in (experiment / SELECTION_MD).read_text() and "Inference recipe" in result.stdout
    assert f"wrote {SELECTION_MD}, {SELECTION_JSON}" in result.stdout and str(experiment.absolute()) in result.stdout
    write_selection(select(experiment, n_resamples=1000, seed=3))
    assert (experiment / SELECTION_JSON).read_bytes() == first
    assert json.loads(first)["settings"]["seed"] == 3
    write_selection(select(experiment, n_resamples=1000, seed=4))
    assert (experiment / SELECTION_JSON).read_bytes() != first  # the bootstrap interval follows the seed
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedsegError, match="no run with every cross-validation fold finished"):
        select(empty)


def test_probability_files_are_cropped_losslessly(datasets, tmp_path):
    from medseg.inference.probability_files import write_compact_probabilities

    _, _, plan = datasets["labels"]
    probs = np.zeros((3, *SHAPE), np.float16)
    probs[0] = 1
    probs[:, 2:5, 3:9, 4:6] = np.random.default_rng(0).dirichlet([1, 1, 1], (3, 6, 2)).transpose(3, 0, 1, 2)
    path = probability_file(tmp_path, "case")
    write_compact_probabilities(path, probs, np.array([0, 1, 2], np.int16), has_regions=False)
    with np.load(path) as stored:
        assert stored["probabilities"].shape == (3, 3, 6, 2)
    restored = read_probabilities(path)
    assert np.array_equal(restored.values, probs) and restored.labels.tolist() == [0, 1, 2]
