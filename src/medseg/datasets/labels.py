"""A dataset's label scheme: the values its label maps hold, nnU-Net's region-based labels and its ignore label.

The one home for what the network predicts (one softmax channel per label, or one sigmoid channel per region),
what is scored (each foreground label, or each region) and which voxels count at all (not the ignore label).
Everything is defined on integer label maps: regions are derived from them on the fly (as nnU-Net converts
segmentations to regions), so the cache, augmentation and deep-supervision targets stay label maps.

dataset.json (nnU-Net v2): ``"labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3],
"enhancing": 3, "ignore": 4}`` with ``"regions_class_order": [1, 2, 3]``: any list of more than one value makes
every foreground entry a region; a predicted region i paints label ``regions_class_order[i]``, later regions over
earlier ones. ``"ignore"`` marks unannotated voxels and must be the highest value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medseg.errors import DatasetError

IGNORE_NAME = "ignore"
BACKGROUND_NAME = "background"
# class-locations key of a case's annotated voxels (any value but the ignore label, background included): with an
# ignore label, patches that need no foreground are centred on one of them, as nnU-Net's loader does
ANNOTATED = -1


@dataclass(frozen=True)
class Region:
    """A scored target: a name and the label values that make it up (one value for an ordinary label)."""

    name: str
    values: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Region":
        return cls(str(d["name"]), tuple(int(v) for v in d["values"]))


@dataclass(frozen=True)
class LabelScheme:
    labels: Mapping[int, str]  # every value a label map may hold -> name; 0 is background, "ignore" included
    regions: tuple[Region, ...] = ()  # empty: ordinary labels, one softmax channel each
    regions_class_order: tuple[int, ...] = field(default=())  # label value painted by each region

    @property
    def ignore_label(self) -> int | None:
        found = [v for v, n in self.labels.items() if n == IGNORE_NAME]
        return found[0] if found else None

    @property
    def has_regions(self) -> bool:
        return bool(self.regions)

    @property
    def needs_mask(self) -> bool:
        """Whether losses and metrics must leave voxels out (an ignore label)."""
        return self.ignore_label is not None

    @property
    def values(self) -> list[int]:
        """The label values a prediction may hold, ascending (background included, ignore not)."""
        return sorted(v for v in self.labels if v != self.ignore_label)

    @property
    def num_outputs(self) -> int:
        """Network output channels: one per region, or one per label (background included)."""
        return len(self.regions) if self.has_regions else len(self.values)

    @property
    def value_bound(self) -> int:
        """One more than the highest value a label map may hold (ignore included): one-hot width of a label map."""
        return max(self.labels) + 1

    @property
    def targets(self) -> tuple[Region, ...]:
        """What is scored: each region, or each foreground label as a one-value region."""
        if self.has_regions:
            return self.regions
        return tuple(Region(self.labels[v], (v,)) for v in self.values if v != 0)

    @property
    def location_classes(self) -> list[int]:
        """The label values whose voxel locations preprocessing keeps for foreground sampling."""
        return [v for v in self.values if v != 0]

    @property
    def sampling_groups(self) -> list[tuple[int, ...]] | None:
        """The classes a foreground patch is centred on, as sets of values: the regions, or (None) each value."""
        return [r.values for r in self.regions] if self.has_regions else None

    # ---- label maps -> training targets, network outputs -> label maps --------------------------------------
    def region_table(self) -> torch.Tensor:
        """(value_bound, R) float: 1 where a label value belongs to a region. Kept on the training device, it
        makes the region targets one gather, with no tensor built on the host per step."""
        table = torch.zeros(self.value_bound, max(len(self.regions), 1))
        for i, region in enumerate(self.regions):
            table[list(region.values), i] = 1.0
        return table

    def region_masks(self, label: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, *spatial) label map -> (B, R, *spatial) float region masks (the sigmoid heads' targets);
        ``table``: ``region_table()`` already on the label's device."""
        table = self.region_table().to(label.device) if table is None else table
        return table[label[:, 0].long()].movedim(-1, 1)

    def valid_mask(self, label: torch.Tensor | np.ndarray):
        """True where a voxel is annotated (not the ignore label); None without an ignore label."""
        ignore = self.ignore_label
        return None if ignore is None else label != ignore

    def probabilities(self, logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.sigmoid(logits) if self.has_regions else torch.softmax(logits, dim)

    def to_labels(self, probabilities: torch.Tensor | np.ndarray, dim: int = 0):
        """Probabilities (channels along ``dim``) -> label map: each region over 0.5 paints its value in
        ``regions_class_order``, later regions over earlier ones (nnU-Net's order); or the most likely label."""
        if not self.has_regions:
            index = probabilities.argmax(dim)
            lookup = self.values
            if lookup == list(range(len(lookup))):
                return index
            table = (torch.tensor(lookup, device=index.device) if isinstance(index, torch.Tensor)
                     else np.asarray(lookup))
            return table[index]
        moved = probabilities.movedim(dim, 0) if isinstance(probabilities, torch.Tensor) \
            else np.moveaxis(probabilities, dim, 0)
        if isinstance(moved, torch.Tensor):
            out = torch.zeros(moved.shape[1:], dtype=torch.int16, device=moved.device)
        else:
            out = np.zeros(moved.shape[1:], dtype=np.int16)
        for channel, value in zip(moved, self.regions_class_order):
            out[channel > 0.5 if channel.dtype != bool and channel.dtype != torch.bool else channel] = value
        return out

    def logits_to_labels(self, logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Label map from logits: a region's sigmoid is over 0.5 exactly where its logit is over 0, and the most
        likely label is the largest logit, so no activation is computed."""
        if self.has_regions:
            return self.to_labels(logits.movedim(dim, 0) > 0, dim=0)
        return self.to_labels(logits, dim)

    def labels_to_regions(self, label: np.ndarray) -> np.ndarray:
        """(*spatial) label map -> (R, *spatial) bool region masks (numpy; evaluation and tests)."""
        return np.stack([np.isin(label, r.values) for r in self.regions])

    # ---- JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"labels": {str(k): v for k, v in sorted(self.labels.items())},
                "regions": [r.to_dict() for r in self.regions],
                "regions_class_order": list(self.regions_class_order)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LabelScheme":
        return cls({int(k): str(v) for k, v in d["labels"].items()},
                   tuple(Region.from_dict(r) for r in d.get("regions", [])),
                   tuple(int(v) for v in d.get("regions_class_order", [])))


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def scheme_from_nnunet(labels: Mapping, regions_class_order: Sequence | None, where: str) -> LabelScheme:
    """The scheme of an nnU-Net v2 dataset.json ``labels`` (name -> value or list of values) and
    ``regions_class_order``; every problem is listed in one DatasetError naming ``where``."""
    problems: list[str] = []
    entries: dict[str, tuple[int, ...]] = {}
    is_list: dict[str, bool] = {}
    for name, raw in labels.items():
        values = raw if isinstance(raw, (list, tuple)) else [raw]
        ints = [_as_int(v) for v in values]
        if not values or any(i is None or i < 0 for i in ints):
            problems.append(f"{where}: label {name!r} is {raw!r}; a label is a non-negative integer or a list of them")
            continue
        entries[str(name)] = tuple(int(i) for i in ints if i is not None)
        is_list[str(name)] = isinstance(raw, (list, tuple))
    if BACKGROUND_NAME not in labels:
        problems.append(f"{where}: no 'background' label (it must be 0)")
    elif entries.get(BACKGROUND_NAME) not in (None, (0,)) or is_list.get(BACKGROUND_NAME):
        problems.append(f"{where}: 'background' is {labels[BACKGROUND_NAME]!r}; it must be 0")
    ignore = entries.get(IGNORE_NAME)
    if ignore is not None and is_list[IGNORE_NAME]:
        problems.append(f"{where}: 'ignore' is {labels[IGNORE_NAME]!r}; the ignore label is one integer, not a region")
        ignore = None
    has_regions = any(is_list[n] and len(set(v)) > 1 for n, v in entries.items())
    others = {n: v for n, v in entries.items() if n != IGNORE_NAME}
    if problems:
        raise DatasetError(problems)
    if not has_regions:
        if regions_class_order is not None and len(regions_class_order) and not has_regions:
            pass  # nnU-Net ignores it without regions; so does medseg
        by_value: dict[int, str] = {}
        for name, (value, *_) in others.items():
            if value in by_value:
                problems.append(f"{where}: labels {by_value[value]!r} and {name!r} both have value {value}")
            by_value[value] = name
        values = sorted(by_value)
        if ignore is not None:
            if ignore[0] in by_value:
                problems.append(f"{where}: 'ignore' is {ignore[0]}, the value of label {by_value[ignore[0]]!r}")
            elif ignore[0] < max(values):
                problems.append(f"{where}: 'ignore' is {ignore[0]}, below label {max(values)}; the ignore label "
                                "must be the highest value (nnU-Net's rule)")
            else:
                by_value[ignore[0]] = IGNORE_NAME
        if problems:
            raise DatasetError(problems)
        return LabelScheme(dict(sorted(by_value.items())))
    regions = tuple(Region(n, tuple(sorted(set(v)))) for n, v in others.items() if n != BACKGROUND_NAME)
    order = [_as_int(v) for v in (regions_class_order or [])]
    if regions_class_order is None:
        problems.append(f"{where}: region-based labels need 'regions_class_order' (the label each region paints)")
    elif len(order) != len(regions) or any(v is None or v <= 0 for v in order):
        problems.append(f"{where}: 'regions_class_order' is {list(regions_class_order)}; it must hold one positive "
                        f"label value per region ({len(regions)}: {[r.name for r in regions]})")
    declared = {v for v in order if v is not None}
    for r in regions:
        undeclared = sorted(set(r.values) - declared)
        if 0 in r.values:
            problems.append(f"{where}: region {r.name!r} contains background (0)")
        elif undeclared and not problems:
            problems.append(f"{where}: region {r.name!r} names label(s) {undeclared} that no region paints "
                            f"(regions_class_order {list(regions_class_order or [])}); a prediction could never "
                            "hold them")
    values = sorted({0} | declared)
    if ignore is not None and not problems and ignore[0] <= max(values):
        problems.append(f"{where}: 'ignore' is {ignore[0]}, not above every label value {values}; the ignore "
                        "label must be the highest value (nnU-Net's rule)")
    if problems:
        raise DatasetError(problems)
    names = {v: (BACKGROUND_NAME if v == 0 else f"label_{v}") for v in values}
    if ignore is not None:
        names[ignore[0]] = IGNORE_NAME
    return LabelScheme(names, regions, tuple(int(v) for v in order if v is not None))


def scheme_from_values(labels: Mapping[int, str]) -> LabelScheme:
    """The scheme of an MSD-style ``value -> name`` labels dict: ordinary labels, an ``ignore`` name honoured."""
    scheme = LabelScheme(dict(sorted((int(k), str(v)) for k, v in labels.items())))
    ignore = scheme.ignore_label
    if ignore is not None and ignore != max(scheme.labels):
        raise DatasetError([f"label 'ignore' is {ignore}, below label {max(scheme.labels)}; the ignore label must "
                            "be the highest value (nnU-Net's rule)"])
    return scheme
