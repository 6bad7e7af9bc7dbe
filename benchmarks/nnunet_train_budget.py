"""nnU-Net v2 training on a fixed budget and seed, for the CPU learning-parity benchmark
(benchmarks/nnunet_parity_cpu.sh). Runs in nnunetv2's own virtual environment.

Usage: python nnunet_train_budget.py DATASET_ID CONFIGURATION FOLD PLANS EPOCHS ITERATIONS SEED DEVICE

nnUNetv2_train takes its budget from trainer subclasses found inside the nnunetv2 package; this builds the
standard trainer and sets the two numbers on it instead, so nothing is added to the installed package. The seed
fixes Python's, NumPy's and torch's generators before the network is built (nnU-Net itself does not seed).
Then it trains, validates the fold's held-out cases as nnUNetv2_train does, and prints the validation summary.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
from pathlib import Path

import numpy as np
import torch
from nnunetv2.run.run_training import get_trainer_from_args


def main(dataset: str, configuration: str, fold: int, plans: str, epochs: int, iterations: int, seed: int,
         device: str) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_train does on the CPU
    trainer = get_trainer_from_args(dataset, configuration, fold, "nnUNetTrainer", plans, device=torch.device(device))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.run_training()
    trainer.perform_actual_validation(False)
    summary = Path(trainer.output_folder) / "validation" / "summary.json"
    print("summary:", summary)
    print(json.dumps(json.loads(summary.read_text())["mean"]))


if __name__ == "__main__":
    d, c, f, p, e, i, s, dev = sys.argv[1:9]
    main(d, c, int(f), p, int(e), int(i), int(s), dev)
