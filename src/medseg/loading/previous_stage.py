"""A cascade's previous-stage label maps in the loader: cut with the same box as the image, carried as a second label
channel through the spatial transforms and mirroring (moved as a segmentation, as nnU-Net does), then turned into
one-hot image channels (nnU-Net's MoveSegAsOneHotToDataTransform) and, for training, augmented
(medseg.loading.cascade_augmentation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medseg.loading.cascade_augmentation import CascadeAugmentationSettings, augment_previous_stage
from medseg.preprocessing.previous_stage import read_previous_stage


class PreviousSegmentations:
    """Memory-mapped previous-stage label maps (on the preprocessed grid) by case id, opened once per process."""

    def __init__(self, files: dict[str, Path]):
        self.files = {k: Path(v) for k, v in files.items()}
        self._arrays: dict[str, np.ndarray] = {}

    def __call__(self, case_id: str) -> np.ndarray:
        if case_id not in self._arrays:
            self._arrays[case_id] = read_previous_stage(self.files[case_id], mmap=True)
        return self._arrays[case_id]

    def __getstate__(self):  # loader workers open their own maps
        return {"files": self.files, "_arrays": {}}


def move_previous_to_image(image: torch.Tensor, label: torch.Tensor,
                           labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, C, *), label (B, 2, *) with the previous stage in channel 1 -> image (B, C + len(labels), *) with
    its one-hot channels appended, label (B, 1, *)."""
    values = torch.as_tensor(labels, dtype=label.dtype).view(1, -1, *([1] * (label.ndim - 2)))
    onehot = (label[:, 1:2] == values).to(image.dtype)
    return torch.cat([image, onehot], dim=1), label[:, :1]


@dataclass
class CascadeInputs:
    """What a cascade's loader adds: the previous stage's maps, the foreground labels they are one-hot encoded
    for, and the augmentation of those channels (None: none, as for validation patches)."""

    segmentations: PreviousSegmentations
    labels: list[int]
    augmentation: CascadeAugmentationSettings | None = field(default_factory=CascadeAugmentationSettings)

    @property
    def num_channels(self) -> int:
        return len(self.labels)

    def finish(self, image: torch.Tensor, label: torch.Tensor,
               rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """After the (spatial and intensity) augmentation: the previous stage moved into the image, augmented
        where ``rng`` is given."""
        image, label = move_previous_to_image(image, label, self.labels)
        if rng is not None and self.augmentation is not None:
            image = augment_previous_stage(image, self.num_channels, self.augmentation, rng)
        return image, label
