"""nnU-Net's training augmentation, batched on tensors so it runs wherever the batch is.

On a GPU the loader workers only cut (larger) patches and the whole batch is augmented on the device in a
handful of kernels; on CPU the same code runs inside the loader workers. Written with torch rather than
MONAI's per-sample dictionary transforms because those loop over samples and, for the spatial transform,
re-sample every sample on the CPU: at nnU-Net's 250 iterations per ~6 s that alone would starve a GPU.

Order and probabilities follow nnU-Net v2 (batchgeneratorsv2): spatial (rotation p 0.2, scaling p 0.2,
centre crop of the larger sampled patch), Gaussian noise, Gaussian blur, brightness, contrast, low-resolution
simulation, inverted gamma, gamma, mirroring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

ANISOTROPY_THRESHOLD = 3.0  # nnU-Net: a 3D patch this much longer in-plane than across gets 2D spatial augmentation


@dataclass(frozen=True)
class AugmentationSettings:
    spatial_dims: int = 3
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes, each flipped with p 0.5
    p_rotation: float = 0.2
    rotation: tuple[float, float] = (-math.pi / 6, math.pi / 6)  # radians, per axis
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    in_plane_only: bool = False  # anisotropic 3D patches: rotate/scale within the slices (axes 1, 2) only
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_blur_per_channel: float = 0.5
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_scale: tuple[float, float] = (0.5, 1.0)
    p_lowres_per_channel: float = 0.5
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)

    @property
    def spatial(self) -> bool:
        return self.p_rotation > 0 or self.p_scaling > 0


def nnunet_settings(patch_size, **overrides) -> AugmentationSettings:
    """nnU-Net's choices for a patch: 2D rotates by up to 180 deg (15 deg for elongated patches), 3D by 30 deg
    per axis, anisotropic 3D patches get in-plane (2D) spatial augmentation with a full rotation."""
    dims = len(patch_size)
    in_plane = False
    if dims == 2:
        limit = math.radians(15) if max(patch_size) / min(patch_size) > 1.5 else math.pi
    else:
        in_plane = max(patch_size) / patch_size[0] > ANISOTROPY_THRESHOLD
        limit = math.pi if in_plane else math.radians(30)
    settings = AugmentationSettings(spatial_dims=dims, mirror_axes=tuple(range(dims)), rotation=(-limit, limit),
                                    in_plane_only=in_plane)
    return replace(settings, **overrides)


def _rotation_matrix(angles, dims: int) -> np.ndarray:
    if dims == 2:
        (a,) = angles
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def sampling_patch_size(patch_size, settings: AugmentationSettings) -> list[int]:
    """The larger patch the loader cuts so that rotating and scaling (nnU-Net bounds the zoom by 0.85 here)
    and then cropping the centre rarely reaches outside the sampled data. Same parity as the patch, so a
    sample without spatial augmentation is an exact centre crop."""
    patch = np.asarray(patch_size, dtype=float)
    if not settings.spatial:
        return [int(p) for p in patch_size]
    limit = min(max(abs(a) for a in settings.rotation), math.pi / 2)
    axes = patch[1:] if settings.in_plane_only else patch
    dims = len(axes)
    extent = axes.copy()
    for k in range(1 if dims == 2 else 3):
        angles = [0.0] * (1 if dims == 2 else 3)
        angles[k] = limit
        # bounding box of the patch rotated about one axis by the largest angle
        extent = np.maximum(extent, np.abs(_rotation_matrix(angles, dims)) @ axes)
    extent = extent / 0.85
    size = [int(e) for e in extent]
    if settings.in_plane_only:
        size = [int(patch[0])] + size
    # equal parity: the centre of the sampled patch then lies on the output patch's voxel grid
    return [s + ((s - int(p)) % 2) for s, p in zip(size, patch_size)]


def _centre_crop(x: torch.Tensor, out_shape) -> torch.Tensor:
    starts = [(s - o) // 2 for s, o in zip(x.shape[-len(out_shape):], out_shape)]
    region = tuple(slice(a, a + int(o)) for a, o in zip(starts, out_shape))
    return x[(Ellipsis,) + region]


def _sample_affines(n: int, s: AugmentationSettings, g: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """Per-sample linear maps (output voxel offsets -> input voxel offsets, in array axis order) and the
    indices of the samples that received any spatial transform."""
    dims = s.spatial_dims
    maps, moved = [], []
    for b in range(n):
        a = np.eye(dims)
        rotate = _rand(g) < s.p_rotation
        scale = _rand(g) < s.p_scaling
        plane = 2 if (dims == 2 or s.in_plane_only) else 3
        m = np.eye(plane)
        if rotate:
            angles = [_uniform(g, *s.rotation) for _ in range(1 if plane == 2 else 3)]
            m = _rotation_matrix(angles, plane)
        if scale:
            m = m * _uniform(g, *s.scaling)  # one factor for all axes, as nnU-Net
        if rotate or scale:
            if plane == dims:
                a = m
            else:
                a[1:, 1:] = m
            moved.append(b)
        maps.append(a)
    return torch.as_tensor(np.stack(maps), dtype=torch.float32), moved


def _sampling_grid(maps: torch.Tensor, in_shape, out_shape, device) -> torch.Tensor:
    """grid_sample's grid: each output voxel's position around the output centre, mapped, placed around the
    input centre and normalised (align_corners=True), with the axes reversed to grid_sample's (x, y, z)."""
    axes = [torch.arange(o, dtype=torch.float32, device=device) - (o - 1) / 2 for o in out_shape]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*out, dims)
    mapped = torch.einsum("bij,...j->b...i", maps.to(device), pos)
    size = torch.as_tensor(list(in_shape), dtype=torch.float32, device=device)
    normalised = mapped / ((size - 1) / 2).clamp_min(1e-6)
    return normalised.flip(-1)


def spatial_transform(image: torch.Tensor, label: torch.Tensor, patch_size, s: AugmentationSettings,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale a random subset of samples about the centre of the sampled patch and crop ``patch_size``.
    Images are interpolated linearly; labels by linearly interpolating each class's indicator and taking the
    most likely class (background where the data ran out), as batchgeneratorsv2 does for segmentations."""
    out_shape = [int(p) for p in patch_size]
    image_out = _centre_crop(image, out_shape).clone()
    label_out = _centre_crop(label, out_shape).clone()
    maps, moved = _sample_affines(image.shape[0], s, g)
    if not moved:
        return image_out, label_out
    idx = torch.as_tensor(moved, device=image.device)
    grid = _sampling_grid(maps[moved], image.shape[2:], out_shape, image.device)
    image_out[idx] = F.grid_sample(image[idx].float(), grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=True).to(image.dtype)
    num_classes = int(label.max()) + 1
    if num_classes > 1:
        classes = torch.arange(1, num_classes, device=label.device).view(1, -1, *([1] * s.spatial_dims))
        onehot = (label[idx].long() == classes).float()
        fg = F.grid_sample(onehot, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        probs = torch.cat([1 - fg.sum(1, keepdim=True), fg], dim=1)
        label_out[idx] = probs.argmax(1, keepdim=True).to(label.dtype)
    else:
        label_out[idx] = 0
    return image_out, label_out


def _rand(g: torch.Generator, *shape) -> float | torch.Tensor:
    # parameters are drawn on the CPU (g is a CPU generator): no device synchronisation per decision
    r = torch.rand(shape or (), generator=g)
    return float(r) if not shape else r


def _uniform(g: torch.Generator, lo: float, hi: float, *shape):
    return lo + (hi - lo) * _rand(g, *shape)


def _per_channel(mask_b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B,) or (B, C) tensor over the spatial axes of x (B, C, *spatial)."""
    return mask_b.view(*mask_b.shape, *([1] * (x.ndim - mask_b.ndim)))


def _channel_stats(x: torch.Tensor, fn) -> torch.Tensor:
    return fn(x.flatten(2), dim=-1).view(*x.shape[:2], *([1] * (x.ndim - 2)))


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, 2*radius+1) normalised 1D Gaussians; sigma 0 gives the identity kernel."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    k = torch.exp(-0.5 * (t / sigma.clamp_min(1e-3)[:, None]) ** 2)
    return k / k.sum(-1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, axes) -> torch.Tensor:
    """Separable blur of every (sample, channel) with its own sigma per axis: sigma (B, C, dims)."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    y = x.reshape(1, b * c, *spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]
    for axis in axes:
        k = _gaussian_kernels(sigma[..., axis].reshape(-1), radius)
        shape = [b * c, 1] + [1] * len(spatial)
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0] * len(spatial)
        pad[2 * (len(spatial) - 1 - axis)] = pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        y = conv(F.pad(y, pad, mode="replicate"), k.view(shape), groups=b * c)
    return y.view_as(x)


def simulate_low_resolution(x: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, ignore_axes) -> torch.Tensor:
    """Down-sample (nearest) and up-sample (linear) back the (sample, channel) pairs in ``mask``."""
    spatial = x.shape[2:]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    for b, c in mask.nonzero().tolist():
        size = [s if a in ignore_axes else max(1, int(round(s * float(scale[b, c])))) for a, s in enumerate(spatial)]
        low = F.interpolate(x[b, c][None, None], size=size, mode="nearest-exact")
        x[b, c] = F.interpolate(low, size=list(spatial), mode=mode, align_corners=False)[0, 0]
    return x


def _gamma(x: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """Gamma on the channel's [0, 1]-rescaled intensities, keeping its mean and standard deviation."""
    if invert:
        x = -x
    mean, std = _channel_stats(x, torch.mean), _channel_stats(x, torch.std)
    lo, hi = _channel_stats(x, torch.amin), _channel_stats(x, torch.amax)
    span = hi - lo + 1e-7
    y = ((x - lo) / span).clamp_min(0).pow(gamma) * span + lo
    y = (y - _channel_stats(y, torch.mean)) / (_channel_stats(y, torch.std) + 1e-8) * std + mean
    return -y if invert else y


def _sample_gamma(g: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    # half the draws below 1 and half above, as batchgenerators (a plain uniform would favour > 1)
    below = _uniform(g, lo, 1.0, *shape)
    above = _uniform(g, 1.0, hi, *shape)
    return torch.where(_rand(g, *shape) < 0.5, below, above)


def intensity_transforms(x: torch.Tensor, s: AugmentationSettings, g: torch.Generator,
                         noise_generator: torch.Generator | None = None) -> torch.Tensor:
    """Parameters come from the CPU generator ``g``; noise is drawn on x's device from ``noise_generator``."""
    b, c = x.shape[:2]
    dev = x.device
    spatial_axes = tuple(range(s.spatial_dims))
    # Gaussian noise: one variance per sample
    on = _rand(g, b) < s.p_noise
    if on.any():
        std = (_uniform(g, *s.noise_variance, b).sqrt() * on).to(dev)
        noise = torch.randn(x.shape, generator=noise_generator, device=dev)
        x = x + noise * _per_channel(std, x)
    # Gaussian blur: per channel with p 0.5, an independent sigma per axis
    on = (_rand(g, b) < s.p_blur)[:, None] & (_rand(g, b, c) < s.p_blur_per_channel)
    if on.any():
        sigma = (_uniform(g, *s.blur_sigma, b, c, s.spatial_dims) * on[..., None]).to(dev)
        blur_axes = spatial_axes[1:] if s.in_plane_only else spatial_axes
        x = torch.where(_per_channel(on.to(dev), x), gaussian_blur(x, sigma, blur_axes), x)
    # multiplicative brightness, per channel
    on = _rand(g, b) < s.p_brightness
    if on.any():
        factor = torch.where(on[:, None], _uniform(g, *s.brightness_range, b, c), torch.ones(b, c))
        x = x * _per_channel(factor.to(dev), x)
    # contrast around the channel mean, clipped to the channel's previous range
    on = _rand(g, b) < s.p_contrast
    if on.any():
        factor = _per_channel(_uniform(g, *s.contrast_range, b, c).to(dev), x)
        mean, lo, hi = (_channel_stats(x, f) for f in (torch.mean, torch.amin, torch.amax))
        x = torch.where(_per_channel(on.to(dev), x), ((x - mean) * factor + mean).clamp(lo, hi), x)
    # low-resolution simulation: per channel with p 0.5, one zoom for all axes
    on = (_rand(g, b) < s.p_lowres)[:, None] & (_rand(g, b, c) < s.p_lowres_per_channel)
    if on.any():
        x = simulate_low_resolution(x.clone(), on, _uniform(g, *s.lowres_scale, b, c),
                                    ignore_axes=(0,) if s.in_plane_only else ())
    # gamma on the inverted image, then gamma
    for p, invert in ((s.p_gamma_inverted, True), (s.p_gamma, False)):
        on = _rand(g, b) < p
        if on.any():
            gamma = _per_channel(_sample_gamma(g, (b, c), *s.gamma_range).to(dev), x)
            x = torch.where(_per_channel(on.to(dev), x), _gamma(x, gamma, invert), x)
    return x


def mirror(image: torch.Tensor, label: torch.Tensor, s: AugmentationSettings, g: torch.Generator):
    for axis in s.mirror_axes:
        on = _rand(g, image.shape[0]) < 0.5
        if on.any():
            dim, on = axis + 2, on.to(image.device)
            image = torch.where(_per_channel(on, image), image.flip(dim), image)
            label = torch.where(_per_channel(on, label), label.flip(dim), label)
    return image, label


def augment_batch(image: torch.Tensor, label: torch.Tensor, patch_size, s: AugmentationSettings,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, C, *sampled) float, label (B, 1, *sampled) integer, cut at ``sampling_patch_size``; returns
    the augmented (B, C, *patch) and (B, 1, *patch) on the batch's device. Deterministic given ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.Generator(device=image.device).manual_seed(int(seed) + 1)
    image, label = spatial_transform(image, label, patch_size, s, g)
    image = intensity_transforms(image.float(), s, g, noise)
    return mirror(image, label, s, g)
