"""Are medseg's training batches as hard as nnU-Net's? One fixed, trained network (nnU-Net's final checkpoint of a
learning-parity run) scores batches from nnU-Net's training loader and from medseg's (its sampling and
augmentation, from medseg's cache of the same run); the loss and per-class Dice under the same weights, the
foreground fraction per class and the image statistics are compared with Welch's test. A loader whose batches are
easier or harder, or hold other class proportions, shows here even where per-transform statistics agree.

  python benchmarks/nnunet_parity_batches.py --work /tmp/parity_cpu --run 1500_12345 --batches 200

--work is nnunet_parity_cpu.sh's work folder after at least one run of each framework (nnU-Net's preprocessed
data and checkpoint, medseg's cache and plan). Runs in medseg's venv with the nnU-Net venv's site-packages appended
after medseg's own, as nnunet_trainer_swap.py does; nnU-Net's loader runs in-process (nnUNet_n_proc_DA=0).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

NAMES = ("loss", "fraction class 1", "Dice class 1", "fraction class 2", "Dice class 2", "image mean", "image std")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="the work folder of nnunet_parity_cpu.sh")
    ap.add_argument("--run", default="1500_12345", help="<budget>_<seed> of the nnU-Net run whose weights score")
    ap.add_argument("--batches", type=int, default=200, help="batches per loader")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--nnunet-venv", default=os.environ.get("NNUNET_VENV", "/tmp/nnunet_venv"))
    args = ap.parse_args()
    work = Path(args.work).resolve()
    os.environ.update(
        nnUNet_n_proc_DA="0",
        nnUNet_raw=str(work / "nn_raw"),
        nnUNet_preprocessed=str(work / "nn_pre"),
        nnUNet_results=str(work / "nn_results" / args.run),
    )

    import numpy as np
    import torch
    from scipy import stats

    # imports medseg before nnU-Net's venv joins the path (see there)
    from nnunet_trainer_swap import MedsegBatches, medseg_configuration

    _, config = medseg_configuration(work)  # refuses a work folder without a medseg run before any compute

    sys.path.append(str(next(Path(args.nnunet_venv).glob("lib/python3*/site-packages"))))
    from nnunetv2.run.run_training import get_trainer_from_args

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    trainer = get_trainer_from_args(
        "4", "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans_cpu8", device=torch.device("cpu")
    )
    trainer.initialize()
    checkpoint = Path(trainer.output_folder) / "checkpoint_final.pth"
    if not checkpoint.is_file():
        sys.exit(f"{checkpoint}: missing; --run names a finished nnU-Net run of nnunet_parity_cpu.sh in {work}")
    trainer.load_checkpoint(str(checkpoint))
    network = trainer.network.train()  # instance norm only: train and eval differ in the deep-supervision outputs
    nnunet_batches, _ = trainer.get_dataloaders()

    train_cases, _ = trainer.do_split()
    medseg_batches = MedsegBatches(work, train_cases)

    def measure(x: torch.Tensor, targets: list[torch.Tensor]) -> list[float]:
        with torch.no_grad():
            outputs = network(x)
            loss = trainer.loss(outputs, targets).item()
            prediction = outputs[0].argmax(1)
        label = targets[0][:, 0]
        row = [loss]
        for c in (1, 2):
            truth, predicted = label == c, prediction == c
            denominator = (truth.sum() + predicted.sum()).item()
            row += [
                truth.float().mean().item(),
                2 * (truth & predicted).sum().item() / denominator if denominator else float("nan"),
            ]
        return row + [x.mean().item(), x.std().item()]

    rows: dict[str, list] = {"nnunet": [], "medseg": []}
    for _ in range(args.batches):
        batch = next(nnunet_batches)
        rows["nnunet"].append(measure(batch["data"], batch["target"]))
        batch = next(medseg_batches)
        rows["medseg"].append(measure(batch["data"], batch["target"]))
    n, m = np.array(rows["nnunet"]), np.array(rows["medseg"])
    print(f"\nnnU-Net's weights {checkpoint}; {args.batches} batches of {config.batch_size} per loader")
    print("| measure | nnU-Net's loader | medseg's loader | medseg - nnU-Net | Welch p |")
    print("|---|---|---|---|---|")
    for j, name in enumerate(NAMES):
        a, b = n[:, j][~np.isnan(n[:, j])], m[:, j][~np.isnan(m[:, j])]
        p = stats.ttest_ind(b, a, equal_var=False).pvalue
        print(
            f"| {name} | {a.mean():.4f} ± {a.std(ddof=1) / len(a) ** 0.5:.4f} | "
            f"{b.mean():.4f} ± {b.std(ddof=1) / len(b) ** 0.5:.4f} | {b.mean() - a.mean():+.4f} | {p:.2f} |"
        )
    print("(mean ± standard error over batches)")


if __name__ == "__main__":
    main()
