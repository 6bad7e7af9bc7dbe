"""LightningDataModule: random patch batches for training, whole preprocessed volumes for validation."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from medseg.data.augmentation import AugmentationSettings, augment_batch, sampling_patch_size
from medseg.data.sampling import sample_patch
from medseg.preprocessing.cache import PreprocessedCache


def _process_seed(offset: int) -> int:
    # Loader workers are seeded per worker and rank by Lightning; the main process (num_workers=0) is not,
    # so the DDP rank is mixed in there. ``offset`` (the step a resumed run starts at) keeps a resumed run
    # from replaying the first epoch's batches.
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (torch.initial_seed() + 1_000_003 * rank + 7919 * offset) % 2**63


class PatchBatches(Dataset):
    """Item i is a whole batch, so the foreground-oversampled share is exact per batch (as nnU-Net):
    the last round(batch * oversample) samples are centred on foreground.

    With augmentation, patches are cut larger (room for rotation and scaling). ``augment_in_loader`` False
    leaves the augmentation to the device the batch goes to: the item is then a dict with the raw patches
    and a seed, and ``SegmentationDataModule.on_after_batch_transfer`` finishes it."""

    def __init__(self, cache: PreprocessedCache, case_ids: list[str], patch_size, batch_size: int,
                 iterations: int, oversample_foreground: float, augmentation: AugmentationSettings | None,
                 augment_in_loader: bool = True):
        self.cache = cache
        self.case_ids = list(case_ids)
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = int(batch_size)
        self.iterations = int(iterations)
        self.num_foreground = int(round(self.batch_size * oversample_foreground))
        self.augmentation = augmentation
        self.augment_in_loader = augment_in_loader
        self.sample_size = sampling_patch_size(self.patch_size, augmentation) if augmentation else self.patch_size
        self.seed_offset = 0
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
            self._rng = np.random.default_rng(_process_seed(self.seed_offset))
        rng = self._rng
        images, labels = [], []
        for k in range(self.batch_size):
            data, label, locations = self._case(self.case_ids[rng.integers(len(self.case_ids))])
            force = k >= self.batch_size - self.num_foreground
            x, y = sample_patch(data, label, locations, self.sample_size, rng, force)
            images.append(x)
            labels.append(y)
        image = torch.from_numpy(np.stack(images).astype(np.float32, copy=False))
        labels = np.stack(labels)
        # labels travel as uint8 (an eighth of the bytes through shared memory and to the GPU)
        label = torch.from_numpy(labels.astype(np.uint8 if labels.max() < 256 else np.int64))[:, None]
        if self.augmentation is None:
            return image, label.long()
        seed = int(rng.integers(2**62))
        if not self.augment_in_loader:
            return {"image": image, "label": label, "seed": torch.tensor(seed)}
        image, label = augment_batch(image, label, self.patch_size, self.augmentation, seed)
        return image, label.long()


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
                 augmentation: AugmentationSettings | None = None, augment_on_device: bool = False):
        super().__init__()
        self.train_set = PatchBatches(cache, train_ids, patch_size, batch_size, iterations_per_epoch,
                                      oversample_foreground, augmentation, augment_in_loader=not augment_on_device)
        self.val_set = Volumes(cache, val_ids[:max_val_cases] if max_val_cases else val_ids)
        self.num_workers = num_workers

    def train_dataloader(self):
        if self.trainer is not None:
            self.train_set.seed_offset = int(self.trainer.global_step)  # restored when resuming
        workers = self.num_workers
        return DataLoader(self.train_set, batch_size=None, shuffle=False, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=4 if workers > 0 else None)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # patches deferred by the loader are augmented here, on the training device
        if isinstance(batch, dict):
            ts = self.train_set
            image, label = augment_batch(batch["image"], batch["label"], ts.patch_size, ts.augmentation,
                                         int(batch["seed"]))
            return image, label.long()
        return batch

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=None, shuffle=False, num_workers=min(self.num_workers, 2))
