"""A finished run as training leaves it, made in a second: two folds of an untrained tiny U-Net (seeded, so their
label maps differ and are varied) with checkpoints, run.json, metrics.json, the Hydra overrides of the command
and a postprocessing.json. Export and prediction need the files and formats, not trained weights."""

from __future__ import annotations

import json
from pathlib import Path

from medseg.datasets.adapters import build_manifest
from medseg.planning.fingerprint import compute_fingerprint
from medseg.planning.planner import PlannerSettings, plan_dataset
from tests.inference.conftest import save_untrained_checkpoint

HIPPOCAMPUS_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]


def tiny_plan_of(root: Path):
    manifest = build_manifest("msd", root=str(root))
    fingerprint = compute_fingerprint(manifest, num_processes=1, progress=False)
    return plan_dataset(fingerprint, manifest.channel_names, manifest.label_scheme,
                        PlannerSettings(patch_size=[32, 32, 32], base_features=4))


def make_finished_run(plan, run: Path, folds=(0, 1), postprocessing: dict | None = None) -> Path:
    for fold in folds:
        folder = run / f"fold_{fold}"
        save_untrained_checkpoint(plan, "3d_fullres", folder / "checkpoints" / "last.ckpt", seed=fold)
        (folder / "run.json").write_text(json.dumps({"fold": fold, "configuration": "3d_fullres",
                                                     "dataset": plan.dataset, "num_train_cases": 8,
                                                     "model": {"name": "unet", "kwargs": {}}, "max_epochs": 2}))
        (folder / "metrics.json").write_text(json.dumps({"fold": fold, "num_cases": 2, "epochs": 2,
                                                         "dice": {"a": 0.5 + fold / 10, "b": 0.3},
                                                         "dice_mean": 0.4 + fold / 20}))
        hydra = folder / "hydra" / "20260101-000000" / ".hydra"
        hydra.mkdir(parents=True)
        (hydra / "overrides.yaml").write_text(f"- data=msd\n- fold={fold}\n- trainer.max_epochs=2\n")
    if postprocessing is not None:
        (run / "postprocessing.json").write_text(json.dumps(postprocessing))
    return run


def export_finished_run(synthetic_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, its model archive): a finished run exported with medseg.inference.export.export_run; the run
    keeps all foreground's largest component (postprocessing.json). For a module-scoped ``exported`` fixture."""
    from medseg.inference.export import export_run

    work = tmp_path_factory.mktemp("exported")
    run = make_finished_run(tiny_plan_of(synthetic_root), work / "unet__dice_ce",
                            postprocessing={"all_foreground": True, "classes": []})
    return run, export_run(run, work / "model.zip")
