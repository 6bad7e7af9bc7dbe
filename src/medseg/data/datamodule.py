"""LightningDataModule: random patch batches for training, whole preprocessed volumes for validation."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medseg.data.augmentation import AugmentationSettings, augment_batch
from medseg.data.sampling import sample_patch
from medseg.preprocessing.cache import PreprocessedCache


def _process_seed() -> int:
    # differs per loader worker and per epoch (torch seeds each worker from the main generator)
    return torch.initial_seed() % 2**63


class PatchBatches(Dataset):
    """Item i is a whole batch, so the foreground-oversampled share is exact per batch (as nnU-Net):
    the last round(batch * oversample) samples are centred on foreground."""

    def __init__(self, cache: PreprocessedCache, case_ids: list[str], patch_size, batch_size: int,
                 iterations: int, oversample_foreground: float, augmentation: AugmentationSettings | None):
        self.cache = cache
        self.case_ids = list(case_ids)
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = int(batch_size)
        self.iterations = int(iterations)
        self.num_foreground = int(round(self.batch_size * oversample_foreground))
        self.augmentation = augmentation
        self._rng: np.random.Generator | None = None
        self._arrays: dict = {}

    def __len__(self) -> int:
        return self.iterations

    def _case(self, case_id: str):
        if case_id not in self._arrays:
            self._arrays[case_id] = self.cache.load_arrays(case_id, mmap=True)
        return self._arrays[case_id]

    def __getitem__(self, index: int):
        if self._rng is None:
            self._rng = np.random.default_rng(_process_seed())
        rng = self._rng
        images, labels = [], []
        for k in range(self.batch_size):
            data, label, locations = self._case(self.case_ids[rng.integers(len(self.case_ids))])
            force = k >= self.batch_size - self.num_foreground
            x, y = sample_patch(data, label, locations, self.patch_size, rng, force)
            images.append(x)
            labels.append(y)
        image = torch.from_numpy(np.stack(images).astype(np.float32))
        label = torch.from_numpy(np.stack(labels).astype(np.int64))[:, None]
        if self.augmentation is not None:
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            image, label = augment_batch(image, label, self.augmentation, g)
        return image, label


class Volumes(Dataset):
    """Whole preprocessed validation cases: (image (c, *shape), label (1, *shape), case id)."""

    def __init__(self, cache: PreprocessedCache, case_ids: list[str]):
        self.cache = cache
        self.case_ids = list(case_ids)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int):
        data, label = self.cache.load_volume(self.case_ids[index], mmap=False)
        return torch.from_numpy(data), torch.from_numpy(label.astype(np.int64))[None], self.case_ids[index]


class SegmentationDataModule(L.LightningDataModule):
    def __init__(self, cache: PreprocessedCache, train_ids: list[str], val_ids: list[str], patch_size,
                 batch_size: int, iterations_per_epoch: int = 250, oversample_foreground: float = 0.33,
                 num_workers: int = 0, max_val_cases: int | None = None,
                 augmentation: AugmentationSettings | None = None):
        super().__init__()
        augmentation = augmentation or AugmentationSettings(mirror_axes=tuple(range(len(patch_size))))
        self.train_set = PatchBatches(cache, train_ids, patch_size, batch_size, iterations_per_epoch,
                                      oversample_foreground, augmentation)
        self.val_set = Volumes(cache, val_ids[:max_val_cases] if max_val_cases else val_ids)
        self.num_workers = num_workers

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=None, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=None, shuffle=False, num_workers=min(self.num_workers, 2))
