"""The preprocessed-case cache: one folder per configuration, four files per case.

A case is valid only when its JSON (written last, atomically) carries the current key, built from the
case's input files and the configuration's preprocessing settings. So a re-run is a no-op, a changed plan
or input redoes exactly the cases it affects, and a killed run leaves nothing a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.atomic import atomic_path, file_signature, write_json
from medseg.datasets.io import read_image, read_label
from medseg.datasets.manifest import Case, Manifest
from medseg.errors import WriteError
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.datasets.labels import ANNOTATED
from medseg.preprocessing.pipeline import class_locations, preprocess_image


def case_key(case: Case, config_key: str) -> str:
    return hashlib.sha1((config_key + file_signature(case.images + [case.label])).encode()).hexdigest()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


class PreprocessedCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def paths(self, case_id: str) -> dict[str, Path]:
        f = self.folder
        return {"image": f / f"{case_id}.npy", "label": f / f"{case_id}_seg.npy",
                "locations": f / f"{case_id}_locs.npz", "properties": f / f"{case_id}.json"}

    def is_current(self, case_id: str, key: str) -> bool:
        p = self.paths(case_id)
        try:
            props = json.loads(p["properties"].read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return props.get("cache_key") == key and all(p[k].is_file() for k in ("image", "label", "locations"))

    def write(self, case_id: str, key: str, data: np.ndarray, label: np.ndarray, locations: dict, props: dict):
        p = self.paths(case_id)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            p["properties"].unlink(missing_ok=True)  # invalidate first: a crash below leaves no trusted entry
            _atomic_save_npy(p["image"], data)
            _atomic_save_npy(p["label"], label)
            with atomic_path(p["locations"], suffix=".npz") as tmp:
                np.savez(tmp, **{str(k): v for k, v in locations.items()})
            write_json(p["properties"], {**props, "cache_key": key}, indent=None)
        except OSError as e:  # disk full, permissions: the case stays untrusted and is redone next time
            raise WriteError(f"{p['properties']}: cannot write the preprocessed case {case_id} "
                             f"({e.strerror or e}); it is redone on the next run") from e

    def load_properties(self, case_id: str) -> dict:
        return json.loads(self.paths(case_id)["properties"].read_text())

    def load_volume(self, case_id: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        p = self.paths(case_id)
        mode = "r" if mmap else None
        return np.load(p["image"], mmap_mode=mode), np.load(p["label"], mmap_mode=mode)

    def load_arrays(self, case_id: str, mmap: bool = True):
        """(image, label, class locations) for patch sampling."""
        data, label = self.load_volume(case_id, mmap)
        with np.load(self.paths(case_id)["locations"]) as z:
            locations = {int(k): z[k] for k in z.files}
        return data, label, locations


def _preprocess_one(args) -> str:
    case, plan, config, folder, key = args
    image, geo = read_image(case.images)
    label, _ = read_label(case.label)
    data, seg, props = preprocess_image(image, geo.spacing, plan, config, case.case_id, label)
    scheme = plan.label_scheme
    locations = class_locations(seg, scheme.location_classes)
    if scheme.ignore_label is not None:  # where patches that need no foreground are centred
        locations.update(class_locations(seg != scheme.ignore_label, [True], key=ANNOTATED))
    PreprocessedCache(folder).write(case.case_id, key, data, seg, locations, props.to_dict())
    return case.case_id


def preprocess_dataset(manifest: Manifest, plan: Plan, config: ConfigurationPlan, folder: str | Path,
                       num_processes: int = 2, progress: bool = True) -> PreprocessedCache:
    """Bring the cache up to date for every case; returns it. Cases already current are not touched."""
    cache = PreprocessedCache(folder)
    config_key = plan.preprocessing_key(config.name)
    jobs = []
    for case in manifest.cases:
        key = case_key(case, config_key)
        if not cache.is_current(case.case_id, key):
            jobs.append((case, plan, config, str(folder), key))
    if not jobs:
        return cache
    if num_processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(num_processes) as pool:
            for _ in tqdm(pool.map(_preprocess_one, jobs), total=len(jobs), desc=f"preprocess {config.name}",
                          disable=not progress):
                pass
    else:
        for job in tqdm(jobs, desc=f"preprocess {config.name}", disable=not progress):
            _preprocess_one(job)
    return cache
