"""Augmented training patches per second from one process: medseg's loader vs nnU-Net's, same data, same patch.

Run by benchmarks/loader_throughput.sh (which plans and preprocesses both, then alternates the runs):
  python loader_throughput.py medseg <MSD task folder> <medseg preprocessed folder> <batches>
  python loader_throughput.py nnunet <batches>        (nnU-Net's environment variables set; its own venv)

Both draw batches of the 3d_fullres plan (patch 40x56x40, batch size from the plan) with the full nnU-Net v2
augmentation set, in the calling process (no workers: the figure is per loader process; both scale with
processes the same way). nnU-Net: nnUNetTrainer.get_dataloaders() with nnUNet_n_proc_DA=0, i.e. its
SingleThreadedAugmenter around nnUNetDataLoader and its transforms, including its deep-supervision target
downsampling. medseg: the training DataLoader of SegmentationDataModule with augmentation in the loader (as on
a CPU run; beside a GPU the same augmentation runs on the device). Prints one line
`<name>: <batches> batches of <b> in <s> s = <patches/s> patches/s` after 3 warm-up batches.
"""

from __future__ import annotations

import os
import sys
import time


def _time_batches(next_batch, batches: int) -> float:
    for _ in range(3):  # warm-up: first file reads, lazy imports, thread pools
        next_batch()
    t0 = time.perf_counter()
    for _ in range(batches):
        next_batch()
    return time.perf_counter() - t0


def medseg(task: str, preprocessed: str, batches: int) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from medseg.cli.common import CONFIG_DIR
    from medseg.loading.datamodule import SegmentationDataModule
    from medseg.preprocessing.prepare import prepare
    from medseg.training.settings import augmentation_settings

    torch.set_num_threads(1)  # one loader process, as nnU-Net's augmenter runs single-threaded numpy/torch
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["data=msd", f"data.root={task}", f"paths.preprocessed={preprocessed}",
                                "augmentation.run_on=loader"])
    # the training loader exactly as train_fold builds it for fold 0
    prepared = prepare(cfg, ["3d_fullres"])
    config = prepared.plan.configuration("3d_fullres")
    train_ids, val_ids = prepared.manifest.split(0)
    augmentation, on_device = augmentation_settings(cfg, config.patch_size)
    batch_size = int(cfg.sampling.batch_size or config.batch_size)
    datamodule = SegmentationDataModule(prepared.cache("3d_fullres"), train_ids, val_ids, config.patch_size,
                                        batch_size, batches + 3, cfg.sampling.oversample_foreground, 0,
                                        None, augmentation, on_device)
    iterator = iter(datamodule.train_dataloader())
    seconds = _time_batches(lambda: next(iterator), batches)
    print(f"medseg: {batches} batches of {batch_size} in {seconds:.1f} s = "
          f"{batches * batch_size / seconds:.1f} patches/s")


def nnunet(batches: int) -> None:
    os.environ["nnUNet_n_proc_DA"] = "0"  # SingleThreadedAugmenter: the loader in this process
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.set_num_threads(1)
    folder = join(nnUNet_preprocessed, "Dataset004_Hippocampus")
    plans = load_json(join(folder, "nnUNetPlans.json"))
    plans["continue_training"] = False  # what run_training passes for a fresh run
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, load_json(join(folder, "dataset.json")),
                            device=torch.device("cpu"))
    trainer._set_batch_size_and_oversample()  # what initialize() does before building the loaders
    train, _ = trainer.get_dataloaders()
    seconds = _time_batches(lambda: next(train), batches)
    b = trainer.batch_size
    print(f"nnunetv2: {batches} batches of {b} in {seconds:.1f} s = {batches * b / seconds:.1f} patches/s")


if __name__ == "__main__":
    if sys.argv[1] == "medseg":
        medseg(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        nnunet(int(sys.argv[2]))
