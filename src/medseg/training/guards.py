"""A NaN or infinite loss stops training with its epoch and step. On the CPU the check comes before the backward
pass, so the weights never see it; on an accelerator it is deferred (see FiniteGuard). Either way a checkpoint
of non-finite weights is never written, so ``last.ckpt`` stays the last good one (Lightning writes no
checkpoint when a run fails)."""

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
    (the host could no longer queue the next step while the device works), so each step's flag stays on the
    device and they are read together every ``device_check_every`` steps and at the end of each epoch. The
    message then names the first bad step and says that the optimizer may have applied it since; the checkpoint
    check below still keeps ``last.ckpt`` the last good one."""

    def __init__(self, checkpoint: str | Path | None = None, device_check_every: int = 25,
                 defer: bool | None = None):
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.defer = defer  # None: defer the check on accelerators only
        self.device_check_every = max(1, int(device_check_every))
        self._flags: list[torch.Tensor] = []  # one device flag per deferred step
        self._steps: list[int] = []  # their optimizer steps (host integers: no read needed)

    def _kept(self) -> str:
        if self.checkpoint is not None and self.checkpoint.is_file():
            return f"the last good checkpoint {self.checkpoint} is kept"
        return "no checkpoint had been written yet"

    @staticmethod
    def _where(trainer: L.Trainer, step: int | None = None) -> str:
        step = trainer.global_step if step is None else step
        return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, optimizer step {step}"

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        if not (self.defer if self.defer is not None else loss.device.type != "cpu"):
            if not self._agreed(trainer, bool(finite)):
                value = loss.detach().float().item() if loss.numel() == 1 else "NaN/Inf"
                raise NonFiniteError(f"training loss is {value} at {self._where(trainer)}; training stopped before "
                                     f"the weights were touched, {self._kept()}; {HINT}")
            return
        self._flags.append(finite)
        self._steps.append(int(trainer.global_step))
        if len(self._flags) >= self.device_check_every:
            self._flush(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: L.Trainer) -> None:
        if not self._flags:
            return
        flags, steps = torch.stack(self._flags).cpu(), self._steps  # one read for all the steps gathered
        self._flags, self._steps = [], []
        if self._agreed(trainer, bool(flags.all())):
            return
        bad = [s for s, ok in zip(steps, flags.tolist()) if not ok]
        first = bad[0] if bad else steps[0]  # another rank's loss was the bad one
        raise NonFiniteError(
            f"training loss was NaN/Inf at {self._where(trainer, first)} ({len(bad)} of the last {len(steps)} steps); "
            f"the check is deferred on accelerators (read every {self.device_check_every} steps), so the optimizer "
            f"may have applied it up to step {steps[-1]}; training stopped, {self._kept()}; {HINT}")

    @staticmethod
    def _agreed(trainer: L.Trainer, finite: bool) -> bool:
        # every process decides together: one rank stopping alone would leave the others waiting (DDP)
        return bool(trainer.strategy.reduce_boolean_decision(finite, all=True))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise NonFiniteError(f"weights {bad[0]}{more} are NaN or infinite at {self._where(trainer)}; the "
                                 f"checkpoint was not written, {self._kept()}; {HINT}")
