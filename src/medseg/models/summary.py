"""Model size, compute and memory at a patch size: ``summarize_model(model, patch_size, in_channels, batch_size)``.

Used by training logs and benchmarks to put one line of numbers next to a configuration:

- ``parameters``: ``sum(p.numel())`` over all parameters (trainable or not).
- ``gflops``: forward FLOPs for one batch, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one
  forward of zeros (model in eval mode, under ``torch.no_grad()``). A multiply-add counts as 2 FLOPs. The
  counter covers the ops it has formulas for (convolutions, transposed convolutions, matmuls, linear layers,
  attention); element-wise work (normalisation, activations, residual adds, the Mamba selective scan) is not
  counted, and neither are custom CUDA kernels (``mamba_ssm``), so run it on the CPU for comparable figures.
- ``activation_elements`` / ``activation_gb_estimate``: a rough peak activation memory for *training* at
  ``batch_size``: the elements of the input plus of every distinct tensor output by a leaf module (a module
  without children: conv, norm, activation, linear, ...) in that forward, times ``bytes_per_element`` (4,
  float32), in GB of 1e9 bytes. Rationale: backward keeps (nearly) every layer's output alive until the
  gradient reaches it, so at the end of the forward - the training peak - roughly all of them are resident at
  once. Outputs that share memory with an already-counted tensor (in-place activations such as
  ``LeakyReLU(inplace=True)``, ``Identity``, eval-mode ``Dropout``) are counted once; container modules are not
  counted (their output is a child's). Not counted: tensors made by functional code inside ``forward`` (``torch.cat``
  of skips, the mambapy scan states), extra buffers autograd saves (norm statistics, masks), deep-supervision
  heads that only run in training mode, weights, gradients and optimizer state. Treat it as an order-of-magnitude
  figure for comparing configurations, not an allocator prediction; under mixed precision divide by about 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelSummary:
    parameters: int
    gflops: float  # forward, whole batch, 2 FLOPs per multiply-add
    activation_elements: int  # input + distinct leaf-module outputs of one forward at batch_size
    activation_gb_estimate: float  # activation_elements * bytes_per_element / 1e9
    batch_size: int
    input_shape: tuple[int, ...]  # (batch, channels, *patch)
    bytes_per_element: int = 4

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        return (f"{self.parameters / 1e6:.2f} M params, {self.gflops:.2f} GFLOPs/batch, "
                f"~{self.activation_gb_estimate:.2f} GB activations (batch {self.batch_size}, "
                f"input {list(self.input_shape)})")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def summarize_model(model: nn.Module, patch_size: Sequence[int], in_channels: int, batch_size: int = 1,
                    bytes_per_element: int = 4, device: torch.device | str | None = None) -> ModelSummary:
    """Parameters, forward GFLOPs and an activation-memory estimate of ``model`` on a (batch_size, in_channels,
    *patch_size) input. Runs one forward on zeros on ``device`` (default: where the model's parameters are) in
    eval mode under ``torch.no_grad()``; the model's training mode is restored afterwards."""
    if batch_size < 1 or in_channels < 1 or not patch_size or any(int(s) < 1 for s in patch_size):
        raise ValueError(f"bad input: batch_size={batch_size}, in_channels={in_channels}, patch_size={patch_size}")
    device = torch.device(device) if device is not None else _device_of(model)
    shape = (int(batch_size), int(in_channels), *(int(s) for s in patch_size))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros(shape, device=device, dtype=dtype)

    seen: set[int] = {x.untyped_storage().data_ptr()}
    # keep counted outputs alive for the whole forward: a freed tensor's address may be reused by a later one,
    # which would then look like a duplicate (this holds roughly what training would hold anyway)
    alive: list[torch.Tensor] = [x]
    elements = [x.numel()]

    def hook(_module, _inputs, output):
        for t in tree_flatten(output)[0]:
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:  # in-place op or a view of something counted already
                continue
            seen.add(ptr)
            alive.append(t)
            elements[0] += t.numel()

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        flops = counter.get_total_flops()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        alive.clear()

    n = int(elements[0])
    return ModelSummary(parameters=count_parameters(model), gflops=flops / 1e9, activation_elements=n,
                        activation_gb_estimate=n * bytes_per_element / 1e9, batch_size=int(batch_size),
                        input_shape=shape, bytes_per_element=int(bytes_per_element))
