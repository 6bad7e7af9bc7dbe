"""LightningModule: forward, loss, metrics and optimisers; nothing else."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
import torch.nn as nn

from medseg.datasets.labels import LabelScheme
from medseg.inference.sliding_window import predict_logits


def channels_last_format(ndim: int) -> torch.memory_format:
    """channels-last for a batch of 3D volumes (5 dims) or 2D images (4 dims)."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def confusion_counts(pred: torch.Tensor, ref: torch.Tensor, targets, valid: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """(3, targets) true positives, false positives and false negatives of each scored target (a label or a
    region: a tuple of label values), summed over all voxels (of every sample) where ``valid`` (not the ignore
    label); computed where the tensors are, no host read."""
    rows = []
    for values in targets:
        if len(values) == 1:
            p, r = pred == values[0], ref == values[0]
        else:
            chosen = torch.tensor(values, device=pred.device)
            p, r = torch.isin(pred, chosen), torch.isin(ref, chosen)
        if valid is not None:
            p, r = p & valid, r & valid
        rows.append(torch.stack([(p & r).sum(), (p & ~r).sum(), (~p & r).sum()]))
    return torch.stack(rows, dim=1).double()


def frozen_parameters(model: nn.Module, prefixes: tuple[str, ...]) -> list[nn.Parameter]:
    """The parameters named under any of ``prefixes`` (module boundaries: "encoder" covers "encoder.0.conv.weight",
    not "encoder10.weight"); ValueError when none is, so that a wrong declaration cannot freeze nothing."""
    chosen = [p for name, p in model.named_parameters()
              if any(name == q or name.startswith(q + ".") for q in prefixes)]
    if not chosen:
        raise ValueError(f"no parameter of {type(model).__name__} is under the encoder prefixes {list(prefixes)}")
    return chosen


class SegmentationModule(L.LightningModule):
    def __init__(self, model: nn.Module, loss: nn.Module, label_scheme: LabelScheme | int, patch_size,
                 optimizer: Callable, scheduler: Callable | None = None, checkpoint_extras: dict | None = None,
                 val_overlap: float = 0.5, channels_last: bool = False, freeze_prefixes: tuple[str, ...] = (),
                 freeze_epochs: int = 0, warmup_epochs: int = 0):
        """freeze_prefixes, freeze_epochs: parameters under these name prefixes (the model's encoder) get no
        updates in the first freeze_epochs epochs; warmup_epochs: a linear lr warm-up before the schedule."""
        super().__init__()
        self.model = model
        self.loss = loss
        # an int: that many ordinary labels 0..n-1
        self.label_scheme = label_scheme if isinstance(label_scheme, LabelScheme) else \
            LabelScheme({v: str(v) for v in range(int(label_scheme))})
        self.targets = [t.values for t in self.label_scheme.targets]
        self.num_classes = max(self.label_scheme.values) + 1  # label values drawn in overlays
        self.patch_size = list(patch_size)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.checkpoint_extras = checkpoint_extras or {}
        self.val_overlap = val_overlap
        self.channels_last = channels_last
        self._val_counts: torch.Tensor | None = None  # (tp, fp, fn) x class, from on_validation_epoch_start
        self.freeze_epochs = int(freeze_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.frozen = frozen_parameters(model, freeze_prefixes) if freeze_epochs > 0 else []

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        image, label = batch
        if self.channels_last:
            image = image.contiguous(memory_format=channels_last_format(image.ndim))
        loss = self.loss(self.model(image), label)  # a non-finite loss is stopped by training.guards
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=image.shape[0])
        return loss

    # ---- per-epoch pseudo-Dice: true/false positives/negatives summed over all validation patches or cases ----
    def on_validation_epoch_start(self):
        # kept on the device and read once at the epoch's end: a read per batch would stall the GPU
        self._val_counts = torch.zeros(3, len(self.targets), dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        image, label, ids = batch
        if isinstance(ids, (list, tuple)):  # a batch of patches (B, C, *patch): one forward pass
            pred = self.label_scheme.logits_to_labels(self.model(image), dim=1)
            ref = label[:, 0]
        else:  # one whole volume (C, *shape): sliding window
            logits = predict_logits(self.model, image, self.patch_size, overlap=self.val_overlap)
            pred = self.label_scheme.logits_to_labels(logits, dim=0)
            ref = label[0].to(pred.device)
        assert self._val_counts is not None  # on_validation_epoch_start ran
        self._val_counts += confusion_counts(pred, ref, self.targets, self.label_scheme.valid_mask(ref))
        return {"pred": pred}  # for callbacks (TensorBoard overlays)

    def on_validation_epoch_end(self):
        counts = self._val_counts
        assert counts is not None  # on_validation_epoch_start ran
        if self.trainer.world_size > 1:
            # DDP: each rank validated its own patches or cases; Dice needs the counts of all of them
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        tp, fp, fn = counts.cpu()
        dice = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).float()
        for c, d in enumerate(dice, start=1):
            self.log(f"val/dice_class{c}", d)
        self.log("val/dice_mean", dice.mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if self.warmup_epochs > 0:
            from medseg.training.schedules import add_warmup

            add_warmup(scheduler, self.warmup_epochs)  # settings.check_config refused other schedulers
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_before_optimizer_step(self, optimizer):
        # a frozen encoder: its gradients are dropped rather than its parameters excluded from autograd, so that
        # DDP still reduces every gradient it expects; torch's optimizers skip a parameter without a gradient
        # entirely (no weight decay, no momentum), so the weights stay bit-identical
        if self.frozen and self.current_epoch < self.freeze_epochs:
            for p in self.frozen:
                p.grad = None

    def on_train_start(self):
        # a finished run extended to more epochs: its restored schedule must use the new horizon
        from torch.optim.lr_scheduler import LambdaLR

        from medseg.training.schedules import set_total_epochs

        assert self.trainer.max_epochs is not None  # medseg always sets trainer.max_epochs
        for config in self.trainer.lr_scheduler_configs:
            # medseg's schedules (poly, warmup_cosine) are LambdaLRs whose factors hold the horizon; another
            # scheduler (a config's own _target_) has no lr_lambdas, and its horizon is its own business
            if isinstance(config.scheduler, LambdaLR):
                set_total_epochs(config.scheduler, self.trainer.max_epochs)

    def on_train_epoch_end(self):
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the plan and model recipe travel inside every checkpoint: prediction needs nothing else
        checkpoint["medseg"] = self.checkpoint_extras
