"""Callbacks: a plain one-line-per-epoch log (readable in SLURM logs, where progress bars are noise)."""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("medseg.train")


class EpochSummary(L.Callback):
    def __init__(self):
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        # runs after the epoch's validation, so both the training loss and validation Dice are current
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key in ("train/loss_epoch", "val/dice_mean"):
            if key in m:
                parts.append(f"{key} {float(m[key]):.4f}")
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        log.info(", ".join(parts))
