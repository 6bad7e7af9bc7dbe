"""predict_logits against the plain form: MONAI's sliding_window_inference once per mirrored copy (flip the
volume, predict, flip back, average), on small random models."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet

from medseg.inference.sliding_window import mirror_flips, predict_logits


def reference(model, image, patch_size, overlap=0.5, mirror_axes=None, sw_batch_size=4):
    """The plain form, written out: one inferer call per copy; 2D models slice by slice along axis 0."""
    model.eval()
    two_d = len(patch_size) == image.ndim - 2
    x = image.transpose(0, 1) if two_d else image[None]
    axes = [a + 2 for a in (mirror_axes or ()) if a < len(patch_size)]
    flips = [()] + [tuple(a for a, bit in zip(axes, bits) if bit)
                    for bits in itertools.product([0, 1], repeat=len(axes)) if any(bits)]
    with torch.no_grad():
        runs = [torch.flip(sliding_window_inference(torch.flip(x, d) if d else x, list(patch_size), sw_batch_size,
                                                    model, overlap=overlap, mode="gaussian", padding_mode="constant",
                                                    cval=0.0), d) if d else
                sliding_window_inference(x, list(patch_size), sw_batch_size, model, overlap=overlap, mode="gaussian",
                                         padding_mode="constant", cval=0.0) for d in flips]
    out = torch.stack(runs).mean(0)
    return out.transpose(0, 1) if two_d else out[0]


def conv_net(dims: int, in_ch: int = 1, classes: int = 3) -> nn.Module:
    """Instance norm over the whole input: the result depends on where the volume sits in the padded window."""
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    return nn.Sequential(conv(in_ch, 6, 3, padding=1), norm(6, affine=True), nn.LeakyReLU(0.01),
                         conv(6, 6, 3, padding=1, stride=1), nn.LeakyReLU(0.01), conv(6, classes, 1))


def dyn_unet(dims: int, in_ch: int = 1, classes: int = 3) -> nn.Module:
    return DynUNet(dims, in_ch, classes, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                   filters=[4, 8, 16], norm_name=("INSTANCE", {"affine": True}))


def randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("make", [conv_net, dyn_unet])
@pytest.mark.parametrize("shape", [
    (13, 17, 10),   # smaller than the patch on every axis, odd padding: one window
    (16, 20, 12),   # exactly the patch
    (16, 9, 12),    # smaller on one axis only
    (23, 20, 30),   # larger than the patch: several windows
    (40, 5, 7),     # larger on one axis, smaller on the others
])
@pytest.mark.parametrize("mirror_axes", [None, (0, 1, 2), (0, 2)])
def test_3d_equals_one_inferer_call_per_copy(make, shape, mirror_axes):
    model = randomised(make(3))
    torch.manual_seed(1)
    image = torch.randn(1, *shape)
    patch = (16, 20, 12)
    want = reference(model, image, patch, 0.5, mirror_axes)
    for sw_batch_size in (1, 3, 8):  # one copy per pass, copies split over passes, all copies in one pass
        got = predict_logits(model, image, patch, 0.5, mirror_axes, sw_batch_size)
        assert got.shape == (3, *shape) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
def test_overlaps_and_two_channels(overlap):
    model = randomised(dyn_unet(3, in_ch=2, classes=2))
    image = torch.randn(2, 21, 18, 9, generator=torch.Generator().manual_seed(2))
    patch = (16, 16, 8)
    torch.testing.assert_close(predict_logits(model, image, patch, overlap, (0, 1, 2), 4),
                               reference(model, image, patch, overlap, (0, 1, 2), 4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [conv_net, dyn_unet])
@pytest.mark.parametrize("shape", [(5, 11, 9), (40, 16, 12), (3, 20, 15)])  # >32 slices: two passes
@pytest.mark.parametrize("mirror_axes", [None, (0, 1, 2), (0, 1)])
def test_2d_model_on_a_volume(make, shape, mirror_axes):
    model = randomised(make(2))
    image = torch.randn(1, *shape, generator=torch.Generator().manual_seed(3))
    patch = (16, 12)
    want = reference(model, image, patch, 0.5, mirror_axes)
    got = predict_logits(model, image, patch, 0.5, mirror_axes, 4)
    assert got.shape == (3, *shape)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_training_mode_is_restored_and_the_input_untouched():
    model = randomised(dyn_unet(3)).train()
    image = torch.randn(1, 10, 10, 10)
    before = image.clone()
    predict_logits(model, image, (16, 16, 8), 0.5, (0, 1, 2))
    assert model.training
    assert torch.equal(image, before)


def test_mirror_flips():
    assert mirror_flips(None, 3) == [()]
    assert mirror_flips((0, 1, 2), 3) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert mirror_flips((0, 1, 2), 2) == [(), (2,), (3,), (2, 3)]  # a 2D model mirrors its own two axes
