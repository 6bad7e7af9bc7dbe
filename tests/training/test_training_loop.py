"""medseg's Lightning training step is nnU-Net's train_step: same weights and batches through the trainer that
medseg-train builds (optimizer and scheduler from the configs, gradient clipping, precision) and through a plain
loop written as nnunetv2's nnUNetTrainer.train_step (zero_grad, loss, backward, clip_grad_norm_, SGD step)
end with identical weights."""

from __future__ import annotations

import copy

import lightning as L
import torch
from hydra.utils import instantiate

from medseg.losses import create_loss
from medseg.losses.registry import with_deep_supervision
from medseg.models import create_model
from medseg.planning.plan import ConfigurationPlan
from medseg.training.module import SegmentationModule
from medseg.training.settings import trainer_kwargs
from tests.conftest import compose


def _plan() -> ConfigurationPlan:
    return ConfigurationPlan(name="3d_fullres", spatial_dims=3, spacing=[1.0, 1.0, 1.0], median_shape=[16, 16, 16],
                             patch_size=[16, 16, 16], batch_size=2,
                             strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                             kernel_sizes=[[3, 3, 3]] * 4, features=[4, 8, 16, 32], normalization=["zscore"],
                             use_mask_for_norm=[False], network="plain", encoder_blocks=[2, 2, 2, 2],
                             decoder_convs=[2, 2, 2], batch_dice=False)


def test_lightning_training_steps_equal_a_plain_nnunet_style_loop(tmp_path):
    # a clipping threshold this network's gradients exceed, so that the comparison covers clipping (12 in the
    # configs, as nnU-Net; nnU-Net-sized networks reach it, this tiny one does not)
    clip = 0.5
    cfg = compose("train", ["trainer=cpu", "trainer.max_epochs=1", f"paths.output={tmp_path}",
                            f"trainer.gradient_clip_val={clip}"])
    torch.manual_seed(0)
    model = create_model("unet", 3, 1, 3, plan=_plan(), deep_supervision=True)
    reference = copy.deepcopy(model)
    loss = with_deep_supervision(create_loss("dice_ce", batch_dice=False), model.heads + 1)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(6):
        y = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g)
        batches.append((torch.randn(2, 1, 16, 16, 16, generator=g) + y, y))

    optimizer = torch.optim.SGD(reference.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
    plain_losses, clipped = [], 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        value = loss(reference(x), y)
        value.backward()
        clipped += float(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)) > clip
        optimizer.step()
        plain_losses.append(value.item())

    class Losses(L.Callback):
        values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    module = SegmentationModule(model, loss, 3, [16, 16, 16], instantiate(cfg.optimizer), instantiate(cfg.scheduler))
    kwargs = {**trainer_kwargs(cfg), "limit_val_batches": 0, "num_sanity_val_steps": 0}
    recorder = Losses()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[recorder],
                        **kwargs)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert clipped > 0  # the comparison covers gradient clipping
    assert recorder.values == plain_losses
    for a, b in zip(reference.parameters(), module.model.parameters()):
        assert torch.equal(a, b)
