"""nnUNetv2_train with a per-epoch split of where the training time goes, for the GPU speed comparison.

Usage: python nnunet_timed_training.py <nnUNetv2_train arguments>   (e.g. 4 3d_fullres 0 -tr nnUNetTrainer_10epochs)

nnU-Net's loop is `train_step(next(dataloader_train))` and train_step ends with `loss.detach().cpu()`, which
waits for the GPU, so the time inside `next()` is exactly the time the GPU sat idle waiting for the loader
and the rest of the epoch is compute. Each epoch prints one line
`timing: epoch <k> train <s> s, waiting for data <s> s, step <s> s` next to nnU-Net's own log.
The trainer is patched at class level (no file added to the nnunetv2 package), so any -tr subclass is timed.
"""

from __future__ import annotations

import sys
import time

from nnunetv2.run.run_training import run_training_entry
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _TimedIterator:
    """Delegates to nnU-Net's augmenter (its _finish() etc. still work) and adds up the time spent in next()."""

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


_on_train_start = nnUNetTrainer.on_train_start
_on_train_epoch_start = nnUNetTrainer.on_train_epoch_start
_on_train_epoch_end = nnUNetTrainer.on_train_epoch_end


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


nnUNetTrainer.on_train_start = on_train_start
nnUNetTrainer.on_train_epoch_start = on_train_epoch_start
nnUNetTrainer.on_train_epoch_end = on_train_epoch_end

if __name__ == "__main__":
    sys.argv = ["nnUNetv2_train", *sys.argv[1:]]
    run_training_entry()
