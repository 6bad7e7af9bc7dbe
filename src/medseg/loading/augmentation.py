"""nnU-Net's training augmentation, batched on tensors so it runs wherever the batch is.

On a GPU the loader workers only cut (larger) patches and the whole batch is augmented on the device in a
handful of kernels; on CPU the same code runs inside the loader workers. Written with torch rather than
MONAI's per-sample dictionary transforms because those loop over samples and, for the spatial transform,
re-sample every sample on the CPU: at nnU-Net's 250 iterations per ~6 s that alone would starve a GPU.

Augmenting is split in two so that the device never waits on the host: ``draw_augmentation`` makes every
random decision on the host (in the loader worker) and packs the numbers into one small tensor, which
travels pinned with the batch; ``apply_augmentation`` is device work only, steered by python values.

Order and probabilities follow nnU-Net v2 (batchgeneratorsv2): spatial (rotation p 0.2, scaling p 0.2,
centre crop of the larger sampled patch), Gaussian noise, Gaussian blur, brightness, contrast, low-resolution
simulation, inverted gamma, gamma, mirroring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import overload

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


# ---- drawing: every random decision and parameter, on the host ------------------------------------------


Layout = tuple[tuple[str, int, tuple[int, ...]], ...]  # (name, offset, shape) of each packed parameter
LowResolution = tuple[int, int, tuple[int, ...]]  # (sample, channel, down-sampled spatial size)


@dataclass(frozen=True)
class AugmentationPlan:
    """The python side of a draw: what shapes the computation (which transforms run, kernel and image sizes,
    the noise seed, the class count) and where each numeric parameter lies in the packed tensor. Applying
    it needs no value from the device, so the device never waits on the host."""

    patch_size: tuple[int, ...]
    num_classes: int
    noise_seed: int  # seeds a generator on the device: noise, as large as the image, is drawn there
    blur_radius: int = 0
    blur_axes: tuple[int, ...] = ()
    lowres: tuple[LowResolution, ...] = ()
    mirror_axes: tuple[int, ...] = ()  # the axes flipped in at least one sample, rows of "mirror"
    layout: Layout = ()

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.layout)

    def unpack(self, params: torch.Tensor, name: str) -> torch.Tensor:
        """A view of one parameter in ``params``, wherever that tensor is."""
        for n, offset, shape in self.layout:
            if n == name:
                return params[offset:offset + math.prod(shape)].view(shape)
        raise KeyError(f"{name!r} was not drawn")

    def to(self, *args, **kwargs) -> AugmentationPlan:
        # Lightning's batch transfer calls .to() on whatever has one: host data stays put (and, the class
        # being frozen, could not be rebuilt field by field as Lightning rebuilds other dataclasses)
        return self


@dataclass(frozen=True)
class AugmentationDraw:
    plan: AugmentationPlan
    params: torch.Tensor  # every per-sample number, flat float32 on the host: one copy to the device


@dataclass
class _Packer:
    parts: list[torch.Tensor] = field(default_factory=list)
    layout: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)
    size: int = 0

    def add(self, name: str, values: torch.Tensor) -> None:
        self.layout.append((name, self.size, tuple(values.shape)))
        self.parts.append(values.reshape(-1).float())
        self.size += values.numel()

    def packed(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0)


@overload
def _rand(g: torch.Generator) -> float: ...
@overload
def _rand(g: torch.Generator, first: int, /, *shape: int) -> torch.Tensor: ...
def _rand(g: torch.Generator, *shape: int) -> float | torch.Tensor:
    r = torch.rand(shape or (), generator=g)
    return float(r) if not shape else r


def _uniform(g: torch.Generator, lo: float, hi: float, *shape):
    return lo + (hi - lo) * _rand(g, *shape)


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


def _draw_spatial(g: torch.Generator, batch: int, s: AugmentationSettings, pack: _Packer) -> None:
    maps, moved = _sample_affines(batch, s, g)
    if moved:
        pack.add("moved", torch.tensor(moved, dtype=torch.float32))  # indices, exact as float32
        pack.add("maps", maps[moved])


def _sample_gamma(g: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    # half the draws below 1 and half above, as batchgenerators (a plain uniform would favour > 1)
    below = _uniform(g, lo, 1.0, *shape)
    above = _uniform(g, 1.0, hi, *shape)
    return torch.where(_rand(g, *shape) < 0.5, below, above)


def _draw_noise(g: torch.Generator, b: int, s: AugmentationSettings, pack: _Packer) -> None:
    on = _rand(g, b) < s.p_noise  # one variance per sample
    if on.any():
        pack.add("noise_std", _uniform(g, *s.noise_variance, b).sqrt() * on)


def _draw_blur(g: torch.Generator, b: int, c: int, s: AugmentationSettings, pack: _Packer) -> int:
    """Per channel with p 0.5, an independent sigma per axis; returns the kernel radius (0: no blur)."""
    on = (_rand(g, b) < s.p_blur)[:, None] & (_rand(g, b, c) < s.p_blur_per_channel)
    if not on.any():
        return 0
    sigma = _uniform(g, *s.blur_sigma, b, c, s.spatial_dims) * on[..., None]
    pack.add("blur_sigma", sigma)
    pack.add("blur_on", on)
    return max(1, math.ceil(3 * float(sigma.max())))


def _draw_brightness_contrast(g: torch.Generator, b: int, c: int, s: AugmentationSettings, pack: _Packer) -> None:
    on = _rand(g, b) < s.p_brightness  # multiplicative, per channel
    if on.any():
        pack.add("brightness", torch.where(on[:, None], _uniform(g, *s.brightness_range, b, c), torch.ones(b, c)))
    on = _rand(g, b) < s.p_contrast
    if on.any():
        pack.add("contrast", _uniform(g, *s.contrast_range, b, c))
        pack.add("contrast_on", on)


def _draw_lowres(g: torch.Generator, b: int, c: int, spatial, s: AugmentationSettings) -> tuple[LowResolution, ...]:
    """Per channel with p 0.5, one zoom for all axes (none across slices for in-plane augmentation)."""
    on = (_rand(g, b) < s.p_lowres)[:, None] & (_rand(g, b, c) < s.p_lowres_per_channel)
    if not on.any():
        return ()
    scale = _uniform(g, *s.lowres_scale, b, c)
    ignore = (0,) if s.in_plane_only else ()
    return tuple((i, j, tuple(n if a in ignore else max(1, int(round(n * float(scale[i, j]))))
                              for a, n in enumerate(spatial)))
                 for i, j in on.nonzero().tolist())


def _draw_gammas(g: torch.Generator, b: int, c: int, s: AugmentationSettings, pack: _Packer) -> None:
    for name, p in (("gamma_inverted", s.p_gamma_inverted), ("gamma", s.p_gamma)):
        on = _rand(g, b) < p
        if on.any():
            pack.add(name, _sample_gamma(g, (b, c), *s.gamma_range))
            pack.add(f"{name}_on", on)


@dataclass(frozen=True)
class _IntensityDraw:
    blur_radius: int
    blur_axes: tuple[int, ...]
    lowres: tuple[LowResolution, ...]


def _draw_intensity(g: torch.Generator, b: int, c: int, spatial, s: AugmentationSettings,
                    pack: _Packer) -> _IntensityDraw:
    """Noise, blur, brightness, contrast, low resolution and both gammas, in that order."""
    _draw_noise(g, b, s, pack)
    radius = _draw_blur(g, b, c, s, pack)
    _draw_brightness_contrast(g, b, c, s, pack)
    lowres = _draw_lowres(g, b, c, spatial, s)
    _draw_gammas(g, b, c, s, pack)
    axes = tuple(range(s.spatial_dims))
    return _IntensityDraw(radius, axes[1:] if s.in_plane_only else axes, lowres)


def _draw_mirror(g: torch.Generator, batch: int, s: AugmentationSettings, pack: _Packer) -> tuple[int, ...]:
    axes, masks = [], []
    for axis in s.mirror_axes:
        on = _rand(g, batch) < 0.5
        if on.any():
            axes.append(axis)
            masks.append(on)
    if axes:
        pack.add("mirror", torch.stack(masks))
    return tuple(axes)


def draw_augmentation(seed: int, batch_size: int, channels: int, patch_size, s: AugmentationSettings,
                      num_classes: int) -> AugmentationDraw:
    """Every random decision and parameter of one batch's augmentation, drawn on the host from ``seed``:
    the batch (B, C, *sampled) becomes (B, C, *patch_size); ``num_classes`` counts background."""
    g = torch.Generator().manual_seed(int(seed))
    patch = tuple(int(p) for p in patch_size)
    pack = _Packer()
    _draw_spatial(g, batch_size, s, pack)
    intensity = _draw_intensity(g, batch_size, channels, patch, s, pack)
    mirror_axes = _draw_mirror(g, batch_size, s, pack)
    plan = AugmentationPlan(patch, int(num_classes), int(seed) + 1, intensity.blur_radius, intensity.blur_axes,
                            intensity.lowres, mirror_axes, tuple(pack.layout))
    return AugmentationDraw(plan, pack.packed())


# ---- applying: device work only (no copy from the host, no read back) -------------------------------------


def _centre_crop(x: torch.Tensor, out_shape) -> torch.Tensor:
    starts = [(s - o) // 2 for s, o in zip(x.shape[-len(out_shape):], out_shape)]
    region = tuple(slice(a, a + int(o)) for a, o in zip(starts, out_shape))
    return x[(Ellipsis,) + region]


def _sampling_grid(maps: torch.Tensor, in_shape, out_shape) -> torch.Tensor:
    """grid_sample's grid: each output voxel's position around the output centre, mapped, placed around the
    input centre and normalised (align_corners=True), with the axes reversed to grid_sample's (x, y, z)."""
    axes = [torch.arange(o, dtype=torch.float32, device=maps.device) - (o - 1) / 2 for o in out_shape]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*out, dims)
    mapped = torch.einsum("bij,...j->b...i", maps, pos)
    # python divisors: a tensor of the sizes would be one more copy to the device
    halves = [max((n - 1) / 2, 1e-6) for n in in_shape]
    return torch.stack([mapped[..., a] / halves[a] for a in reversed(range(len(halves)))], dim=-1)


def _resample_labels(label: torch.Tensor, grid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each class's indicator interpolated linearly, then the most likely class (background where the data
    ran out), as batchgeneratorsv2 does for segmentations."""
    if num_classes < 2:
        return label.new_zeros((label.shape[0], 1, *grid.shape[1:-1]))
    classes = torch.arange(1, num_classes, device=label.device).view(1, -1, *([1] * (label.ndim - 2)))
    onehot = (label.long() == classes).float()
    fg = F.grid_sample(onehot, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    probs = torch.cat([1 - fg.sum(1, keepdim=True), fg], dim=1)
    return probs.argmax(1, keepdim=True)


def _apply_spatial(image: torch.Tensor, label: torch.Tensor, plan: AugmentationPlan,
                   params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale the drawn samples about the centre of the sampled patch and crop the patch; the others
    are plain centre crops. Images are interpolated linearly, labels per class."""
    out_shape = list(plan.patch_size)
    image_out = _centre_crop(image, out_shape).clone()
    label_out = _centre_crop(label, out_shape).clone()
    if not plan.has("moved"):
        return image_out, label_out
    idx = plan.unpack(params, "moved").long()  # a device index: list or mask indexing would sync
    grid = _sampling_grid(plan.unpack(params, "maps"), image.shape[2:], out_shape)
    moved = F.grid_sample(image.index_select(0, idx).float(), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=True)
    image_out.index_copy_(0, idx, moved.to(image.dtype))
    chosen = label.index_select(0, idx)
    # each label channel on its own (a cascade carries the previous stage's label map as a second one)
    labels = torch.cat([_resample_labels(chosen[:, c:c + 1], grid, plan.num_classes)
                        for c in range(label.shape[1])], dim=1)
    label_out.index_copy_(0, idx, labels.to(label.dtype))
    return image_out, label_out


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


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, axes, radius: int) -> torch.Tensor:
    """Separable blur of every (sample, channel) with its own sigma per axis: sigma (B, C, dims); ``radius``
    (drawn with the sigmas) covers three of the largest."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
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


def simulate_low_resolution(x: torch.Tensor, pairs: tuple[LowResolution, ...]) -> torch.Tensor:
    """Down-sample (nearest) and up-sample (linear) back each drawn (sample, channel) pair."""
    spatial = list(x.shape[2:])
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    x = x.clone()
    for b, c, size in pairs:
        low = F.interpolate(x[b, c][None, None], size=list(size), mode="nearest-exact")
        x[b, c] = F.interpolate(low, size=spatial, mode=mode, align_corners=False)[0, 0]
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


def _mask(plan: AugmentationPlan, params: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
    return _per_channel(plan.unpack(params, name) > 0.5, x)


def _apply_intensity(x: torch.Tensor, plan: AugmentationPlan, params: torch.Tensor,
                     noise_generator: torch.Generator | None = None) -> torch.Tensor:
    if plan.has("noise_std"):
        if noise_generator is None:
            noise_generator = torch.Generator(device=x.device).manual_seed(plan.noise_seed)
        noise = torch.randn(x.shape, generator=noise_generator, device=x.device)
        x = x + noise * _per_channel(plan.unpack(params, "noise_std"), x)
    if plan.has("blur_sigma"):
        blurred = gaussian_blur(x, plan.unpack(params, "blur_sigma"), plan.blur_axes, plan.blur_radius)
        x = torch.where(_mask(plan, params, "blur_on", x), blurred, x)
    if plan.has("brightness"):
        x = x * _per_channel(plan.unpack(params, "brightness"), x)
    if plan.has("contrast"):
        # around the channel mean, clipped to the channel's previous range
        factor = _per_channel(plan.unpack(params, "contrast"), x)
        mean, lo, hi = (_channel_stats(x, f) for f in (torch.mean, torch.amin, torch.amax))
        x = torch.where(_mask(plan, params, "contrast_on", x), ((x - mean) * factor + mean).clamp(lo, hi), x)
    if plan.lowres:
        x = simulate_low_resolution(x, plan.lowres)
    for name, invert in (("gamma_inverted", True), ("gamma", False)):
        if plan.has(name):
            gamma = _per_channel(plan.unpack(params, name), x)
            x = torch.where(_mask(plan, params, f"{name}_on", x), _gamma(x, gamma, invert), x)
    return x


def _apply_mirror(image: torch.Tensor, label: torch.Tensor, plan: AugmentationPlan,
                  params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not plan.mirror_axes:
        return image, label
    flips = plan.unpack(params, "mirror") > 0.5
    for row, axis in enumerate(plan.mirror_axes):
        dim = axis + 2
        image = torch.where(_per_channel(flips[row], image), image.flip(dim), image)
        label = torch.where(_per_channel(flips[row], label), label.flip(dim), label)
    return image, label


def apply_augmentation(image: torch.Tensor, label: torch.Tensor, plan: AugmentationPlan,
                       params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment the batch as drawn: image (B, C, *sampled), label (B, L, *sampled) and ``params`` (the draw's
    packed tensor) on one device, any device. Only device work: nothing is copied to it or read from it."""
    image, label = _apply_spatial(image, label, plan, params)
    image = _apply_intensity(image.float(), plan, params)
    return _apply_mirror(image, label, plan, params)


# ---- both at once --------------------------------------------------------------------------------------


def augment_batch(image: torch.Tensor, label: torch.Tensor, patch_size, s: AugmentationSettings, seed: int,
                  num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, C, *sampled) float, label (B, 1, *sampled) integer, cut at ``sampling_patch_size``; returns
    the augmented (B, C, *patch) and (B, 1, *patch) on the batch's device. Deterministic given ``seed``.
    Without ``num_classes`` the labels' maximum is read: free on the host, a synchronisation on a GPU."""
    if num_classes is None:
        num_classes = int(label.max()) + 1
    draw = draw_augmentation(seed, image.shape[0], image.shape[1], patch_size, s, num_classes)
    return apply_augmentation(image, label, draw.plan, draw.params.to(image.device))


def intensity_transforms(x: torch.Tensor, s: AugmentationSettings, g: torch.Generator,
                         noise_generator: torch.Generator | None = None) -> torch.Tensor:
    """The intensity part alone on x (B, C, *spatial), parameters drawn from ``g``; the noise comes from
    ``noise_generator`` (on x's device), else from a seed drawn from ``g``."""
    pack = _Packer()
    spatial = tuple(x.shape[2:])
    intensity = _draw_intensity(g, x.shape[0], x.shape[1], spatial, s, pack)
    noise_seed = int(torch.randint(2**62, (), generator=g))
    plan = AugmentationPlan(spatial, 1, noise_seed, intensity.blur_radius, intensity.blur_axes, intensity.lowres,
                            layout=tuple(pack.layout))
    return _apply_intensity(x, plan, pack.packed().to(x.device), noise_generator)
