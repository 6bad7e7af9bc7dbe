"""Import what a parity run imports (scripts/gpu/parity_hippocampus.sh), to fail before training, not during it.

Usage (repo root, the bundle's site and src/ on PYTHONPATH; .gpu/unpack.sh runs it):
    python3 scripts/gpu/check_imports.py [--triton auto|yes|no] [--trainer NAME]

Beyond plain imports it composes medseg's train config with the parity overrides (Hydra parses overrides with
antlr4 only then) and looks nnU-Net's trainer up by name as nnUNetv2_train does: that search imports every trainer
module on its way, timm among their imports. --triton (default $CHECK_TRITON, else auto): `import triton` is
required with yes, and with auto where torch sees a CUDA device (what torch.compile needs there). --trainer
defaults to $NNUNET_TRAINER, else nnUNetTrainer_10epochs.
Prints one line per failure, naming the module and the error, and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time

MEDSEG = [
    "medseg.cli.train", "medseg.cli.plan", "medseg.training.run", "medseg.inference.predictor",
    "medseg.evaluation.metrics", "medseg.models", "monai.networks.nets", "monai.losses", "monai.inferers",
    "monai.metrics", "monai.transforms", "nibabel", "SimpleITK", "hydra", "omegaconf", "antlr4", "mambapy",
    "mambapy.mamba", "lightning", "tensorboard",
]
NNUNET = [
    "nnunetv2.run.run_training", "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "nnunetv2.inference.predict_from_raw_data",
    "nnunetv2.evaluation.evaluate_predictions", "batchgenerators", "batchgeneratorsv2",
    "dynamic_network_architectures", "acvl_utils", "blosc2", "numexpr", "ndindex", "cc3d",
    # nnU-Net's preprocessing imports it; unpack.sh writes a stand-in where python3 has no distutils
    "distutils.file_util",
]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def check(triton: str, trainer: str) -> list[str]:
    failures: list[str] = []

    def imp(name: str):
        try:
            return importlib.import_module(name)
        except Exception as exc:  # a broken extension raises more than ImportError
            failures.append(f"import {name}: {_error(exc)}")
            return None

    for name in MEDSEG + NNUNET:
        imp(name)

    models = sys.modules.get("medseg.models")
    if models is not None:
        # every model family, including modules the package does not import itself
        for info in pkgutil.iter_modules(models.__path__):
            imp(f"medseg.models.{info.name}")
        if not models.list_models():
            failures.append("medseg.models: no model registered")

    try:
        from hydra import compose, initialize_config_dir

        from medseg.cli.common import CONFIG_DIR

        with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base="1.3"):
            compose("train", overrides=["data=msd", "data.root=/nonexistent", "trainer.max_epochs=10",
                                        "callbacks.progress=plain", "compile=true"])
    except Exception as exc:
        failures.append(f"compose medseg's train config: {_error(exc)}")

    if sys.modules.get("nnunetv2.run.run_training") is not None:
        try:
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

            if recursive_find_trainer_class_by_name(trainer) is None:
                failures.append(f"nnU-Net trainer {trainer}: not found")
        except Exception as exc:
            failures.append(f"nnU-Net trainer {trainer} (search imports every trainer module): {_error(exc)}")

    if triton == "auto":
        import torch

        triton = "yes" if torch.cuda.is_available() else "no"
    if triton == "yes":
        imp("triton")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", choices=("auto", "yes", "no"), default=os.environ.get("CHECK_TRITON", "auto"))
    parser.add_argument("--trainer", default=os.environ.get("NNUNET_TRAINER", "nnUNetTrainer_10epochs"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    failures = check(args.triton, args.trainer)
    for line in failures:
        print(f"check_imports: FAILED {line}", file=sys.stderr)
    if failures:
        return 1
    print(f"check_imports: OK in {time.perf_counter() - t0:.1f} s (medseg and its model families, nnU-Net and "
          f"trainer {args.trainer}, triton {args.triton}; Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
