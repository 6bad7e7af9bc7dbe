"""nnUNetv2_train with a per-epoch split of where the training time goes, for the GPU speed comparison.

Usage: python nnunet_timed_training.py <nnUNetv2_train arguments>   (e.g. 4 3d_fullres 0 -tr nnUNetTrainer_10epochs)

nnU-Net's loop is `train_step(next(dataloader_train))` and train_step ends with `loss.detach().cpu()`, which
waits for the GPU, so the time inside `next()` is exactly the time the GPU sat idle waiting for the loader
and the rest of the epoch is compute. Printed next to nnU-Net's own log:
    timing: epoch <k> train <s> s, waiting for data <s> s, step <s> s      (each epoch)
    timing: peak GPU memory allocated <GB> GB                              (training and per-epoch validation;
                                                                            "n/a (cpu)" without CUDA)
    timing: loader workers running after training: train <n>, val <n>     (0 and 0: shut down before the final
                                                                            validation, as in plain nnU-Net)
torch.compile is nnU-Net's own decision (nnUNetTrainer._do_i_compile: env nnUNet_compile, default on for CUDA,
never on CPU); its log says "Using torch.compile..." when it compiles.
The trainer is patched at class level (no file added to the nnunetv2 package), so any -tr subclass is timed.
NNUNET_ITERATIONS (and NNUNET_VAL_ITERATIONS, default the same) override the iterations per epoch, for
rehearsals only.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from nnunetv2.run.run_training import run_training_entry
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _TimedIterator:
    """Delegates to nnU-Net's augmenter and adds up the time spent in next(). Only in place during training:
    on_train_end puts the augmenter back, because nnU-Net shuts its workers down only after an isinstance check
    on it."""

    def __init__(self, inner):
        self._inner = inner
        self.waited = 0.0

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self._inner)
        self.waited += time.perf_counter() - t0
        return batch

    def __iter__(self):
        return self

    def __getattr__(self, name):
        return getattr(self._inner, name)


_init = nnUNetTrainer.__init__
_on_train_start = nnUNetTrainer.on_train_start
_on_train_epoch_start = nnUNetTrainer.on_train_epoch_start
_on_train_epoch_end = nnUNetTrainer.on_train_epoch_end
_on_train_end = nnUNetTrainer.on_train_end


def __init__(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    iterations = os.environ.get("NNUNET_ITERATIONS")
    if iterations:
        self.num_iterations_per_epoch = int(iterations)
        self.num_val_iterations_per_epoch = int(os.environ.get("NNUNET_VAL_ITERATIONS") or iterations)


def on_train_start(self):
    _on_train_start(self)
    self.dataloader_train = _TimedIterator(self.dataloader_train)


def on_train_epoch_start(self):
    _on_train_epoch_start(self)
    self.dataloader_train.waited = 0.0
    self._timing_start = time.perf_counter()


def on_train_epoch_end(self, train_outputs):
    train_s = time.perf_counter() - self._timing_start
    wait = self.dataloader_train.waited
    print(f"timing: epoch {self.current_epoch} train {train_s:.2f} s, waiting for data {wait:.2f} s, "
          f"step {train_s - wait:.2f} s", flush=True)
    _on_train_epoch_end(self, train_outputs)


def on_train_end(self):
    # nnUNetTrainer.on_train_end calls _finish() only on a (NonDet)MultiThreadedAugmenter, by isinstance
    if isinstance(self.dataloader_train, _TimedIterator):
        self.dataloader_train = self.dataloader_train._inner
    # the peak over training and per-epoch validation, as medseg's timing.peak_gpu_memory_gb (over its fit)
    if self.device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(self.device) / 1e9:.3f} GB"
    else:
        peak = f"n/a ({self.device.type})"
    print(f"timing: peak GPU memory allocated {peak}", flush=True)
    _on_train_end(self)
    running = [len(getattr(dl, "_processes", None) or []) for dl in (self.dataloader_train, self.dataloader_val)]
    print(f"timing: loader workers running after training: train {running[0]}, val {running[1]}", flush=True)


nnUNetTrainer.__init__ = __init__
nnUNetTrainer.on_train_start = on_train_start
nnUNetTrainer.on_train_epoch_start = on_train_epoch_start
nnUNetTrainer.on_train_epoch_end = on_train_epoch_end
nnUNetTrainer.on_train_end = on_train_end

if __name__ == "__main__":
    sys.argv = ["nnUNetv2_train", *sys.argv[1:]]
    run_training_entry()
