"""Dataset adapters: each turns one on-disk layout into a Manifest (cases, channels, labels).

``build_manifest`` refuses a key the adapter does not take (ConfigError naming it and the accepted keys), so a
misspelled key in a data config is an error rather than a default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from medseg.config_keys import accepted_keys, check_keys
from medseg.datasets.io import IMAGE_SUFFIXES, NATURAL_SUFFIXES, strip_suffix
from medseg.datasets.labels import scheme_from_nnunet, scheme_from_values
from medseg.datasets.manifest import Case, Manifest
from medseg.errors import DatasetError

ADAPTERS: dict[str, Callable[..., Manifest]] = {}


# data.* keys every adapter is handed but that are read elsewhere: fold_seed by the fold assignment
# (medseg.preprocessing.prepare.load_manifest); ``adapter`` selects the adapter, ``synthetic`` is taken out before
SHARED_DATA_KEYS = ("fold_seed",)


def register_adapter(name: str):
    def wrap(fn: Callable[..., Manifest]) -> Callable[..., Manifest]:
        accepted_keys(fn)  # refuses an adapter taking **kwargs: its keys could not be checked
        ADAPTERS[name] = fn
        return fn
    return wrap


def adapter_keys(adapter: str) -> tuple[str, ...]:
    """The data config keys adapter ``adapter`` takes (besides ``adapter`` and the shared ``fold_seed``)."""
    if adapter not in ADAPTERS:
        raise DatasetError([f"unknown dataset adapter {adapter!r}; known: {sorted(ADAPTERS)}"])
    return accepted_keys(ADAPTERS[adapter])


def build_manifest(adapter: str, **kwargs) -> Manifest:
    """The manifest of adapter ``adapter``; a key it does not take is a ConfigError (before any file is read)."""
    keys = adapter_keys(adapter)
    check_keys(kwargs, (*keys, *SHARED_DATA_KEYS), f"dataset adapter {adapter!r}", "data")
    return ADAPTERS[adapter](**{k: v for k, v in kwargs.items() if k in keys})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError([f"{path}: file not found"])
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError([f"{path}: not valid JSON ({e})"]) from None


def _dataset_json(root: Path, required: tuple[str, ...]) -> tuple[Path, dict]:
    path = root / "dataset.json"
    meta = _read_json(path)
    problems = [f"{path}: missing key {k!r}" for k in required if k not in meta]
    if problems:
        raise DatasetError(problems, str(root))
    return path, meta


class _Paths:
    """Resolves the dataset-relative paths of a dataset.json or manifest and collects every one that leaves
    the data root (symlinks resolved): a dataset file from elsewhere cannot make medseg read outside it
    unless ``allow_outside_root`` (data.allow_outside_root=true) says so."""

    def __init__(self, root: Path, allow_outside_root: bool = False):
        self.root, self.allow = root, bool(allow_outside_root)
        self.problems: list[str] = []

    def __call__(self, relpath: str, where: str) -> str:
        p = (self.root / relpath).resolve()
        if not self.allow and not p.is_relative_to(self.root.resolve()):
            self.problems.append(f"{where}: path {relpath!r} points outside the dataset root {self.root} "
                                 "(data.allow_outside_root=true permits it)")
        return str(p)

    def check(self) -> None:
        if self.problems:
            raise DatasetError(self.problems, str(self.root))


@register_adapter("msd")
def msd(root: str, name: str | None = None, num_folds: int = 5, allow_outside_root: bool = False) -> Manifest:
    """Medical Segmentation Decathlon: dataset.json with ``modality``, ``labels`` and ``training`` pairs."""
    root_p = Path(root)
    meta_path, meta = _dataset_json(root_p, ("modality", "labels", "training"))
    channels = [meta["modality"][k] for k in sorted(meta["modality"], key=int)]
    try:
        labels = dict(scheme_from_values({int(k): v for k, v in meta["labels"].items()}).labels)
    except DatasetError as e:
        raise DatasetError([f"{meta_path}: {p}" for p in e.problems], str(root_p)) from None
    inside = _Paths(root_p, allow_outside_root)
    cases = []
    for i, pair in enumerate(meta["training"]):
        where = f"{meta_path} training[{i}]"
        cases.append(Case(strip_suffix(pair["image"]), [inside(pair["image"], where)], inside(pair["label"], where)))
    inside.check()
    return Manifest(name or meta.get("name", root_p.name), channels, labels, cases, num_folds, str(root_p.resolve()))


@register_adapter("nnunet_raw")
def nnunet_raw(root: str, name: str | None = None, num_folds: int = 5) -> Manifest:
    """nnU-Net v2 raw layout: ``imagesTr/<case>_<cccc><ending>`` per channel, ``labelsTr/<case><ending>``."""
    root_p = Path(root)
    meta_path, meta = _dataset_json(root_p, ("channel_names", "labels", "file_ending"))
    channels = [meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int)]
    scheme = scheme_from_nnunet(meta["labels"], meta.get("regions_class_order"), str(meta_path))
    ending = meta["file_ending"]
    label_dir = root_p / "labelsTr"
    if not label_dir.is_dir():
        raise DatasetError([f"{label_dir}: folder not found"], str(root_p))
    cases = []
    for label in sorted(label_dir.iterdir()):
        if not label.name.endswith(ending):
            continue
        case_id = label.name[: -len(ending)]
        images = _channel_files(root_p / "imagesTr", case_id, ending, len(channels))
        cases.append(Case(case_id, images, str(label.resolve())))
    if not cases:
        raise DatasetError([f"{label_dir}: no label files ending in {ending!r}"], str(root_p))
    return Manifest(name or root_p.name, channels, dict(scheme.labels), cases, num_folds, str(root_p.resolve()),
                    regions=list(scheme.regions), regions_class_order=list(scheme.regions_class_order))


def _channel_files(folder: Path, case_id: str, ending: str, num_channels: int) -> list[str]:
    """``<case>_<cccc><ending>`` for each declared channel. A natural image (PNG/BMP/TIFF) holds its colour
    channels in one file (nnU-Net: channel_names R, G, B with only ``<case>_0000.png``): where only that first
    file exists, it is the case's one image and its channel count is checked when it is read. A missing channel
    file otherwise stays in the list and is reported by name when read."""
    files = [folder / f"{case_id}_{c:04d}{ending}" for c in range(num_channels)]
    if (num_channels > 1 and ending.lower() in NATURAL_SUFFIXES and files[0].is_file()
            and not any(f.exists() for f in files[1:])):
        files = files[:1]
    return [str(f.resolve()) for f in files]


@register_adapter("manifest")
def manifest_file(path: str, root: str, num_folds: int = 5, name: str | None = None,
                  allow_outside_root: bool = False) -> Manifest:
    """A manifest JSON (data_manifests/); case paths are relative to ``root`` and may not leave it unless
    ``allow_outside_root``."""
    path_p = Path(path)
    d = _read_json(path_p)
    root_p = Path(root)
    inside = _Paths(root_p, allow_outside_root)
    try:
        for c in d.get("cases", []):
            c["images"] = [inside(p, f"{path_p} case {c.get('case_id')}") for p in c["images"]]
            if c.get("label") is not None:
                c["label"] = inside(c["label"], f"{path_p} case {c.get('case_id')}")
        inside.check()
        d.setdefault("num_folds", num_folds)
        m = Manifest.from_dict(d, root=str(root_p.resolve()))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise DatasetError([f"{path_p}: malformed manifest ({type(e).__name__}: {e})"]) from None
    if name:
        m.name = name
    return m


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted; used by prediction."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
                  and not p.name.startswith("."))
