"""Reading checkpoints as data only: ``torch.load`` with ``weights_only=True`` (tensors and plain containers),
so a checkpoint from elsewhere cannot run code when loaded, and every failure names the file."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from medseg.errors import CheckpointError


def load_weights_only(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """``torch.load`` restricted to tensors and plain data; every failure is a CheckpointError naming the file."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if found:
            raise CheckpointError(f"{path}: refused: the checkpoint holds a Python object ({found[1]}) rather than "
                                  "tensors and plain data; loading it could run code, so medseg loads weights only"
                                  ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint; it is truncated or damaged") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong format: reported, never executed
        text = " ".join(str(e).split()).split(". ")[0][:200]
        raise CheckpointError(f"{path}: not a readable checkpoint; it is truncated or damaged "
                              f"({type(e).__name__}: {text})") from None
