"""Training callbacks: a plain one-line-per-epoch log with timings (readable in SLURM logs, where progress bars
are noise), validation image overlays for TensorBoard, and the choice between a progress bar and plain lines."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("medseg.train")

PROGRESS_MODES = ("auto", "bar", "plain")
# a redraw per batch costs noticeable time when small 2D batches run at hundreds of it/s
BAR_REFRESH_RATE = 5


# ---- epoch summary ---------------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_rate(iterations: int, seconds: float) -> str:
    """Iterations per second, or seconds per iteration when slower than one a second ("0.0 it/s" says nothing)."""
    if iterations <= 0 or seconds <= 0:
        return "n/a it/s"
    rate = iterations / seconds
    return f"{rate:.1f} it/s" if rate >= 1 else f"{seconds / iterations:.1f} s/it"


class EpochSummary(Callback):
    """One log line per epoch: metrics, epoch and training-only time, iterations/s and the fold's ETA.

    `train_seconds[i]` is the training-only time of the i-th epoch run by this trainer (epoch start to the end
    of its last training batch, so validation is excluded); it is also logged as `time/train_epoch_s`.
    `wait_seconds[i]` is the part of it spent between batches (the loader's next batch, its transfer and
    device-side augmentation being queued), logged as `time/data_wait_epoch_s`: when it is a large share of the
    training time, the loader is the bottleneck. On a GPU the steps are asynchronous, so a step's kernels may
    still run while the next batch is fetched: the wait is the time the loop was blocked, not the loader's cost.
    """

    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self.epoch_seconds: list[float] = []
        self.wait_seconds: list[float] = []
        self._start = time.perf_counter()
        self._last_batch_end: float | None = None
        self._batches = 0
        self._wait = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._last_batch_end = None
        self._batches = 0
        self._wait = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Lightning calls this after fetching the batch and moving it to the device
        previous = self._last_batch_end if self._last_batch_end is not None else self._start
        self._wait += time.perf_counter() - previous

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # the epoch's validation starts after the last of these, so the last timestamp ends the training time
        self._last_batch_end = time.perf_counter()
        self._batches += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the epoch's validation, so both the training loss and validation Dice are current
        now = time.perf_counter()
        epoch_s = now - self._start
        train_s = (self._last_batch_end if self._last_batch_end is not None else now) - self._start
        self.epoch_seconds.append(epoch_s)
        self.train_seconds.append(train_s)
        self.wait_seconds.append(self._wait)
        # every rank logs, so that no rank waits on a collective the others skip
        pl_module.log("time/train_epoch_s", train_s, on_step=False, on_epoch=True, batch_size=1)
        pl_module.log("time/data_wait_epoch_s", self._wait, on_step=False, on_epoch=True, batch_size=1)
        if trainer.is_global_zero:
            log.info(self._line(trainer, epoch_s, train_s))

    def _line(self, trainer: L.Trainer, epoch_s: float, train_s: float) -> str:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        epoch = trainer.current_epoch + 1
        parts = [f"epoch {epoch}/{max_epochs}" if max_epochs else f"epoch {epoch}"]
        m = trainer.callback_metrics
        for key in ("train/loss_epoch", "val/dice_mean"):
            if key in m:
                parts.append(f"{key} {float(m[key]):.4f}")
        # batches actually run: equals trainer.num_training_batches for a whole epoch, and stays right when
        # that is infinite (iterable datasets) or an epoch is cut short
        timing = f"train {train_s:.1f} s"
        if self._batches and train_s > 0:
            timing += f", {format_rate(self._batches, train_s)}, waiting for data {self._wait:.1f} s"
        parts.append(f"{epoch_s:.1f} s ({timing})")
        if max_epochs:
            # the mean over the epochs this trainer has run, validation included: a resumed fold restarts it
            eta = (max_epochs - epoch) * float(np.mean(self.epoch_seconds))
            parts.append(f"ETA {format_duration(eta)}")
        return ", ".join(parts)


# ---- validation image overlays ---------------------------------------------------------------------------

# fixed class colours (RGB in [0, 1]) so a class looks the same in every image; classes beyond cycle
PALETTE = np.array([
    [0.90, 0.10, 0.10],  # red
    [0.10, 0.80, 0.10],  # green
    [0.15, 0.35, 1.00],  # blue
    [1.00, 0.85, 0.00],  # yellow
    [0.90, 0.00, 0.90],  # magenta
    [0.00, 0.85, 0.85],  # cyan
    [1.00, 0.50, 0.00],  # orange
    [0.55, 0.25, 0.85],  # purple
    [0.55, 0.85, 0.20],  # lime
    [0.65, 0.40, 0.20],  # brown
], dtype=np.float32)


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) colours; row 0 (background) is never drawn."""
    colours = np.zeros((max(num_classes, 1), 3), dtype=np.float32)
    for c in range(1, num_classes):
        colours[c] = PALETTE[(c - 1) % len(PALETTE)]
    return colours


def _foreground_per_slice(volume: np.ndarray | torch.Tensor) -> np.ndarray:
    # works on torch tensors where they are, so only the slice counts leave the GPU
    counts = (volume > 0).reshape(volume.shape[0], -1).sum(1)
    if isinstance(counts, torch.Tensor):
        counts = counts.cpu().numpy()
    return np.asarray(counts)


def pick_slice(label: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor | None = None) -> int:
    """Index along the first (axial) axis of the slice with the most foreground in `label`, else in `pred`,
    else the middle slice. Both are (z, y, x) label maps."""
    for volume in (label, pred):
        if volume is None:
            continue
        counts = _foreground_per_slice(volume)
        if counts.size and counts.max() > 0:
            return int(counts.argmax())
    return int(label.shape[0] // 2)


def rescale_intensity(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the [low, high] percentiles to [0, 1] and clip: robust to CT air and bright outliers."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return np.zeros_like(image)
    return np.clip((image - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)


def overlay(image_slice: np.ndarray, label_slice: np.ndarray, num_classes: int, alpha: float = 0.4) -> np.ndarray:
    """(H, W, 3) float RGB: the grey image (values in [0, 1]) with each foreground class alpha-blended in its
    colour. Values outside 1..num_classes-1 (background, ignore labels) stay grey."""
    grey = np.clip(np.asarray(image_slice, dtype=np.float32), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    label_slice = np.asarray(label_slice)
    mask = (label_slice > 0) & (label_slice < num_classes)
    colours = class_colours(num_classes)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colours[label_slice[mask].astype(np.int64)]
    return rgb


def overlay_panel(image_slice: np.ndarray, label_slice: np.ndarray, pred_slice: np.ndarray, num_classes: int,
                  alpha: float = 0.4) -> np.ndarray:
    """(H, 3W, 3) float: plain | label overlay | prediction overlay. `image_slice` is raw intensities."""
    grey = rescale_intensity(image_slice)
    plain = np.repeat(grey[..., None], 3, axis=-1)
    return np.concatenate([plain, overlay(grey, label_slice, num_classes, alpha),
                           overlay(grey, pred_slice, num_classes, alpha)], axis=1)


class ImageOverlays(Callback):
    """Logs plain | label | prediction images of one axial slice per validation case to TensorBoard.

    Reads the prediction from validation_step's `{"pred": (z, y, x) label map}`; the batch is
    `(image (C, z, y, x), label (1, z, y, x), case_id)`, or a batch of validation patches
    `(image (B, C, *patch), label (B, 1, *patch), case ids)` with predictions (B, *patch), of which the first is
    drawn. Only the first `max_cases` validation batches of every
    `every_n_epochs`-th epoch (and of the last epoch) are drawn, so the cost stays a few slices per epoch.
    """

    def __init__(self, every_n_epochs: int = 5, max_cases: int = 1, alpha: float = 0.4) -> None:
        if every_n_epochs < 0 or max_cases < 0:
            raise ValueError(f"every_n_epochs and max_cases must be >= 0, got {every_n_epochs}, {max_cases}")
        self.every_n_epochs = every_n_epochs
        self.max_cases = max_cases
        self.alpha = alpha

    def _due(self, trainer: L.Trainer) -> bool:
        if self.every_n_epochs == 0 or trainer.sanity_checking:
            return False
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx >= self.max_cases or not trainer.is_global_zero or not self._due(trainer):
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not isinstance(outputs, Mapping) or outputs.get("pred") is None:
            return
        image, label, case_id = batch
        pred = outputs["pred"].detach()
        if isinstance(case_id, (list, tuple)) and pred.ndim == image.ndim - 1:
            # a batch of validation patches (B, C, *patch): draw the first, as a volume of its slices
            image, label, pred, case_id = image[0], label[0], pred[0], f"{case_id[0]}/patch"
            if pred.ndim == 2:
                image, label, pred = image[:, None], label[:, None], pred[None]
        ndim = pred.ndim
        # tolerate a leading batch dimension of size 1
        while image.ndim > ndim + 1:
            image = image[0]
        while label.ndim > ndim:
            label = label[0]
        if isinstance(case_id, (list, tuple)):
            case_id = case_id[0]
        z = pick_slice(label.detach(), pred)
        image_slice = image[0, z].detach().float().cpu().numpy()
        label_slice = label[z].detach().cpu().numpy()
        pred_slice = pred[z].cpu().numpy()
        num_classes = getattr(pl_module, "num_classes", None)
        if num_classes is None:
            num_classes = int(max(label_slice.max(), pred_slice.max())) + 1
        panel = overlay_panel(image_slice, label_slice, pred_slice, int(num_classes), self.alpha)
        for logger in loggers:
            logger.experiment.add_image(f"val/overlay/{case_id}", panel, global_step=trainer.current_epoch,
                                        dataformats="HWC")


# ---- progress output and assembly ------------------------------------------------------------------------

class EpochProgressBar(TQDMProgressBar):
    """Lightning's bar, with the epoch counted as the log lines count it: "Epoch 1/6" for the first of six
    (Lightning's own bar says "Epoch 0")."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        epoch = trainer.current_epoch + 1
        self.train_progress_bar.set_description(f"Epoch {epoch}/{max_epochs}" if max_epochs else f"Epoch {epoch}")


def progress_callbacks(mode: str) -> tuple[list[Callback], bool]:
    """Progress callbacks and the Trainer's enable_progress_bar for mode "auto" | "bar" | "plain".

    "plain" relies on EpochSummary's lines; "auto" draws a bar only on an interactive terminal outside SLURM,
    where a redrawn bar would otherwise fill the job log."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {mode!r}")
    if mode == "auto":
        interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        mode = "bar" if interactive and "SLURM_JOB_ID" not in os.environ else "plain"
    if mode == "bar":
        return [EpochProgressBar(refresh_rate=BAR_REFRESH_RATE)], True
    return [], False


def build_callbacks(cfg: DictConfig | Mapping[str, Any] | None) -> tuple[list[Callback], bool]:
    """Callbacks from the `callbacks` config node, and the Trainer's enable_progress_bar.

    `checkpoint` is left to the caller (it needs the fold's directory); other unknown keys are reported."""
    if isinstance(cfg, DictConfig):
        cfg = cast("dict[str, Any] | None", OmegaConf.to_container(cfg, resolve=True))  # a mapping node: str keys
    cfg = dict(cfg or {})
    unknown = set(cfg) - {"checkpoint", "image_overlays", "progress"}
    if unknown:
        log.warning("ignoring unknown callbacks settings %s", sorted(unknown))
    callbacks: list[Callback] = [EpochSummary()]
    overlays = dict(cfg.get("image_overlays") or {})
    if int(overlays.get("every_n_epochs", 0) or 0) > 0:
        callbacks.append(ImageOverlays(**overlays))
    progress = cfg.get("progress", "auto")
    if isinstance(progress, bool):
        # YAML reads a bare true/false as a boolean
        progress = "bar" if progress else "plain"
    bar_callbacks, enable_progress_bar = progress_callbacks(str(progress))
    return callbacks + bar_callbacks, enable_progress_bar
