"""Dataset -> manifest with folds -> validated fingerprint -> plan -> preprocessed cache, each step cached.

Shared by medseg-plan and medseg-train (which prepares on demand, so a first run needs one command).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medseg.datasets.adapters import build_manifest
from medseg.datasets.manifest import Manifest, assign_folds
from medseg.datasets.synthetic import generate_synthetic_dataset
from medseg.planning.fingerprint import DatasetFingerprint, compute_fingerprint, source_key
from medseg.planning.plan import Plan
from medseg.planning.planner import PlannerSettings, plan_dataset
from medseg.preprocessing.cache import PreprocessedCache, preprocess_dataset

log = logging.getLogger(__name__)


@dataclass
class PreparedDataset:
    manifest: Manifest
    fingerprint: DatasetFingerprint
    plan: Plan
    folder: Path  # <paths.preprocessed>/<dataset>

    def cache(self, configuration: str) -> PreprocessedCache:
        return PreprocessedCache(self.folder / self.plan.configuration(configuration).data_identifier)


def load_manifest(data_cfg: DictConfig, folder: Path) -> Manifest:
    """Build the manifest with the configured adapter, with folds: those fixed earlier in <folder>/manifest.json,
    else newly assigned (saved by ``prepare`` once the data has passed validation)."""
    data = OmegaConf.to_container(data_cfg, resolve=True)
    if "synthetic" in data:
        generate_synthetic_dataset(data["root"], **data["synthetic"])
    manifest = build_manifest(data.pop("adapter"), **{k: v for k, v in data.items() if k != "synthetic"})
    saved = folder / "manifest.json"
    previous = Manifest.load(saved) if saved.is_file() else None
    return assign_folds(manifest, int(data.get("fold_seed", 12345)), previous)


def dataset_folder(cfg: DictConfig) -> Path:
    """<paths.preprocessed>/<dataset>: the manifest, fingerprint, plans and caches of one dataset."""
    return Path(cfg.paths.preprocessed) / str(cfg.data.name)


def prepare(cfg: DictConfig, configurations: list[str] | None = None, progress: bool = True,
            manifest: Manifest | None = None) -> PreparedDataset:
    """``manifest``: one already loaded with ``load_manifest`` (from the same config). ``configurations`` to
    preprocess; ``auto`` stands for the plan's main configuration."""
    folder = dataset_folder(cfg)
    manifest = manifest if manifest is not None else load_manifest(cfg.data, folder)
    num_processes = int(cfg.get("num_processes", 2))

    fp_path = folder / "fingerprint.json"
    fingerprint = DatasetFingerprint.load(fp_path) if fp_path.is_file() else None
    if fingerprint is None or fingerprint.source_key != source_key(manifest):
        log.info("fingerprinting and validating %d cases of %s", len(manifest.cases), manifest.name)
        fingerprint = compute_fingerprint(manifest, num_processes, progress)
        fingerprint.save(fp_path)
    manifest.save(folder / "manifest.json")  # folds are fixed from here on

    settings = PlannerSettings.from_config(cfg.planner)
    plan = plan_dataset(fingerprint, manifest.channel_names, manifest.label_scheme, settings)
    plan.save(folder / "plans.json")
    prepared = PreparedDataset(manifest, fingerprint, plan, folder)
    for name in configurations or []:
        preprocess(prepared, plan.main_configuration if name == "auto" else name, num_processes, progress)
    return prepared


def preprocess(prepared: PreparedDataset, configuration: str, num_processes: int = 2,
               progress: bool = True) -> PreprocessedCache:
    """The configuration's preprocessed cache, made where missing or stale."""
    config = prepared.plan.configuration(configuration)
    preprocess_dataset(prepared.manifest, prepared.plan, config, prepared.folder / config.data_identifier,
                       num_processes, progress)
    return prepared.cache(configuration)
