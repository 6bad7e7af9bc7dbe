"""The per-epoch pseudo-Dice from validation patches: true/false positives/negatives summed over every patch of
every batch (nnU-Net's online evaluation), kept on the device until the epoch ends; overlays from patches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from medseg.training.callbacks import ImageOverlays
from medseg.training.module import SegmentationModule, confusion_counts


def _reference_counts(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, voxel by voxel, without vectorised class comparisons."""
    out = np.zeros((3, num_classes - 1))
    for p, r in zip(pred.ravel(), ref.ravel()):
        if p == r and p > 0:
            out[0, p - 1] += 1
        else:
            if p > 0:
                out[1, p - 1] += 1
            if r > 0:
                out[2, r - 1] += 1
    return out


def test_confusion_counts_over_a_batch_match_a_voxelwise_count():
    g = torch.Generator().manual_seed(0)
    pred, ref = torch.randint(0, 4, (3, 5, 6, 4), generator=g), torch.randint(0, 4, (3, 5, 6, 4), generator=g)
    counts = confusion_counts(pred, ref, [(1,), (2,), (3,)])
    assert counts.shape == (3, 3) and counts.dtype == torch.float64
    assert np.array_equal(counts.numpy(), _reference_counts(pred.numpy(), ref.numpy(), 4))


class _ValidationPatches(Dataset):
    """Batches as medseg's ValidationPatches gives them: (image (B, C, *patch), label (B, 1, *patch), ids)."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        label = torch.zeros(2, 1, 8, 12, 10, dtype=torch.long)
        label[:, :, 2:6, 3:9, 2:7] = 1
        label[:, :, 3:5, 4:6, 3:5] = 2
        return torch.randn(2, 1, 8, 12, 10, generator=g) + label.float(), label, [f"case_{i}", f"case_{i + 1}"]


class _Train(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        image, label, _ = _ValidationPatches()[i]
        return image, label


def test_a_fit_scores_the_patches_once_each_and_draws_them(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    loss = lambda out, ref: torch.nn.functional.cross_entropy(out, ref[:, 0])  # noqa: E731
    module = SegmentationModule(net, loss, 3, [8, 12, 10], torch.optim.SGD)
    module.configure_optimizers = lambda: torch.optim.SGD(net.parameters(), lr=0.0)  # weights stay put
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[ImageOverlays(every_n_epochs=1, max_cases=1)])
    trainer.fit(module, DataLoader(_Train(), batch_size=None), DataLoader(_ValidationPatches(), batch_size=None))
    with torch.no_grad():
        batches = [_ValidationPatches()[i] for i in range(3)]
        preds = [net(image).argmax(1).numpy() for image, _, _ in batches]
    expected = sum(_reference_counts(p, label[:, 0].numpy(), 3) for p, (_, label, _) in zip(preds, batches))
    tp, fp, fn = expected
    dice = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    metrics = trainer.callback_metrics
    assert np.allclose([float(metrics["val/dice_class1"]), float(metrics["val/dice_class2"])], dice, atol=1e-6)
    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["val/overlay/case_0/patch"]
    image = events.Images("val/overlay/case_0/patch")[0]
    assert (image.height, image.width) == (12, 3 * 10)  # a slice of the first patch: plain | label | prediction
