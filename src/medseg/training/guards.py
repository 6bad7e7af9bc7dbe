"""A NaN or infinite loss stops training with its epoch and step, before the backward pass can spread it into
the weights; a checkpoint of non-finite weights is never written, so ``last.ckpt`` stays the last good one
(Lightning writes no checkpoint when a run fails)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from medseg.errors import NonFiniteError

HINT = "lower the learning rate, check the data, or train in 32-bit precision (trainer.precision=32-true)"


class FiniteGuard(Callback):
    """On an accelerator, reading the loss's finiteness back to the host every step would stall the pipeline
    (the host could no longer queue the next step while the device works), so the flags are gathered on the
    device and read every ``device_check_every`` steps and at the end of each epoch; a NaN may then reach the
    weights for a few steps, but the checkpoint check below still keeps ``last.ckpt`` the last good one."""

    def __init__(self, checkpoint: str | Path | None = None, device_check_every: int = 25,
                 defer: bool | None = None):
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.defer = defer  # None: defer the check on accelerators only
        self.device_check_every = max(1, int(device_check_every))
        self._pending: torch.Tensor | None = None
        self._steps = 0

    def _kept(self) -> str:
        if self.checkpoint is not None and self.checkpoint.is_file():
            return f"the last good checkpoint {self.checkpoint} is kept"
        return "no checkpoint had been written yet"

    @staticmethod
    def _where(trainer: L.Trainer) -> str:
        return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, optimizer step {trainer.global_step}"

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        if not (self.defer if self.defer is not None else loss.device.type != "cpu"):
            self._decide(trainer, bool(finite), loss, "before the weights were touched")
            return
        self._pending = finite if self._pending is None else self._pending & finite
        self._steps += 1
        if self._steps % self.device_check_every == 0:
            self._flush(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: L.Trainer) -> None:
        if self._pending is not None:
            finite, self._pending = bool(self._pending), None
            self._decide(trainer, finite, None, f"(checked on the device every {self.device_check_every} steps)")

    def _decide(self, trainer: L.Trainer, finite: bool, loss: torch.Tensor | None, how: str) -> None:
        # every process decides together: one rank stopping alone would leave the others waiting (DDP)
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        value = loss.detach().float().item() if loss is not None and loss.numel() == 1 else "NaN/Inf"
        raise NonFiniteError(f"training loss is {value} at {self._where(trainer)}; training stopped {how}, "
                             f"{self._kept()}; {HINT}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise NonFiniteError(f"weights {bad[0]}{more} are NaN or infinite at {self._where(trainer)}; the "
                                 f"checkpoint was not written, {self._kept()}; {HINT}")
