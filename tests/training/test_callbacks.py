"""Training callbacks: overlay drawing, slice choice, TensorBoard images from a real fit, progress modes and the
per-epoch summary line."""

from __future__ import annotations

import logging
import time
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from medseg.training.callbacks import (EpochProgressBar, EpochSummary, ImageOverlays, build_callbacks, class_colours,
                                       overlay, overlay_panel, pick_slice, progress_callbacks, rescale_intensity)

CONFIG = Path(__file__).resolve().parents[2] / "src" / "medseg" / "configs" / "callbacks" / "default.yaml"
SHAPE = (6, 8, 10)  # z, y, x


# ---- pure functions --------------------------------------------------------------------------------------

def test_overlay_colours_exactly_the_labelled_pixels():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (8, 10)).astype(np.float32)
    label = np.zeros((8, 10), dtype=np.int64)
    label[2:4, 3:7] = 1
    label[6, 1:3] = 2
    label[0, 0] = 255  # an ignore label stays grey
    rgb = overlay(image, label, num_classes=3, alpha=0.4)

    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.float32
    grey = np.repeat(image[..., None], 3, axis=-1)
    changed = np.any(~np.isclose(rgb, grey), axis=-1)
    np.testing.assert_array_equal(changed, (label == 1) | (label == 2))
    colours = class_colours(3)
    for c in (1, 2):
        m = label == c
        np.testing.assert_allclose(rgb[m], 0.6 * grey[m] + 0.4 * colours[c], rtol=1e-6)
    assert not np.allclose(colours[1], colours[2])
    assert rgb.min() >= 0 and rgb.max() <= 1


def test_overlay_panel_is_plain_label_prediction_side_by_side():
    image = np.linspace(-1000, 1000, 80, dtype=np.float32).reshape(8, 10)
    label = np.zeros((8, 10), dtype=np.int64)
    label[1:3, 1:3] = 1
    pred = np.zeros_like(label)
    pred[5:7, 5:9] = 1
    panel = overlay_panel(image, label, pred, num_classes=2)

    assert panel.shape == (8, 30, 3) and panel.dtype == np.float32
    plain, with_label, with_pred = panel[:, :10], panel[:, 10:20], panel[:, 20:]
    assert np.all(plain[..., 0] == plain[..., 1]) and np.all(plain[..., 0] == plain[..., 2])
    assert np.array_equal(np.any(with_label != plain, axis=-1), label > 0)
    assert np.array_equal(np.any(with_pred != plain, axis=-1), pred > 0)


def test_rescale_intensity_uses_robust_percentiles():
    image = np.zeros(1000, dtype=np.float32)
    image[:] = np.linspace(0, 1, 1000)
    image[0], image[-1] = -1e6, 1e6  # outliers do not squash the range
    out = rescale_intensity(image)
    assert out.min() == 0 and out.max() == 1
    assert 0.45 < out[500] < 0.55
    assert np.all(rescale_intensity(np.full((4, 4), 7.0)) == 0)  # a constant image does not divide by zero


def test_pick_slice_prefers_label_then_prediction_then_middle():
    label = np.zeros(SHAPE, dtype=np.int64)
    pred = np.zeros(SHAPE, dtype=np.int64)
    assert pick_slice(label, pred) == SHAPE[0] // 2
    assert pick_slice(label) == SHAPE[0] // 2
    pred[1, :2, :2] = 1
    assert pick_slice(label, pred) == 1
    label[4, :3, :3] = 2
    label[2, :2, :2] = 1
    assert pick_slice(label, pred) == 4
    # torch tensors give the same answer (counted where they live)
    assert pick_slice(torch.from_numpy(label), torch.from_numpy(pred)) == 4


# ---- a tiny real fit ---------------------------------------------------------------------------------------

def _volume(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, *SHAPE, dtype=torch.int64)
    label[0, 2 + seed, 2:6, 3:8] = 1
    image = torch.randn(1, *SHAPE, generator=g) + 2.0 * label.float()
    return image, label


class _Patches(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        image, label = _volume(i % 2)
        return image, label


class _Cases(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        image, label = _volume(i)
        return image, label, f"case_{i}"


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 2
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def training_step(self, batch, batch_idx):
        image, label = batch
        loss = nn.functional.cross_entropy(self.conv(image), label[:, 0])
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        image, label, _ = batch
        pred = self.conv(image[None])[0].argmax(0)
        self.log("val/dice_mean", (pred == label[0]).float().mean(), batch_size=1)
        return {"pred": pred}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path: Path, callbacks: list, max_epochs: int) -> Path:
    torch.manual_seed(0)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, num_sanity_val_steps=1)
    trainer.fit(_Tiny(), DataLoader(_Patches(), batch_size=2), DataLoader(_Cases(), batch_size=None))
    return Path(logger.log_dir)


def _events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_image_overlays_and_epoch_summary_in_a_real_fit(tmp_path, caplog):
    summary = EpochSummary()
    with caplog.at_level(logging.INFO, logger="medseg.train"):
        log_dir = _fit(tmp_path, [ImageOverlays(every_n_epochs=1, max_cases=2), summary], max_epochs=2)
    events = _events(log_dir)

    tags = sorted(events.Tags()["images"])
    assert tags == ["val/overlay/case_0", "val/overlay/case_1"]
    for tag in tags:
        images = events.Images(tag)
        # the sanity check draws nothing: one image per epoch
        assert [im.step for im in images] == [0, 1]
        assert all((im.height, im.width) == (SHAPE[1], 3 * SHAPE[2]) for im in images)

    assert len(summary.train_seconds) == 2 and all(s > 0 for s in summary.train_seconds)
    assert all(t <= e for t, e in zip(summary.train_seconds, summary.epoch_seconds))
    assert len(events.Scalars("time/train_epoch_s")) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "medseg.train"]
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2, ") and lines[1].startswith("epoch 2/2, ")
    assert all(("it/s" in line or "s/it" in line) and "ETA" in line and "train " in line for line in lines)
    assert all("train/loss_epoch" in line and "val/dice_mean" in line for line in lines)


class _SlowPatches(_Patches):
    """Each sample takes 50 ms to load, so an epoch of 2 batches of 2 waits at least 0.2 s for data."""

    def __getitem__(self, i):
        time.sleep(0.05)
        return super().__getitem__(i)


def test_epoch_summary_separates_waiting_for_data(tmp_path, caplog):
    fast, slow = EpochSummary(), EpochSummary()
    for summary, patches in ((fast, _Patches()), (slow, _SlowPatches())):
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[summary],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        with caplog.at_level(logging.INFO, logger="medseg.train"):
            trainer.fit(_Tiny(), DataLoader(patches, batch_size=2))
    assert slow.wait_seconds[0] >= 0.2 and slow.wait_seconds[0] <= slow.train_seconds[0]
    assert fast.wait_seconds[0] < 0.2
    lines = [r.getMessage() for r in caplog.records if r.name == "medseg.train"]
    assert len(lines) == 2 and all("waiting for data" in line for line in lines)


def test_image_overlays_every_n_epochs_and_max_cases(tmp_path):
    # every 2nd epoch (epoch index 1) plus the last one (index 2), first case only
    log_dir = _fit(tmp_path, [ImageOverlays(every_n_epochs=2, max_cases=1)], max_epochs=3)
    events = _events(log_dir)
    assert events.Tags()["images"] == ["val/overlay/case_0"]
    assert [im.step for im in events.Images("val/overlay/case_0")] == [1, 2]


# ---- progress modes and assembly -------------------------------------------------------------------------

class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_callbacks_modes(monkeypatch):
    assert progress_callbacks("plain") == ([], False)
    bar, enabled = progress_callbacks("bar")
    assert enabled and len(bar) == 1 and isinstance(bar[0], TQDMProgressBar)
    with pytest.raises(ValueError):
        progress_callbacks("fancy")

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    assert progress_callbacks("auto")[1] is True
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert progress_callbacks("auto") == ([], False)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert progress_callbacks("auto") == ([], False)


def test_build_callbacks_from_the_default_config(monkeypatch):
    cfg = OmegaConf.load(CONFIG)
    assert OmegaConf.to_container(cfg.checkpoint) == {"monitor": "val/dice_mean", "mode": "max"}
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    callbacks, enabled = build_callbacks(cfg)
    assert enabled is False
    assert [type(c) for c in callbacks] == [EpochSummary, ImageOverlays]
    assert (callbacks[1].every_n_epochs, callbacks[1].max_cases) == (5, 2)

    cfg.image_overlays.every_n_epochs = 0
    cfg.progress = "bar"
    callbacks, enabled = build_callbacks(cfg)
    assert enabled is True
    assert [type(c) for c in callbacks] == [EpochSummary, EpochProgressBar]  # a TQDMProgressBar, epochs from 1

    callbacks, enabled = build_callbacks({"progress": "plain"})
    assert [type(c) for c in callbacks] == [EpochSummary] and enabled is False
