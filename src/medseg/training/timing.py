"""Cost figures of one fold, stored in metrics.json under ``timing`` for benchmark leaderboards.

- ``train_s``: wall seconds of ``trainer.fit`` in this process (data loading, per-epoch validation and
  checkpointing included). A resumed or extended fold times only the epochs run after the restart:
  ``epochs_timed`` says how many.
- ``epoch_s_median``: median whole-epoch seconds (per-epoch validation included); ``train_epoch_s_median``: the
  training part only; ``data_wait_epoch_s_median``: the part of that spent waiting for batches. All from the
  EpochSummary callback that every run has.
- ``peak_gpu_memory_gb``: ``torch.cuda.max_memory_allocated`` over the fit (1e9 bytes; null on CPU): tensors
  only, below what nvidia-smi shows (allocator cache, CUDA context).
- ``peak_rss_gb``: the training process's peak resident memory during the fit (Linux: VmHWM, reset before the
  fit; elsewhere getrusage's maximum over the process's life, so earlier cells of a sweep count); loader
  worker processes are not included.
- ``device``: "cpu" or the GPU's name.

validate_fold adds ``inference_s_per_case`` (mean) and ``inference_s_median``: seconds to predict one held-out
case from its loaded image (preprocessing, sliding window, mirroring, back to the input geometry).
"""

from __future__ import annotations

import resource
import statistics
import sys

import lightning as L
import torch

from medseg.training.callbacks import EpochSummary


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def reset_peak_memory() -> None:
    """Before the fit, so that the peaks are this fold's, not an earlier cell's of the same -m sweep process."""
    # not before CUDA is in use: resetting would create a CUDA context in a CPU run
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        # Linux >= 4.0: "5" resets the process's peak RSS (VmHWM) and nothing else
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gb() -> float:
    """Peak resident memory (VmHWM, reset by reset_peak_memory), else getrusage's lifetime maximum."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def fit_timing(trainer: L.Trainer, device: torch.device, fit_s: float, iterations_per_epoch: int) -> dict:
    # Lightning sets Trainer.callbacks in its callback connector without declaring it on the class
    summary = next((c for c in trainer.callbacks if isinstance(c, EpochSummary)), None)  # type: ignore[attr-defined]
    epoch_s = list(summary.epoch_seconds) if summary else []
    train_s = list(summary.train_seconds) if summary else []
    wait_s = list(summary.wait_seconds) if summary else []
    return {
        "train_s": float(fit_s),
        "epochs_timed": len(epoch_s),
        "epoch_s_median": _median(epoch_s),
        "train_epoch_s_median": _median(train_s),
        "data_wait_epoch_s_median": _median(wait_s),
        "iterations_per_epoch": int(iterations_per_epoch),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "peak_rss_gb": peak_rss_gb(),
        "device": device_name(device),
    }
