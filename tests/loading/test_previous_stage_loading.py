"""A cascade's loader: the previous stage is cut with the image's box and moved as a label through the spatial
transforms and mirroring, so a previous stage equal to the reference gives one-hot channels equal to the
reference's, for training batches, validation patches and whole validation volumes."""

from __future__ import annotations

import numpy as np
import torch

from medseg.loading.augmentation import nnunet_settings
from medseg.loading.cascade_augmentation import CascadeAugmentationSettings
from medseg.loading.datamodule import SegmentationDataModule
from medseg.loading.previous_stage import CascadeInputs, PreviousSegmentations
from medseg.preprocessing.cache import PreprocessedCache
from medseg.preprocessing.pipeline import class_locations
from medseg.preprocessing.previous_stage import write_previous_stage

SHAPE = (18, 20, 16)


def _cases(tmp_path, names, shift=0):
    cache = PreprocessedCache(tmp_path / "3d_fullres")
    files = {}
    for i, name in enumerate(names):
        rng = np.random.default_rng(i)
        seg = np.zeros(SHAPE, np.int8)
        seg[4:12, 5:14, 3:11] = 1
        seg[7:10, 8:11, 6:9] = 2
        image = (rng.normal(0, 1, SHAPE) + seg)[None].astype(np.float32)
        cache.write(name, "k", image, seg, class_locations(seg, [1, 2]), {"case_id": name})
        files[name] = tmp_path / "previous" / f"{name}.npy"
        write_previous_stage(files[name], np.roll(seg, shift, axis=0))
    return cache, files


def _onehot(label):
    return torch.cat([(label == 1).float(), (label == 2).float()], dim=1)


def test_the_previous_stage_moves_with_the_image_through_augmentation(tmp_path):
    cache, files = _cases(tmp_path, ["a", "b"])
    still = CascadeAugmentationSettings(p_binary_operator=0, p_remove_component=0)
    cascade = CascadeInputs(PreviousSegmentations(files), [1, 2], still)
    augmentation = nnunet_settings([12, 12, 12], p_rotation=1.0, p_scaling=1.0)
    dm = SegmentationDataModule(cache, ["a", "b"], ["b"], [12, 12, 12], 3, iterations_per_epoch=3,
                                augmentation=augmentation, validation_mode="volumes", num_channels=3,
                                cascade=cascade)
    dm.setup("fit")
    for image, label in dm.train_dataloader():
        assert image.shape == (3, 3, 12, 12, 12) and label.shape == (3, 1, 12, 12, 12)
        assert torch.equal(image[:, 1:], _onehot(label))  # rotated, scaled and mirrored alike
    (volume, target, case), = [dm.val_set[0]]
    assert case == "b" and volume.shape == (3, *SHAPE) and torch.equal(volume[1:], _onehot(target[None])[0])


def test_validation_patches_get_the_one_hot_channels_unaugmented(tmp_path):
    cache, files = _cases(tmp_path, ["a", "b"], shift=2)
    cascade = CascadeInputs(PreviousSegmentations(files), [1, 2])  # nnU-Net's augmentation: not for validation
    dm = SegmentationDataModule(cache, ["a"], ["b"], [12, 12, 12], 2, val_iterations=2, num_channels=3,
                                cascade=cascade)
    dm.setup("validate")
    for image, label, _ in dm.val_dataloader():
        assert image.shape == (2, 3, 12, 12, 12)
        # the previous stage is the reference shifted by 2 along the first axis: the same shift in every patch
        assert torch.equal(image[:, 1:, 2:], _onehot(label)[:, :, :-2])
