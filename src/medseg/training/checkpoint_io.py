"""Checkpoints written atomically and durably.

Lightning's own writer streams into the final path (through fsspec), so a job killed mid-write, or a full
disk, can leave a truncated ``last.ckpt`` that the next run would try to resume from. Here the checkpoint
goes to a unique temp file beside the target, is flushed to disk, and only then renamed over the target.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medseg.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported for local checkpoints")
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
