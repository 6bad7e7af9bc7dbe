"""Several trained runs (other configurations, other models) predicting as one.

Within a run the folds' logits are averaged (medseg.inference.predictor, as nnU-Net's predictor does); across
runs the class probabilities are averaged on the input's grid, as ``nnUNetv2_ensemble`` does, because runs of
other configurations or models have logits of other scales. Each run's probabilities are rounded to float16
before they are averaged: exactly what validation stores (medseg.inference.probability_files), so an ensemble
predicted here and one that configuration selection (medseg.evaluation.selection) formed from the stored
out-of-fold files give the same label maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.inference.predictor import Prediction, Predictor, Prepared, StagedPrediction, slabs
from medseg.planning.plan import Plan


def average_probabilities(members: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """The float32 mean of members' float16 probabilities, summed in the given order (selection and prediction
    share this, so both round alike)."""
    total: torch.Tensor | None = None
    for p in members:
        part = torch.as_tensor(p).to(torch.float16).to(torch.float32)
        total = part if total is None else total.add_(part)
    assert total is not None, "an ensemble has members"
    return total / len(members)


@dataclass
class EnsemblePrepared:
    parts: list[Prepared]
    shape: tuple[int, ...]

    def release(self) -> None:
        for part in self.parts:
            part.release()


class RunEnsemble(StagedPrediction):
    """Predictors of several runs, one per run, used where a Predictor is (batch prediction, the Python API)."""

    def __init__(self, members: list[Predictor]):
        if len(members) < 2:
            raise ValueError("an ensemble of runs needs at least two")
        first = members[0]
        for m in members[1:]:
            if m.plan.label_scheme != first.plan.label_scheme or m.plan.channel_names != first.plan.channel_names:
                raise MedsegError(f"{m.models[0].source}: labels or channels differ from {first.models[0].source}; "
                                  "runs ensembled together must share them")
        self.members = members

    @property
    def plan(self) -> Plan:
        return self.members[0].plan

    @property
    def models(self):
        return [m for member in self.members for m in member.models]

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def precision(self) -> str:
        kinds = {m.precision for m in self.members}
        return kinds.pop() if len(kinds) == 1 else ", ".join(sorted(kinds))

    @property
    def overlap(self) -> float:
        return self.members[0].overlap

    @property
    def mirror_axes(self):
        return self.members[0].mirror_axes

    @property
    def previous_stage(self) -> None:
        return None  # each member predicts its own previous stage

    @property
    def label_values(self) -> np.ndarray:
        return self.members[0].label_values

    def prepare(self, image: np.ndarray, spacing) -> EnsemblePrepared:
        parts = [m.prepare(image, spacing) for m in self.members]
        return EnsemblePrepared(parts, parts[0].shape)

    def infer(self, prepared: EnsemblePrepared) -> list[list[torch.Tensor]]:
        return [m.infer(part) for m, part in zip(self.members, prepared.parts)]

    def finish(self, logits: list[list[torch.Tensor]], prepared: EnsemblePrepared,
               probabilities: bool = False) -> Prediction:
        shape, values, scheme = prepared.shape, self.label_values, self.plan.label_scheme
        label = np.empty(shape, dtype=np.int16)
        probs = np.empty((len(values), *shape), dtype=np.float16) if probabilities else None
        for start, stop in slabs(shape, len(values)):
            parts = [scheme.probabilities(m.mean_logits(lg, part, start, stop), 0)
                     for m, lg, part in zip(self.members, logits, prepared.parts)]
            mean = average_probabilities(parts)
            del parts
            label[start:stop] = np.asarray(scheme.to_labels(mean, dim=0))
            if probs is not None:
                probs[:, start:stop] = mean.numpy()
        return Prediction(label, values, probs)
