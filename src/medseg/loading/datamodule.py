"""LightningDataModule: random patch batches for training; for the per-epoch pseudo-Dice, a fixed budget of
validation patches (as nnU-Net) or, on request, whole preprocessed validation volumes.

Every process (DDP rank) draws its own batches: rank r takes its share of the plan's batch (the global batch
stays the plan's, whatever the number of GPUs, as nnU-Net splits it) and runs every iteration of the epoch.
Validation patches and volumes are split between the ranks without repeats, so each counts once."""

from __future__ import annotations

import dataclasses
import logging

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from medseg.loading.augmentation import (AugmentationSettings, apply_augmentation, augment_batch, draw_augmentation,
                                      sampling_patch_size)
from medseg.loading.previous_stage import CascadeInputs, PreviousSegmentations
from medseg.loading.sampling import place_patch
from medseg.loading.shared_memory import sized_loader
from medseg.errors import ConfigError
from medseg.preprocessing.cache import PreprocessedCache

log = logging.getLogger(__name__)


def _process_seed(offset: int) -> int:
    # Loader workers are seeded per worker and rank by Lightning; the main process (num_workers=0) is not,
    # so the DDP rank is mixed in there. ``offset`` (the step a resumed run starts at) keeps a resumed run
    # from replaying the first epoch's batches.
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return (torch.initial_seed() + 1_000_003 * rank + 7919 * offset) % 2**63


def batch_share(batch_size: int, num_foreground: int, rank: int, world_size: int) -> tuple[int, int]:
    """(samples, foreground-forced samples) of rank ``rank`` when the global batch is split over ``world_size``
    processes as nnU-Net splits it: contiguous slices of the batch (the first ranks take one more when it does
    not divide), the forced samples being the batch's last ``num_foreground``, wherever they fall."""
    if batch_size < world_size:
        raise ConfigError(f"batch size {batch_size} is smaller than the {world_size} processes it is split over; "
                          "raise sampling.batch_size or use fewer devices")
    sizes = [batch_size // world_size + (1 if r < batch_size % world_size else 0) for r in range(world_size)]
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    first_forced = batch_size - num_foreground
    return sizes[rank], max(0, stop - max(start, first_forced))


class CaseArrays:
    """Memory-mapped arrays of preprocessed cases, opened once per process."""

    def __init__(self, cache: PreprocessedCache):
        self.cache = cache
        self._arrays: dict = {}

    def __call__(self, case_id: str):
        if case_id not in self._arrays:
            self._arrays[case_id] = self.cache.load_arrays(case_id, mmap=True)
        return self._arrays[case_id]


def draw_patches(cases: CaseArrays, case_ids: list[str], size, batch_size: int, num_foreground: int,
                 rng: np.random.Generator, margin=None, groups: list[tuple[int, ...]] | None = None,
                 previous: PreviousSegmentations | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A batch of patches: image float32 (B, C, *size), label (B, 1, *size) as uint8 (an eighth of the bytes
    through shared memory and to the GPU) where the values allow, and the case ids. The last
    ``num_foreground`` samples are centred on foreground; ``margin``, ``groups``: see
    medseg.loading.sampling.sample_patch. ``previous`` (a cascade): the previous stage's label map of the same box
    as a second label channel, (B, 2, *size)."""
    images, labels, ids = [], [], []
    for k in range(batch_size):
        case_id = case_ids[rng.integers(len(case_ids))]
        data, label, locations = cases(case_id)
        where = place_patch(label, locations, size, rng, k >= batch_size - num_foreground, margin, groups)
        images.append(where.cut(data))
        y = where.cut(label)
        labels.append(y if previous is None else np.stack([y, where.cut(previous(case_id)).astype(y.dtype)]))
        ids.append(case_id)
    image = torch.from_numpy(np.stack(images).astype(np.float32, copy=False))
    stacked = np.stack(labels)
    label = torch.from_numpy(stacked.astype(np.uint8 if stacked.max() < 256 else np.int64))
    return image, label if previous is not None else label[:, None], ids


class _SplitBatches(Dataset):
    """Batches of patches whose global batch (and its foreground-centred share) is split across DDP ranks."""

    rank = 0

    def _set_batch(self, batch_size: int, oversample_foreground: float, drawn_size) -> None:
        self.global_batch_size = int(batch_size)
        self.global_num_foreground = int(round(self.global_batch_size * oversample_foreground))
        self.batch_size, self.num_foreground = self.global_batch_size, self.global_num_foreground
        self.drawn_size = [int(s) for s in drawn_size]

    def set_rank(self, rank: int, world_size: int) -> None:
        """This process's share of every batch (the whole batch without DDP)."""
        self.rank = rank
        self.batch_size, self.num_foreground = batch_share(self.global_batch_size, self.global_num_foreground,
                                                           rank, world_size)

    def batch_bytes(self, channels: int) -> int:
        """Bytes of one batch as it leaves a loader worker (float32 images at the drawn size, uint8 labels)."""
        return self.batch_size * int(np.prod(self.drawn_size)) * (4 * channels + 1)


class PatchBatches(_SplitBatches):
    """Item i is a whole batch, so the foreground-oversampled share is exact per batch (as nnU-Net):
    the last round(batch * oversample) samples are centred on foreground.

    With augmentation, patches are cut larger (room for rotation and scaling). ``augment_in_loader`` False
    leaves the augmentation to the device the batch goes to: the item is then a dict with the raw patches, every
    random parameter drawn here (one tensor, pinned and moved with the batch) and their plan (python data), and
    ``SegmentationDataModule.on_after_batch_transfer`` finishes it without a host-device sync.

    ``cascade``: the previous stage's label maps travel as a second label channel through the augmentation and
    leave as one-hot image channels, augmented (always in the loader: see medseg.loading.cascade_augmentation)."""

    def __init__(self, cache: PreprocessedCache, case_ids: list[str], patch_size, batch_size: int,
                 iterations: int, oversample_foreground: float, augmentation: AugmentationSettings | None,
                 augment_in_loader: bool = True, groups: list[tuple[int, ...]] | None = None,
                 cascade: CascadeInputs | None = None):
        if cascade is not None and not augment_in_loader:
            raise ValueError("a cascade's previous-stage channels are augmented in the loader")
        self.cache = cache
        self.groups = groups
        self.cascade = cascade
        self.case_ids = list(case_ids)
        self.patch_size = [int(p) for p in patch_size]
        self.iterations = int(iterations)
        self.augmentation = augmentation
        self.augment_in_loader = augment_in_loader
        self.sample_size = sampling_patch_size(self.patch_size, augmentation) if augmentation else self.patch_size
        # the room left for augmentation; nnU-Net lets random patches reach into it beyond the case's border
        self.margin = [s - p for s, p in zip(self.sample_size, self.patch_size)]
        self._set_batch(batch_size, oversample_foreground, self.sample_size)
        self.seed_offset = 0
        self._rng: np.random.Generator | None = None
        self._cases = CaseArrays(cache)

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, index: int):
        if self._rng is None:
            self._rng = np.random.default_rng(_process_seed(self.seed_offset))
        rng = self._rng
        cascade = self.cascade
        image, label, _ = draw_patches(self._cases, self.case_ids, self.sample_size, self.batch_size,
                                       self.num_foreground, rng, self.margin, self.groups,
                                       cascade.segmentations if cascade is not None else None)
        if self.augmentation is None:
            if cascade is not None:
                image, label = cascade.finish(image, label, None)
            return image, label.long()
        seed = int(rng.integers(2**62))
        if not self.augment_in_loader:
            # every random choice is made here, on the host: the parameters travel as one tensor, pinned and
            # copied with the batch, and the plan as python data (the class count read from these host labels)
            draw = draw_augmentation(seed, image.shape[0], image.shape[1], self.patch_size, self.augmentation,
                                     int(label.max()) + 1)
            return {"image": image, "label": label, "params": draw.params, "plan": draw.plan}
        image, label = augment_batch(image, label, self.patch_size, self.augmentation, seed)
        if cascade is not None:
            image, label = cascade.finish(image, label, np.random.default_rng([seed, 1]))
        return image, label.long()


class ValidationPatches(_SplitBatches):
    """The per-epoch pseudo-Dice's data, as nnU-Net's: ``iterations`` batches of patches (no augmentation,
    the training batch's foreground share) from the validation cases. Item i is the same patches every epoch
    (seeded by seed, rank and i), so epochs are compared on the same data; ranks draw different ones."""

    def __init__(self, cache: PreprocessedCache, case_ids: list[str], patch_size, batch_size: int,
                 iterations: int, oversample_foreground: float, seed: int = 0,
                 groups: list[tuple[int, ...]] | None = None, cascade: CascadeInputs | None = None):
        self.case_ids = list(case_ids)
        self.groups = groups
        self.cascade = cascade  # moved into the image, not augmented
        self.patch_size = [int(p) for p in patch_size]
        self._set_batch(batch_size, oversample_foreground, self.patch_size)
        self.iterations = int(iterations) if self.case_ids else 0
        self.seed = int(seed)
        self._cases = CaseArrays(cache)

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.rank, index])
        cascade = self.cascade
        image, label, ids = draw_patches(self._cases, self.case_ids, self.patch_size, self.batch_size,
                                         self.num_foreground, rng, groups=self.groups,
                                         previous=cascade.segmentations if cascade is not None else None)
        if cascade is not None:
            image, label = cascade.finish(image, label, None)
        return image, label.long(), ids


class Volumes(Dataset):
    """Whole preprocessed validation cases: (image (c, *shape), label (1, *shape), case id). Under DDP each
    rank takes every world_size-th case: no case is padded in twice. ``cascade``: the previous stage's one-hot
    channels appended to the image."""

    def __init__(self, cache: PreprocessedCache, case_ids: list[str], cascade: CascadeInputs | None = None):
        self.cache = cache
        self.cascade = cascade
        self.all_case_ids = list(case_ids)
        self.case_ids = list(case_ids)

    def set_rank(self, rank: int, world_size: int) -> None:
        self.case_ids = self.all_case_ids[rank::world_size]

    def batch_bytes(self, channels: int) -> int:
        """The largest case's float32 image and int64 label (memory-mapped: only the headers are read)."""
        voxels = [int(np.prod(self.cache.load_volume(c, mmap=True)[1].shape)) for c in self.case_ids]
        return max(voxels, default=0) * (4 * channels + 8)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int):
        case_id = self.case_ids[index]
        data, label = self.cache.load_volume(case_id, mmap=False)
        image, target = torch.from_numpy(data), torch.from_numpy(label.astype(np.int64))[None]
        if self.cascade is not None:
            previous = torch.from_numpy(np.asarray(self.cascade.segmentations(case_id), dtype=np.int64))
            image, _ = self.cascade.finish(image[None], torch.stack([target, previous[None]], 1), None)
            image = image[0]
        return image, target, case_id


VALIDATION_MODES = ("patches", "volumes")
TRAIN_PREFETCH = 4  # batches each training loader worker prepares ahead
VAL_PREFETCH = 2


class SegmentationDataModule(L.LightningDataModule):
    """``validation_mode``: "patches" (default; ``val_iterations`` batches of patches, as nnU-Net's 50) or
    "volumes" (sliding window over up to ``max_val_cases`` whole held-out cases: closer to the final score,
    but on large volumes it costs more than the epoch's training). ``cascade``: a cascade stage's previous-stage
    inputs (augmented for training only); ``num_channels`` then counts its one-hot channels too."""

    def __init__(self, cache: PreprocessedCache, train_ids: list[str], val_ids: list[str], patch_size,
                 batch_size: int, iterations_per_epoch: int = 250, oversample_foreground: float = 0.33,
                 num_workers: int = 0, max_val_cases: int | None = None,
                 augmentation: AugmentationSettings | None = None, augment_on_device: bool = False,
                 validation_mode: str = "patches", val_iterations: int = 50, seed: int = 0, num_channels: int = 1,
                 sampling_groups: list[tuple[int, ...]] | None = None, cascade: CascadeInputs | None = None):
        super().__init__()
        if validation_mode not in VALIDATION_MODES:
            raise ConfigError(f"validation.mode={validation_mode!r}: expected one of {list(VALIDATION_MODES)}")
        self.train_set = PatchBatches(cache, train_ids, patch_size, batch_size, iterations_per_epoch,
                                      oversample_foreground, augmentation, augment_in_loader=not augment_on_device,
                                      groups=sampling_groups, cascade=cascade)
        plain = dataclasses.replace(cascade, augmentation=None) if cascade is not None else None
        self.val_set: ValidationPatches | Volumes
        if validation_mode == "patches":
            self.val_set = ValidationPatches(cache, val_ids, patch_size, batch_size, val_iterations,
                                             oversample_foreground, seed, sampling_groups, plain)
        else:
            self.val_set = Volumes(cache, val_ids[:max_val_cases] if max_val_cases else val_ids, plain)
        self.num_workers = num_workers
        self.num_channels = num_channels

    def setup(self, stage: str) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        self.train_set.set_rank(rank, world)
        self.val_set.set_rank(rank, world)
        if world > 1:
            log.info("rank %d of %d: %d of the batch's %d samples (%d centred on foreground), all %d iterations",
                     rank, world, self.train_set.batch_size, self.train_set.global_batch_size,
                     self.train_set.num_foreground, self.train_set.iterations)

    def _loader(self, dataset: _SplitBatches | Volumes, workers: int, prefetch: int, what: str, **kwargs) -> DataLoader:
        plan = sized_loader(workers, prefetch, dataset.batch_bytes(self.num_channels), what)
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=plan.workers,
                          persistent_workers=plan.workers > 0, prefetch_factor=plan.prefetch, **kwargs)

    def train_dataloader(self):
        if self.trainer is not None:
            self.train_set.seed_offset = int(self.trainer.global_step)  # restored when resuming
        return self._loader(self.train_set, self.num_workers, TRAIN_PREFETCH, "training",
                            pin_memory=torch.cuda.is_available())

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # patches deferred by the loader are augmented here, on the training device, with the parameters that
        # came with them: nothing is copied to the device or read back, so the host runs ahead
        if isinstance(batch, dict):
            image, label = apply_augmentation(batch["image"], batch["label"], batch["plan"], batch["params"])
            return image, label.long()
        return batch

    def val_dataloader(self):
        return self._loader(self.val_set, min(self.num_workers, 2), VAL_PREFETCH, "validation",
                            pin_memory=torch.cuda.is_available())
