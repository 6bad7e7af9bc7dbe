"""Checkpoints written atomically and durably, and read as data only.

Lightning's own writer streams into the final path (through fsspec), so a job killed mid-write, or a full
disk, can leave a truncated ``last.ckpt`` that the next run would try to resume from. Here the checkpoint
goes to a unique temp file beside the target, is flushed to disk, and only then renamed over the target.
Reading (resume) unpickles tensors and plain data only (``weights_only``): a checkpoint from elsewhere cannot
run code, and a damaged one is refused with its path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medseg.atomic import atomic_path
from medseg.checkpoint import load_weights_only
from medseg.errors import CheckpointError, WriteError


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported for local checkpoints")
        try:
            with atomic_path(Path(path)) as tmp:
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise WriteError(f"{path}: cannot write checkpoint ({e.strerror or e}); the previous one is kept") from e

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(f"{path}: medseg loads checkpoints with weights_only=True only")
        return load_weights_only(path, map_location)
