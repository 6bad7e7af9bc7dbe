"""Batch prediction of a folder: skip finished cases, report per-case errors without stopping the batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medseg.data.adapters import list_images
from medseg.errors import MedsegError
from medseg.inference.predictor import (Predictor, check_output_dir, find_checkpoints, group_cases,
                                        load_checkpoint, output_path)

log = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"predicted {len(self.written)}, skipped {len(self.skipped)} (already done), "
                 f"failed {len(self.failed)}"]
        lines += [f"  failed {case}: {err}" for case, err in self.failed.items()]
        return "\n".join(lines)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict_folder(ckpt_dir: Path, input_dir: Path, output_dir: Path, checkpoint: str = "best",
                   overlap: float = 0.5, mirror_axes=None, overwrite: bool = False, device: str = "auto",
                   sw_batch_size: int = 4, progress: bool = True) -> BatchSummary:
    if not input_dir.is_dir():
        raise MedsegError(f"{input_dir}: input folder not found")
    check_output_dir(input_dir, output_dir)
    dev = resolve_device(device)
    models = [load_checkpoint(p, dev) for p in find_checkpoints(ckpt_dir, checkpoint)]
    predictor = Predictor(models, overlap, tuple(mirror_axes) if mirror_axes else None, sw_batch_size, dev)
    files = list_images(input_dir)
    if not files:
        raise MedsegError(f"{input_dir}: no NIfTI/NRRD/MHA images found")
    cases = group_cases(files, len(predictor.plan.channel_names))
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("predicting %d case(s) with %d model(s) on %s", len(cases), len(models), dev)
    summary = BatchSummary()
    for case_id, paths in tqdm(sorted(cases.items()), desc="predict", disable=not progress):
        target = output_path(case_id, paths, output_dir)
        if target.exists() and not overwrite:
            summary.skipped.append(case_id)
            continue
        try:
            predictor.predict_file(paths, target)
            summary.written.append(case_id)
        except (MedsegError, ValueError, OSError, RuntimeError) as e:
            log.error("case %s: %s", case_id, e)
            summary.failed[case_id] = str(e)
    return summary
