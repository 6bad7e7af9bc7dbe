"""Sliding-window prediction of one preprocessed volume (MONAI's inferer, Gaussian weighting) with optional
mirroring test-time augmentation.

The mirrored copies of a volume are independent forward passes, so they are grouped and scheduled:

- up to ``sw_batch_size`` windows go through the network together: a volume that fits in one window takes
  ceil(copies / sw_batch_size) passes instead of one inferer call per copy. Such a volume is padded as MONAI pads
  it and predicted without the inferer (one window: the Gaussian weights divide out), which is MONAI's result up
  to float rounding; larger volumes keep MONAI's inferer.
- on the CPU, small windows run in parallel streams, each with its share of torch's intra-op threads: two
  single-threaded passes side by side beat one pass on two threads (instance norm, activations and the small
  low-resolution convolutions scale poorly across threads). Streams are used only while their windows together
  stay within ``max(sw_batch_size windows, STREAM_VOXELS)``, so memory stays what sw_batch_size asks for on large
  patches.

The copies are summed in a fixed order, so results do not depend on the schedule beyond float rounding."""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import sliding_window_inference


SLICES_PER_PASS = 32  # 2D models on volumes: slices predicted together (bounded memory on large volumes)
STREAM_VOXELS = 1 << 18  # CPU: parallel streams while their windows total at most this (64^3) or sw_batch_size's


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, patch_size, overlap: float = 0.5,
                   mirror_axes: tuple[int, ...] | None = None, sw_batch_size: int = 4,
                   device: torch.device | None = None, autocast: torch.dtype | None = None) -> torch.Tensor:
    """image (c, *spatial) -> float32 logits (classes, *spatial), averaged over the mirrored copies. A 2D model
    on a 3D volume predicts it slice by slice along the first axis. ``autocast``: the network runs under
    autocast to that dtype (bf16/fp16, as in mixed-precision training); windows and copies are still summed in
    float32."""
    if len(patch_size) == image.ndim - 2:
        slices = [_predict(model, image[:, z:z + SLICES_PER_PASS].transpose(0, 1), patch_size, overlap,
                           mirror_axes, sw_batch_size, device, autocast)
                  for z in range(0, image.shape[1], SLICES_PER_PASS)]
        return torch.cat(slices, dim=0).transpose(0, 1)
    return _predict(model, image[None], patch_size, overlap, mirror_axes, sw_batch_size, device, autocast)[0]


def mirror_flips(mirror_axes, spatial_dims: int) -> list[tuple[int, ...]]:
    """Tensor dims to flip for each mirrored copy, the unflipped one first: every non-empty combination of the
    mirror axes that the model has (a 2D model mirrors its 2 axes)."""
    axes = [a + 2 for a in dict.fromkeys(mirror_axes or ()) if a < spatial_dims]
    return [()] + [c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k)]


def _predict(model: nn.Module, x: torch.Tensor, patch_size, overlap, mirror_axes, sw_batch_size,
             device, autocast: torch.dtype | None = None) -> torch.Tensor:
    """(batch, c, *spatial) -> (batch, classes, *spatial) float logits."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    x = x.to(device, torch.float32)
    patch = [int(p) for p in patch_size]
    sw_batch_size = max(1, int(sw_batch_size))
    flips = mirror_flips(mirror_axes, len(patch))
    single = all(s <= p for s, p in zip(x.shape[2:], patch))
    windows = 1 if single else math.prod(_num_windows(s, p, overlap) for s, p in zip(x.shape[2:], patch))
    # copies per group: fill the passes without holding more than ~sw_batch_size windows' worth of copies
    per_group = max(1, min(len(flips), math.ceil(sw_batch_size / (windows * x.shape[0]))))
    groups = [flips[i:i + per_group] for i in range(0, len(flips), per_group)]

    def run(group: list[tuple[int, ...]]) -> list[torch.Tensor]:
        # grad mode and autocast are per thread; MONAI's inferer sums windows into float32 buffers
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            copies = torch.cat([torch.flip(x, dims) if dims else x for dims in group])
            if single:
                out = _one_window(model, copies, patch, sw_batch_size)
            else:
                windowed = sliding_window_inference(copies, patch, sw_batch_size, model, overlap=overlap,
                                                    mode="gaussian", padding_mode="constant", cval=0.0)
                assert isinstance(windowed, torch.Tensor)  # the model returns one tensor in eval mode
                out = windowed
            return [torch.flip(o, dims) if dims else o for dims, o in zip(group, out.split(x.shape[0]))]

    group_voxels = per_group * x.shape[0] * math.prod(max(s, p) for s, p in zip(x.shape[2:], patch))
    streams = _cpu_streams(device, len(groups), group_voxels, max(sw_batch_size * math.prod(patch), STREAM_VOXELS))
    try:
        if streams > 1:
            threads = max(1, torch.get_num_threads() // streams)
            outputs = list(_stream_pool(streams, threads).map(run, groups))
        else:
            outputs = [run(g) for g in groups]
    finally:
        model.train(was_training)
    logits: torch.Tensor | None = None
    for o in itertools.chain.from_iterable(outputs):  # fixed order: the flips' order
        logits = o.float() if logits is None else logits.add_(o)
    assert logits is not None  # flips holds at least the unflipped copy
    if len(flips) > 1:
        logits /= len(flips)
    return logits


def _num_windows(size: int, patch: int, overlap: float) -> int:
    """Windows along one axis as MONAI places them (interval int(patch * (1 - overlap)), at least 1)."""
    if size <= patch:
        return 1
    interval = max(1, int(patch * (1 - overlap)))
    return math.ceil((size - patch) / interval) + 1


def _one_window(model: nn.Module, x: torch.Tensor, patch, sw_batch_size: int) -> torch.Tensor:
    """A volume no larger than the patch: padded to it as MONAI pads (constant 0, the odd voxel at the end),
    predicted in batches of sw_batch_size, cropped back."""
    pad = []
    for size, p in zip(reversed(x.shape[2:]), reversed(patch)):
        diff = p - size
        pad += [diff // 2, diff - diff // 2]
    xp = F.pad(x, pad) if any(pad) else x
    out = torch.cat([model(xp[i:i + sw_batch_size]) for i in range(0, xp.shape[0], sw_batch_size)])
    crop = [slice(None), slice(None)] + [slice(b, b + s) for b, s in zip(pad[-2::-2], x.shape[2:])]
    return out[tuple(crop)]


def _cpu_streams(device: torch.device, groups: int, group_voxels: int, budget_voxels: int) -> int:
    """Parallel streams for the groups: CPU only, at most one per intra-op thread, within the memory budget.
    Not under CPU autocast (autocast state is per thread)."""
    if device.type != "cpu" or groups < 2 or torch.is_autocast_enabled("cpu"):
        return 1
    return max(1, min(groups, torch.get_num_threads(), budget_voxels // max(1, group_voxels)))


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _stream_pool(streams: int, threads: int) -> ThreadPoolExecutor:
    """``streams`` worker threads with ``threads`` intra-op threads each, made once and kept. torch keeps the
    intra-op thread count per thread (OpenMP), but setting it also sets the default that threads take at their
    first use of torch: the caller's own count is restored once every worker has set its own."""
    key = (streams, threads)
    with _POOLS_LOCK:
        if key not in _POOLS:
            own = torch.get_num_threads()
            ready = threading.Barrier(streams)

            def init() -> None:
                torch.get_num_threads()  # a thread takes the default at its first use: take it now, then set
                torch.set_num_threads(threads)
                ready.wait()  # every worker is started (one task each below) before the default is restored

            pool = ThreadPoolExecutor(streams, thread_name_prefix="medseg-window", initializer=init)
            list(pool.map(lambda _: None, range(streams)))
            torch.set_num_threads(own)
            _POOLS[key] = pool
        return _POOLS[key]
