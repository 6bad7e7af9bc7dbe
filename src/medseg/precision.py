"""Numeric precision and determinism decisions for the device a run uses, in one place for training and
prediction. The decisions are plain functions of facts about the device, so they are tested on CPU."""

from __future__ import annotations

import torch

# Lightning's precision names and the autocast dtype each runs under (None: no autocast, float32)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
    "32-true": None,
    "32": None,
}

# torch.cuda.is_bf16_supported() also counts emulated bf16 (pre-Ampere GPUs run it through float32 paths,
# far slower than fp16); bf16 tensor cores arrived with compute capability 8.0 (A100)
NATIVE_BF16_CAPABILITY = (8, 0)


def cuda_capability(device: torch.device | int | None = None) -> tuple[int, int] | None:
    """The CUDA device's compute capability, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def training_precision(device_type: str, capability: tuple[int, int] | None) -> str:
    """Lightning precision for ``trainer.precision=null``: bf16 autocast where the GPU has native bf16, fp16
    autocast with loss scaling on older GPUs (V100, T4), full float32 on the CPU (CPU autocast is slower than
    float32 on most CPUs and not what nnU-Net does there)."""
    if device_type != "cuda":
        return "32-true"
    if capability is not None and tuple(capability) >= NATIVE_BF16_CAPABILITY:
        return "bf16-mixed"
    return "16-mixed"


def inference_precision(trained_with: str | None, device_type: str, capability: tuple[int, int] | None) -> str:
    """Prediction runs under the precision the network was trained with where that is safe on the device it now
    runs on: mixed precision only on a GPU (bf16 only where native), float32 otherwise. Logits are always
    accumulated in float32 (see medseg.inference.sliding_window)."""
    if device_type != "cuda" or trained_with not in ("bf16-mixed", "16-mixed"):
        return "32-true"
    if trained_with == "bf16-mixed" and not (capability is not None and tuple(capability) >= NATIVE_BF16_CAPABILITY):
        return "16-mixed"
    return trained_with


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r}: expected one of {sorted(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[precision]


def deterministic_setting(requested: bool | str | None) -> bool | str:
    """``trainer.deterministic`` as Lightning takes it. ``true`` becomes "warn": torch then picks the
    deterministic implementation of every op that has one and warns for the few that have none on CUDA
    (NLLLoss's CUDA kernel, AvgPool3d's backward, float cumsum), where strict mode would raise mid-run."""
    if requested is True or (isinstance(requested, str) and requested.lower() in ("true", "warn")):
        return "warn"
    return False
