"""Bisection against nnU-Net's own training: nnunetv2's nnUNetTrainer (its loop, validation and export) with one
or more of its parts replaced by medseg's, on the learning-parity setup (benchmarks/nnunet_parity_cpu.sh).

  python benchmarks/nnunet_trainer_swap.py --work /tmp/parity_cpu --swap data[,net[,loss]] --seed 12345 \
      [--epochs 6 --iterations 100]

  data  the training batches come from medseg's loader (medseg.loading.datamodule.PatchBatches: its sampling and
        augmentation, from medseg's own preprocessed cache in $WORK/medseg_pre); deep-supervision targets are
        downsampled by nearest-exact as nnU-Net's DownsampleSegForDSTransform
  net   medseg's unet (built from the plan medseg-train saved for the same run) instead of PlainConvUNet
  loss  medseg's deep-supervision dice_ce instead of nnU-Net's DC_and_CE_loss

Runs in medseg's venv with the nnU-Net venv's site-packages appended after medseg's own (as
nnunet_parity_components.py); medseg is imported first, so torchmetrics does not pick up that venv's torchvision.
nnU-Net's final validation runs in a separate process afterwards (nnUNetv2_train --val in its own venv):
its export workers would otherwise re-import this script. Prints nnU-Net's log (pseudo-Dice per epoch).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
from pathlib import Path

# medseg (and through it torchmetrics) is imported before nnU-Net's venv joins the path, so that torchmetrics does
# not pick up that venv's torchvision
import torch.nn.functional as F

from medseg.loading.augmentation import nnunet_settings
from medseg.loading.datamodule import PatchBatches
from medseg.planning.plan import Plan
from medseg.preprocessing.cache import PreprocessedCache


def medseg_configuration(work: Path):
    """The 3d_fullres configuration of the plan medseg-train saved for a parity run in ``work``."""
    plans = sorted((work / "medseg_out").glob("*/unet__dice_ce/fold_0/plan.json"))
    if not plans:
        sys.exit(f"{work}: no medseg run of nnunet_parity_cpu.sh here (no medseg_out/*/unet__dice_ce/fold_0/plan.json)")
    plan = Plan.load(plans[0])
    return plan, plan.configuration("3d_fullres")


class MedsegBatches:
    """nnU-Net's batch dict ({"data", "target"} with deep-supervision targets) from medseg's training loader: its
    sampling and augmentation over medseg's cache of a parity run. Targets are downsampled by nearest-exact, as
    nnU-Net's DownsampleSegForDSTransform does."""

    def __init__(self, work: Path, case_ids):
        plan, config = medseg_configuration(work)
        patch = list(config.patch_size)
        cache = PreprocessedCache(work / "medseg_pre" / plan.dataset / config.data_identifier)
        self.batches = PatchBatches(cache, sorted(case_ids), patch, config.batch_size, 10**9, 0.33,
                                    nnunet_settings(patch))
        self.i = 0

    def __next__(self):
        x, y = self.batches[self.i]
        self.i += 1
        targets = [y] + [F.interpolate(y.float(), scale_factor=s, mode="nearest-exact").long() for s in (0.5, 0.25)]
        return {"data": x, "target": targets}

    def _finish(self):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="the work folder of nnunet_parity_cpu.sh")
    ap.add_argument("--swap", default="data")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--nnunet-venv", default=os.environ.get("NNUNET_VENV", "/tmp/nnunet_venv"))
    args = ap.parse_args()
    swaps = set(args.swap.split(","))
    work = Path(args.work)

    import numpy as np
    import torch

    from medseg.losses import create_loss
    from medseg.losses.registry import with_deep_supervision
    from medseg.models import create_model

    _, config = medseg_configuration(work)
    sys.path.append(str(next(Path(args.nnunet_venv).glob("lib/python3*/site-packages"))))
    from nnunetv2.run.run_training import get_trainer_from_args

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(multiprocessing.cpu_count())
    trainer = get_trainer_from_args("4", "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans_cpu8",
                                    device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch = args.epochs, args.iterations

    original = trainer.get_dataloaders

    def get_dataloaders():
        train, val = original()
        if "data" in swaps:
            train_keys, _ = trainer.do_split()
            train = MedsegBatches(work, train_keys)
        return train, val

    trainer.get_dataloaders = get_dataloaders
    if "net" in swaps or "loss" in swaps:
        trainer.build_network_architecture = lambda *a, **k: create_model("unet", 3, 1, 3, plan=config)
        trainer.set_deep_supervision_enabled = lambda enabled: None
    if "loss" in swaps:
        loss = with_deep_supervision(create_loss("dice_ce", batch_dice=config.batch_dice), 2)
        trainer._build_loss = lambda: (lambda outputs, targets: loss(outputs, targets[0]))
    trainer.run_training()
    print("trained:", trainer.output_folder)


if __name__ == "__main__":
    main()
