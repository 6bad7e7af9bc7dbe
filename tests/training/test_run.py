from medseg.training.run import _set_aside


def test_overwrite_sets_the_old_fold_aside_instead_of_deleting(tmp_path):
    fold = tmp_path / "fold_0"
    (fold / "checkpoints").mkdir(parents=True)
    (fold / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    _set_aside(fold)
    assert not fold.exists()
    (kept,) = tmp_path.glob("fold_0.replaced-*")
    assert (kept / "checkpoints" / "best.ckpt").read_bytes() == b"weights"


def test_the_2d_configuration_trains_and_validates_in_original_geometry(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    import nibabel as nib

    exe = Path(sys.executable).with_name("medseg-train")
    result = subprocess.run([str(exe), "debug=fast", "configuration=2d", "callbacks.progress=plain",
                             f"paths.data={tmp_path / 'data'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fold = tmp_path / "outputs" / "synthetic" / "unet__dice_ce__2d" / "fold_0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["num_cases"] == 5 and set(metrics["dice"]) == {"outer", "inner"}
    # the fold's costs, for the benchmark leaderboard
    timing = metrics["timing"]
    assert timing["device"] == "cpu" and timing["peak_gpu_memory_gb"] is None
    assert timing["epochs_timed"] == metrics["epochs"] == 2 and timing["iterations_per_epoch"] == 4
    assert 0 < timing["train_epoch_s_median"] <= timing["epoch_s_median"] < timing["train_s"]
    assert 0 <= timing["data_wait_epoch_s_median"] <= timing["train_epoch_s_median"]
    assert 0 < timing["peak_rss_gb"] < 64 and timing["inference_s_per_case"] > 0
    config = json.loads((fold / "plan.json").read_text())["configurations"]["2d"]
    assert len(config["patch_size"]) == 2
    for pred in (fold / "validation").glob("*.nii.gz"):
        image = nib.load(str(tmp_path / "data" / "synthetic" / "imagesTr" / pred.name))
        assert nib.load(str(pred)).shape == image.shape


def test_channels_last_trains_on_channels_last_batches_and_validates(tmp_path, monkeypatch):
    import torch

    from medseg.training.module import SegmentationModule
    from medseg.training.run import train_fold
    from tests.conftest import compose

    inputs, weights = [], []
    step = SegmentationModule.training_step

    def spy(self, batch, batch_idx):
        original = self.model.forward

        def forward(x):
            inputs.append(x.is_contiguous(memory_format=torch.channels_last_3d))
            return original(x)

        conv = next(p for p in self.model.parameters() if p.ndim == 5 and p.shape[-1] == 3)
        weights.append(conv.is_contiguous(memory_format=torch.channels_last_3d))
        self.model.forward = forward
        try:
            return step(self, batch, batch_idx)
        finally:
            del self.model.forward

    monkeypatch.setattr(SegmentationModule, "training_step", spy)
    cfg = compose("train", ["debug=fast", f"paths.data={tmp_path / 'data'}", f"paths.output={tmp_path / 'out'}",
                            f"paths.preprocessed={tmp_path / 'pre'}", "channels_last=true"])
    metrics = train_fold(cfg)
    assert inputs and all(inputs) and weights and all(weights)
    assert metrics["num_cases"] == 5 and 0.0 <= metrics["dice_mean"] <= 1.0


def test_channels_last_module_hands_the_network_channels_last_batches():
    # two channels: a one-channel batch is channels-last and channels-first contiguous at once
    import torch

    from medseg.training.module import SegmentationModule

    seen = []

    class Recorder(torch.nn.Conv3d):
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last_3d))
            return super().forward(x)

    image, label = torch.randn(2, 2, 4, 4, 4), torch.zeros(2, 4, 4, 4, dtype=torch.long)
    loss = lambda out, ref: out.mean()  # noqa: E731 - any scalar will do
    for channels_last in (False, True):
        module = SegmentationModule(Recorder(2, 3, 1), loss, 3, [4, 4, 4], torch.optim.SGD,
                                    channels_last=channels_last)
        module.training_step((image, label), 0)
    assert seen == [False, True]
