"""Prediction under mixed precision (CPU bf16 autocast standing in for CUDA's): the network runs in bf16, the
windows and mirrored copies are summed in float32, and the precision is chosen from the checkpoint."""

from __future__ import annotations

import json

import torch

from medseg.inference.predictor import Predictor, TrainedModel, load_checkpoint
from medseg.inference.sliding_window import predict_logits
from medseg.models import create_model
from tests.inference.conftest import SCAN_CASES, predict_on_cpu, save_untrained_checkpoint


def test_the_network_runs_under_autocast_and_logits_are_summed_in_float32(tiny_plan):
    config = tiny_plan.configuration("3d_fullres")
    torch.manual_seed(0)
    model = create_model("unet", 3, 1, len(tiny_plan.labels), plan=config).eval()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    image = torch.randn(1, 28, 30, 26)  # larger than the 16^3 patch: MONAI's sliding window and its buffers
    full = predict_logits(model, image, config.patch_size, mirror_axes=(0, 1), sw_batch_size=2)
    assert seen and all(s == (False, torch.float32) for s in seen)
    seen.clear()
    mixed = predict_logits(model, image, config.patch_size, mirror_axes=(0, 1), sw_batch_size=2,
                           autocast=torch.bfloat16)
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    assert mixed.dtype == torch.float32 and mixed.shape == full.shape
    assert not torch.equal(mixed, full)
    scale = full.abs().max()
    assert (mixed - full).abs().max() < 0.05 * scale  # bf16 rounding, not a different computation


def test_precision_auto_follows_the_checkpoint_only_where_safe(tiny_plan, tiny_run, tmp_path, scans):
    trained = load_checkpoint(tiny_run / "fold_0" / "checkpoints" / "last.ckpt", torch.device("cpu"))
    assert trained.precision == "32-true"  # checkpoints without the record count as float32
    gpu_trained = TrainedModel(trained.model, trained.plan, trained.config, "mem", "bf16-mixed")
    assert Predictor([gpu_trained]).precision == "32-true"  # on the CPU: float32
    assert Predictor([gpu_trained], precision="bf16-mixed").precision == "bf16-mixed"
    run = tmp_path / "run"
    path = save_untrained_checkpoint(tiny_plan, "3d_fullres", run / "fold_0" / "checkpoints" / "last.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["medseg"]["precision"] = "bf16-mixed"
    torch.save(ckpt, path)
    assert load_checkpoint(path, torch.device("cpu")).precision == "bf16-mixed"
    summary = predict_on_cpu(run, scans, tmp_path / "out", precision="bf16-mixed")
    assert not summary.failed and len(summary.written) == len(SCAN_CASES)
    record = json.loads((tmp_path / "out" / "prediction_summary.json").read_text())
    assert record["precision"] == "bf16-mixed"
