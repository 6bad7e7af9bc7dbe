"""The manifest: every adapter's output, and the one thing the rest of medseg reads about a dataset."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medseg.atomic import write_json
from medseg.datasets.labels import LabelScheme, Region
from medseg.errors import DatasetError

MANIFEST_VERSION = 1


@dataclass
class Case:
    case_id: str
    images: list[str]  # one path per channel, or one 4D file holding every channel
    label: str | None = None
    fold: int | None = None


@dataclass
class Manifest:
    name: str
    channel_names: list[str]  # e.g. ["MRI"] or ["T2", "ADC"]; "CT" selects CT normalisation
    labels: dict[int, str]  # value -> name, background included
    cases: list[Case]
    num_folds: int = 5
    root: str = ""  # paths in a saved manifest are relative to it where possible
    version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)
    regions: list[Region] = field(default_factory=list)  # nnU-Net's region-based labels (datasets/labels.py)
    regions_class_order: list[int] = field(default_factory=list)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme(self.labels, tuple(self.regions), tuple(self.regions_class_order))

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"case {case_id!r} is not in manifest {self.name!r}")

    def split(self, fold: int | str) -> tuple[list[str], list[str]]:
        """(training ids, validation ids) of a fold; fold "all" trains on every case and holds none out."""
        if fold == "all":
            return [c.case_id for c in self.cases], []
        if not (isinstance(fold, int) and 0 <= fold < self.num_folds):
            raise DatasetError([f"fold {fold} does not exist: the manifest has folds 0..{self.num_folds - 1} "
                                "(or 'all' to train on every case)"], self.name)
        train = [c.case_id for c in self.cases if c.fold != fold]
        val = [c.case_id for c in self.cases if c.fold == fold]
        if not val:
            used = sorted({c.fold for c in self.cases if c.fold is not None})
            raise DatasetError([f"fold {fold} holds no case: the cases are assigned to folds {used}"], self.name)
        return train, val

    # ---- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        root = Path(self.root) if self.root else None

        def rel(p: str | None) -> str | None:
            if p is None or root is None:
                return p
            try:
                return str(Path(p).relative_to(root))
            except ValueError:
                return p

        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        d["regions"] = [r.to_dict() for r in self.regions]
        d["cases"] = [{"case_id": c.case_id, "images": [rel(p) for p in c.images], "label": rel(c.label),
                       "fold": c.fold} for c in self.cases]
        return d

    @classmethod
    def from_dict(cls, d: dict, root: str | None = None) -> "Manifest":
        root = root if root is not None else d.get("root", "")
        base = Path(root) if root else None

        def absolute(p: str | None) -> str | None:
            if p is None or base is None or os.path.isabs(p):
                return p
            return str(base / p)

        cases = [Case(c["case_id"], [absolute(p) for p in c["images"]], absolute(c.get("label")), c.get("fold"))
                 for c in d["cases"]]
        return cls(name=d["name"], channel_names=list(d["channel_names"]),
                   labels={int(k): v for k, v in d["labels"].items()}, cases=cases,
                   num_folds=int(d.get("num_folds", 5)), root=str(root or ""),
                   version=int(d.get("version", MANIFEST_VERSION)), extra=d.get("extra", {}),
                   regions=[Region.from_dict(r) for r in d.get("regions", [])],
                   regions_class_order=[int(v) for v in d.get("regions_class_order", [])])

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, root: str | None = None) -> "Manifest":
        return cls.from_dict(json.loads(Path(path).read_text()), root)


def kfold_assignment(case_ids: list[str], num_folds: int, seed: int) -> dict[str, int]:
    """Fold per case, the same split as nnU-Net v2 (sklearn KFold, shuffle, seeded, on sorted ids).

    Written out here rather than importing scikit-learn for one function: KFold shuffles
    ``arange(n)`` with ``RandomState(seed)`` and cuts it into folds whose sizes differ by at most one,
    the larger ones first.
    """
    ids = sorted(case_ids)
    if len(ids) < num_folds:
        raise DatasetError([f"{len(ids)} labelled case(s) cannot be split into {num_folds} folds"])
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(num_folds, len(ids) // num_folds)
    sizes[: len(ids) % num_folds] += 1
    folds: dict[str, int] = {}
    start = 0
    for fold, size in enumerate(sizes):
        for i in order[start:start + size]:
            folds[ids[i]] = fold
        start += size
    return folds


def assign_folds(manifest: Manifest, seed: int, previous: Manifest | None = None) -> Manifest:
    """Fill in missing folds once; a saved earlier assignment is kept so folds never move between runs."""
    if previous is not None:
        old = {c.case_id: c.fold for c in previous.cases}
        new = {c.case_id for c in manifest.cases}
        if set(old) != new:
            added, removed = sorted(new - set(old)), sorted(set(old) - new)
            raise DatasetError([
                f"the cases differ from those whose folds were fixed earlier (added: {added[:5]}, removed: "
                f"{removed[:5]}); folds never move silently: delete the saved manifest to re-split"], manifest.name)
        for c in manifest.cases:
            if c.fold is None:
                c.fold = old[c.case_id]
    missing = [c.case_id for c in manifest.cases if c.fold is None]
    if missing:
        if len(missing) != len(manifest.cases):
            raise DatasetError([f"{len(missing)} case(s) have no fold while others do, e.g. {missing[:3]}"],
                               manifest.name)
        folds = kfold_assignment(missing, manifest.num_folds, seed)
        for c in manifest.cases:
            c.fold = folds[c.case_id]
    bad = [c.case_id for c in manifest.cases if not 0 <= int(c.fold) < manifest.num_folds]
    if bad:
        raise DatasetError([f"case {b}: fold outside 0..{manifest.num_folds - 1}" for b in bad], manifest.name)
    return manifest
