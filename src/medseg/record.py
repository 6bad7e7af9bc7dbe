"""The run record: the settings a fold was actually trained with, every "decided elsewhere" already decided.

Written into the fold folder (``run.json``) before training starts; training, validation, the leaderboard and
the benchmarks read it instead of working the settings out again from the config or from folder names.
``differences`` is what decides whether a finished fold may be reused for a new command.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medseg.atomic import write_json
from medseg.errors import MedsegError

RECORD_VERSION = 1


@dataclass(frozen=True)
class Component:
    """A registry choice (model, loss) or a config target (optimizer, scheduler) with its resolved arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    fold: int | str  # "all": every case trained on, none held out
    configuration: str
    dataset: str
    num_train_cases: int
    num_val_cases: int
    model: Component
    loss: Component
    optimizer: Component
    scheduler: Component | None
    spatial_dims: int
    patch_size: list[int]  # array order, after adapting to the model
    batch_size: int  # global: split over the processes of a multi-GPU run
    oversample_foreground: float
    iterations_per_epoch: int
    max_epochs: int
    seed: int
    precision: str
    accelerator: str
    devices: int | str | list[int]
    gradient_clip_val: float | None
    augmentation: dict[str, Any] | None  # None: off
    augment_on_device: bool
    num_workers: int
    plan_key: str  # the plan's fingerprint key: the data and planning the patches come from
    validation: dict[str, Any]
    # a cascade stage's inputs: {"configuration", "run" (relative to this run's folder), "folds"}; None otherwise
    previous_stage: dict[str, Any] | None = None
    # the checkpoint file the weights started from (init_from, resolved), or None: trained from scratch
    init_from: str | None = None
    # {"freeze_encoder_epochs", "warmup_epochs"} where either is set; None: neither (records from before them)
    finetune: dict[str, int] | None = None
    version: int = RECORD_VERSION

    # settings that change what a finished fold's weights or scores mean; the rest (workers, where
    # augmentation runs) change only speed. max_epochs is handled by extend=true.
    # (validation.save_probabilities adds files beside the same predictions; a finished fold writes the missing ones)
    IGNORED = ("num_workers", "augment_on_device", "version", "max_epochs", "devices", "accelerator",
               "validation.save_probabilities")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        d = dict(d)
        for key in ("model", "loss", "optimizer", "scheduler"):
            if d.get(key) is not None:
                d[key] = Component(**d[key])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "RunRecord":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise MedsegError(f"{path}: not a medseg run record ({e})") from e

    def differences(self, other: "RunRecord") -> list[str]:
        """'key: this -> other' for every setting that differs, nested keys dotted; IGNORED left out."""
        return [f"{key}: {a!r} -> {b!r}" for key, a, b in _diff(self.to_dict(), other.to_dict())
                if key.split(".")[0] not in self.IGNORED and key not in self.IGNORED]


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str) for d in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [(prefix.rstrip("."), a, b)]
