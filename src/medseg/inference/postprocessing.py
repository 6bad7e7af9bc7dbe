"""Keep-largest-connected-component post-processing: the operation and the saved decision that enables it
(made from cross-validation by medseg.evaluation.postprocessing)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from medseg.atomic import write_json
from medseg.errors import MedsegError
from medseg.layout import POSTPROCESSING as SPEC_FILE

# Full connectivity (26 neighbours in 3D, 8 in 2D): nnU-Net v2 labels with skimage.measure.label's default,
# which is full connectivity, so a structure touching itself only at an edge or corner stays one component.
CONNECTIVITY = None  # MONAI's None = input.ndim hops = full connectivity


# ---- connected components ----------------------------------------------------------------------------

def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean (z,y,x) mask."""
    box = bounding_box(mask)
    if box is None:
        return mask
    # components never leave the mask's bounding box, and labelling only that crop saves most of the time
    # where the structures are small in a large scan. MONAI wants channel-first; passing a binary mask (not
    # the label map) keeps memory independent of the number of classes, and a bool tensor keeps skimage on
    # its fast binary path. The transform edits its input in place: hand it a copy, never ``mask``.
    lcc = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=CONNECTIVITY)
    kept = lcc(torch.from_numpy(np.array(mask[box], dtype=bool)[None]))
    out = np.zeros_like(mask)
    out[box] = np.asarray(kept[0].cpu(), dtype=bool)
    return out


Target = int | list[int] | tuple[int, ...]  # a label value, or the values of a region


def target_mask(label: np.ndarray, target: Target) -> np.ndarray:
    if isinstance(target, (list, tuple)):
        return label == target[0] if len(target) == 1 else np.isin(label, list(target))
    return label == target


def keep_largest_component(label: np.ndarray, classes: list[Target] | None = None,
                           all_foreground: bool = False) -> np.ndarray:
    """A copy of ``label`` where voxels outside the largest component are set to background (0).

    ``all_foreground``: one component over the union of all foreground classes (``classes`` must be None).
    Otherwise: each class in ``classes`` (default: every foreground class present; a list of values is a region,
    nnU-Net's region-based post-processing) keeps its own largest component; the others are untouched."""
    out = np.array(label, copy=True)
    masks: Iterable[np.ndarray]
    if all_foreground:
        if classes is not None:
            raise ValueError("all_foreground keeps one component over all classes; pass no classes")
        masks = [out != 0]
    else:
        classes = [int(c) for c in np.unique(out) if c != 0] if classes is None else classes
        masks = (target_mask(out, c) for c in classes)  # one at a time: there may be many classes
    for mask in masks:
        out[mask & ~_largest_component(mask)] = 0
    return out


# ---- the decision and its file ------------------------------------------------------------------------

@dataclass
class PostprocessingSpec:
    all_foreground: bool = False
    classes: list[Target] = field(default_factory=list)  # label values, or regions as lists of values

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PostprocessingSpec":
        return cls(all_foreground=bool(d["all_foreground"]),
                   classes=[[int(v) for v in c] if isinstance(c, list) else int(c) for c in d["classes"]])

    @property
    def enabled(self) -> bool:
        return self.all_foreground or bool(self.classes)


def apply_postprocessing(label: np.ndarray, spec: PostprocessingSpec) -> np.ndarray:
    """All-foreground step first, then per class: the order ``decide`` evaluated them in."""
    if spec.all_foreground:
        label = keep_largest_component(label, all_foreground=True)
    if spec.classes:
        label = keep_largest_component(label, classes=spec.classes)
    return label


def save_postprocessing(run_dir: str | Path, spec: PostprocessingSpec, evidence: dict) -> Path:
    path = Path(run_dir) / SPEC_FILE
    write_json(path, {**spec.to_dict(), "evidence": evidence})
    return path


def load_postprocessing(run_dir: str | Path) -> PostprocessingSpec | None:
    """The run's decided post-processing (or that of a decision file given itself, such as selection's); None where
    medseg-postprocess has not been run."""
    path = Path(run_dir) if Path(run_dir).suffix == ".json" else Path(run_dir) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        return PostprocessingSpec.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise MedsegError(f"{path}: not a post-processing file ({e}); re-run medseg-postprocess") from e
