"""Training under faults: a NaN loss stops the run with its epoch and step and keeps the last good checkpoint
(which the same command then resumes from); a damaged or untrusted last.ckpt is refused before any data is
prepared, its payload never run; a bad dataset is refused before training; one run per fold folder, with
DDP's extra processes exempt. (SIGKILL mid-epoch and a full disk during a checkpoint write are covered by
tests/training/test_resume.py.)"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medseg.errors import CheckpointError, DatasetError, LockedError, NonFiniteError
from medseg.locking import exclusive
from medseg.training import run as run_module
from medseg.training.checkpoint_io import AtomicCheckpointIO
from medseg.training.guards import FiniteGuard
from medseg.training.module import SegmentationModule
from tests.conftest import compose, make_msd

SMALL_DATA = ["data.synthetic.num_train=6", "data.synthetic.num_test=0", "data.synthetic.shape=[20,24,16]"]
TINY = ["debug=fast", "planner.patch_size=[16,16,16]", "sampling.iterations_per_epoch=2", "trainer.max_epochs=3",
        "validation.final=false", "validation.max_cases_per_epoch=1", "callbacks.progress=plain",
        "callbacks.image_overlays.every_n_epochs=0", "num_processes=1"]


def _cfg(tmp_path: Path, *extra: str, data: list[str] = SMALL_DATA):
    return compose("train", [f"paths.data={tmp_path / 'data'}", f"paths.output={tmp_path / 'outputs'}",
                             f"paths.preprocessed={tmp_path / 'outputs' / 'preprocessed'}", *TINY, *data, *extra])


def _fold(tmp_path: Path) -> Path:
    return tmp_path / "outputs" / "synthetic" / "unet__dice_ce" / "fold_0"


def test_a_nan_loss_stops_training_keeps_the_last_good_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    step = SegmentationModule.training_step

    def nan_in_the_second_epoch(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        return loss * math.nan if self.current_epoch == 1 and batch_idx == 1 else loss

    monkeypatch.setattr(SegmentationModule, "training_step", nan_in_the_second_epoch)
    last = _fold(tmp_path) / "checkpoints" / "last.ckpt"
    with pytest.raises(NonFiniteError, match=rf"training loss is nan at epoch 2/3, optimizer step 3; training "
                                             rf"stopped before the weights were touched, the last good checkpoint "
                                             rf"{last} is kept"):
        run_module.train_fold(_cfg(tmp_path))
    monkeypatch.undo()
    kept = torch.load(last, weights_only=True)
    assert kept["epoch"] == 0 and kept["global_step"] == 2  # the end of the first epoch, not a NaN state
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())
    assert not (_fold(tmp_path) / "metrics.json").exists()
    assert not list(_fold(tmp_path).parent.glob(".fold_0.lock"))  # released on the way out
    # the same command continues from the kept checkpoint once the cause is gone
    run_module.train_fold(_cfg(tmp_path))
    assert torch.load(last, weights_only=True)["epoch"] == 2


def test_the_guard_never_lets_non_finite_weights_into_a_checkpoint(tmp_path):
    keep = tmp_path / "last.ckpt"
    keep.write_bytes(b"good")
    guard = FiniteGuard(keep)
    trainer = SimpleNamespace(current_epoch=4, max_epochs=10, global_step=1234)
    guard.on_save_checkpoint(trainer, None, {"state_dict": {"w": torch.ones(3), "n": torch.tensor(7)}})
    with pytest.raises(NonFiniteError, match=rf"weights model.b and 1 more are NaN or infinite at epoch 5/10, "
                                             rf"optimizer step 1234; the checkpoint was not written, the last good "
                                             rf"checkpoint {keep} is kept"):
        guard.on_save_checkpoint(trainer, None, {"state_dict": {"model.a": torch.ones(2),
                                                                "model.b": torch.tensor([1.0, math.inf]),
                                                                "model.c": torch.full((2,), math.nan)}})


def _payload_checkpoint(path: Path, marker: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "state_dict": {"model.w": torch.ones(2)}, "loops": Payload()}, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "untrusted"])
def test_a_damaged_or_untrusted_last_checkpoint_is_refused_before_anything_else(tmp_path, damage):
    ckpts = _fold(tmp_path) / "checkpoints"
    ckpts.mkdir(parents=True)
    marker = tmp_path / "payload_ran"
    if damage == "truncated":
        torch.save({"epoch": 3, "state_dict": {"model.w": torch.ones(1000)}}, ckpts / "last.ckpt")
        (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:3000])
        expected = "not a readable checkpoint; it is truncated or damaged"
    else:
        _payload_checkpoint(ckpts / "last.ckpt", marker)
        expected = r"refused: the checkpoint holds a Python object \(io.open\)"
    (ckpts / "best.ckpt").write_bytes(b"the best weights")
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    with pytest.raises(CheckpointError, match=rf"{ckpts / 'last.ckpt'}: {expected}"):
        run_module.train_fold(_cfg(tmp_path))
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # nothing moved, replaced or deleted
    assert not (tmp_path / "data").exists()  # refused before the data was even generated


def test_lightnings_resume_path_loads_weights_only(tmp_path):
    """trainer.fit(ckpt_path=...) reads through the Trainer's checkpoint IO plugin."""
    marker = tmp_path / "payload_ran"
    path = _payload_checkpoint(tmp_path / "last.ckpt", marker)
    io = AtomicCheckpointIO()
    with pytest.raises(CheckpointError, match=r"last.ckpt: refused"):
        io.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="weights_only=True only"):
        io.load_checkpoint(path, weights_only=False)
    assert not marker.exists()
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.ckpt")
    assert io.load_checkpoint(tmp_path / "ok.ckpt")["epoch"] == 1


def test_a_bad_dataset_is_refused_before_training_and_earlier_results_stay(tmp_path):
    from medseg.datasets.synthetic import make_case

    cases = {f"c{i}": make_case(np.random.default_rng(i), (20, 24, 16), (1.0, 1.0, 1.0)) for i in range(5)}
    image, label = cases["c2"]
    image = image.copy()
    image[1, 1, 1] = np.nan
    cases["c2"] = (image, label)
    root = make_msd(tmp_path / "Bad", cases)
    fold = tmp_path / "outputs" / "Bad" / "unet__dice_ce" / "fold_0"
    (fold / "validation").mkdir(parents=True)
    (fold / "validation" / "per_case.csv").write_text("earlier results\n")
    with pytest.raises(DatasetError, match=r"imagesTr/c2.nii.gz: image contains NaN or Inf values"):
        run_module.train_fold(_cfg(tmp_path, data=["data=msd", f"data.root={root}"]))
    assert sorted(p.relative_to(fold).as_posix() for p in fold.rglob("*")) == ["validation",
                                                                              "validation/per_case.csv"]
    assert (fold / "validation" / "per_case.csv").read_text() == "earlier results\n"


def test_one_training_run_per_fold_folder_and_ddp_ranks_take_no_lock(tmp_path, monkeypatch):
    run_dir = _fold(tmp_path).parent
    ran = []
    monkeypatch.setattr(run_module, "set_up_run", lambda cfg, fold: None)  # the lock is what is tested here
    monkeypatch.setattr(run_module, "_train_fold",
                        lambda cfg, setup, fold_dir: ran.append(os.environ.get("RANK")) or {"ok": 1})
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with exclusive(run_dir / ".fold_0.lock", run_dir / "fold_0", "training run"):
        with pytest.raises(LockedError, match=rf"{run_dir / 'fold_0'} is in use by another medseg process "
                                              rf"\(training run, pid {os.getpid()} on "):
            run_module.train_fold(_cfg(tmp_path))
        assert run_module.train_fold(_cfg(tmp_path, "fold=1")) == {"ok": 1}  # another fold is free
        monkeypatch.setenv("RANK", "1")  # an extra DDP process re-running the job under rank 0's lock
        assert run_module.train_fold(_cfg(tmp_path)) == {"ok": 1}
    assert ran == [None, "1"]
    monkeypatch.delenv("RANK")
    assert run_module.train_fold(_cfg(tmp_path)) == {"ok": 1}


def test_on_an_accelerator_the_guard_reads_the_flags_back_only_every_n_steps():
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
    trainer = SimpleNamespace(current_epoch=0, max_epochs=2, global_step=0, strategy=strategy)
    guard = FiniteGuard(None, device_check_every=3, defer=True)
    guard.on_before_backward(trainer, None, torch.tensor(1.0))
    trainer.global_step = 1
    guard.on_before_backward(trainer, None, torch.tensor(math.nan))  # gathered, not read yet
    trainer.global_step = 2
    # the message names the step the NaN came from, and does not claim the weights were spared
    with pytest.raises(NonFiniteError, match=r"training loss was NaN/Inf at epoch 1/2, optimizer step 1 \(1 of the "
                                             r"last 3 steps\); the check is deferred on accelerators \(read every 3 "
                                             r"steps\), so the optimizer may have applied it up to step 2; training "
                                             r"stopped, no checkpoint had been written yet") as caught:
        guard.on_before_backward(trainer, None, torch.tensor(1.0))
    assert "before the weights" not in str(caught.value)
    # a NaN in an epoch's last steps is caught at the epoch's end
    guard.on_before_backward(trainer, None, torch.tensor(math.inf))
    with pytest.raises(NonFiniteError):
        guard.on_train_epoch_end(trainer, None)
    guard.on_before_backward(trainer, None, torch.tensor(1.0))
    guard.on_train_epoch_end(trainer, None)  # finite: nothing raised
