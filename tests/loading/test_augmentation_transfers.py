"""Device-side augmentation never waits on the host: its parameters arrive with the batch as one tensor, and
applying them neither copies anything to the device nor reads anything back.

On CPU every tensor is a CPU tensor, so the checks follow which tensors stand for device ones and count the
calls that, on a GPU, would be a host-to-device copy (``.to``/``.cuda`` of a host tensor, tensors made from
python data, host tensors or list indices in device work) or a device-to-host read (``item``, ``int()``,
``bool()``, ``tolist``, ``nonzero``, boolean masks...)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from medseg.loading.augmentation import (AugmentationSettings, apply_augmentation, draw_augmentation, nnunet_settings,
                                      sampling_patch_size)
from medseg.loading.datamodule import PatchBatches, SegmentationDataModule
from medseg.preprocessing.cache import PreprocessedCache
from medseg.preprocessing.pipeline import class_locations

PATCH = [12, 16, 12]

# every transform on for every sample (mirroring stays at nnU-Net's p 0.5 per axis)
EVERYTHING = replace(nnunet_settings(PATCH), p_rotation=1.0, p_scaling=1.0, p_noise=1.0, p_blur=1.0,
                     p_blur_per_channel=1.0, p_brightness=1.0, p_contrast=1.0, p_lowres=1.0,
                     p_lowres_per_channel=1.0, p_gamma_inverted=1.0, p_gamma=1.0)

READS = {"item", "__int__", "__float__", "__bool__", "__index__", "__format__", "tolist", "numpy", "nonzero",
         "argwhere", "masked_select", "unique", "cpu"}
MOVES = {"to", "cuda"}
FROM_HOST = {"tensor", "as_tensor"}


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat = []
    for a in list(args) + list(kwargs.values()):
        flat.extend(a if isinstance(a, (list, tuple)) else [a])
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _names_a_device(args, kwargs) -> bool:
    candidates = list(args) + [kwargs.get("device")]
    return any(isinstance(a, (str, torch.device, torch.Tensor)) or (isinstance(a, int) and not isinstance(a, bool))
               for a in candidates if a is not None)


def _index_parts(index) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _list_index(index) -> bool:
    """A python list index is copied to the device."""
    return any(isinstance(p, list) for p in _index_parts(index))


def _mask_index(index) -> bool:
    """A boolean mask index waits for the device to count its entries."""
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in _index_parts(index))


@dataclass
class HostTraffic(TorchFunctionMode):
    """Stands in for a GPU on CPU: tensors handed to ``on_device`` and everything computed from them (or made
    with a ``device=``) count as device tensors; records the calls that would, on a GPU, copy host data to the
    device (explicitly, or by mixing a host tensor or a list index into device work) or read a device value."""

    transfers: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    @staticmethod
    def on_device(*tensors):
        for t in tensors:
            t.on_device = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = _tensors(args, kwargs)
        device = [getattr(t, "on_device", False) for t in inputs]
        self_on_device = bool(inputs) and device[0] and inputs[0] is (args[0] if args else None)
        if self_on_device and (name in READS or (name == "where" and len(inputs) == 1)):
            self.reads.append(name)
        elif self_on_device and name in ("__getitem__", "__setitem__") and _mask_index(args[1]):
            self.reads.append(f"{name} (mask index)")
        elif self_on_device and name in ("__getitem__", "__setitem__") and _list_index(args[1]):
            self.transfers.append(f"{name} (list index)")
        elif name in MOVES and not self_on_device and _names_a_device(args[1:], kwargs):
            self.transfers.append(f"{name} (host tensor)")
        elif name in FROM_HOST and kwargs.get("device") is not None:
            self.transfers.append(f"{name} (python data)")
        elif any(device) and not all(device):
            self.transfers.append(f"{name} (host tensor in device work)")
        out = func(*args, **kwargs)
        if any(device) or kwargs.get("device") is not None or (name in MOVES and _names_a_device(args[1:], kwargs)):
            self.on_device(*_tensors([out], {}))
        return out


def _cache(folder) -> PreprocessedCache:
    """Two real preprocessed cases, two foreground classes."""
    cache = PreprocessedCache(folder)
    for k in range(2):
        g = np.random.default_rng(k)
        data = g.normal(size=(2, 20, 26, 22)).astype(np.float32)
        label = np.zeros((20, 26, 22), dtype=np.uint8)
        label[8:12, 10:16, 9:13] = 1
        label[9:11, 12:14, 10:12] = 2
        cache.write(str(k), "key", data, label, class_locations(label, [1, 2]), {})
    return cache


def _batches(tmp_path, settings: AugmentationSettings, in_loader: bool) -> PatchBatches:
    return PatchBatches(_cache(tmp_path), ["0", "1"], PATCH, 4, 3, 0.5, settings, augment_in_loader=in_loader)


def _module(train_set: PatchBatches) -> SegmentationDataModule:
    dm = SegmentationDataModule.__new__(SegmentationDataModule)
    dm.train_set = train_set
    return dm


def test_the_instrument_sees_copies_and_reads():
    x = torch.rand(4, 3)
    traffic = HostTraffic()
    traffic.on_device(x)
    with traffic:
        y = (x * 2).sum(0)
        int(y.argmax()), float(y[0]), bool(y.any()), y.tolist(), x[x > 0.5]
        y + torch.ones(3)
        torch.ones(3).to(y.device), torch.as_tensor([1, 2], device=y.device), x[[0, 2]]
        x * torch.ones(3, device=x.device), x.to(torch.float64), x[1:, 0]  # device work: not counted
    assert traffic.reads == ["__int__", "__float__", "__bool__", "tolist", "__getitem__ (mask index)"]
    assert traffic.transfers == ["add (host tensor in device work)", "to (host tensor)", "as_tensor (python data)",
                                 "__getitem__ (list index)"]


def test_deferred_batch_carries_its_parameters_as_one_host_tensor(tmp_path):
    item = _batches(tmp_path, EVERYTHING, in_loader=False)[0]
    tensors = sorted(k for k, v in item.items() if isinstance(v, torch.Tensor))
    assert tensors == ["image", "label", "params"]
    params = item["params"]
    assert params.dtype == torch.float32 and params.ndim == 1 and params.device.type == "cpu"
    # the rest is python data: the DataLoader and Lightning pass it on as it is
    plan = item["plan"]
    assert not any(isinstance(getattr(plan, f.name), torch.Tensor) for f in fields(plan))
    assert list(item["image"].shape[2:]) == sampling_patch_size(PATCH, EVERYTHING)


def test_deferred_augmentation_neither_copies_to_nor_reads_from_the_device(tmp_path):
    batches = _batches(tmp_path, EVERYTHING, in_loader=False)
    item = batches[0]
    traffic = HostTraffic()
    traffic.on_device(*(v for v in item.values() if isinstance(v, torch.Tensor)))
    with traffic:
        image, label = _module(batches).on_after_batch_transfer(item, 0)
    assert image.shape == (4, 2, *PATCH) and label.shape == (4, 1, *PATCH) and label.dtype == torch.long
    assert traffic.transfers == [] and traffic.reads == [], (traffic.transfers, traffic.reads)


def test_applying_runs_on_a_device_that_holds_no_values():
    # meta tensors have shapes but no data: a read fails there, and so does mixing in a host tensor
    s = replace(EVERYTHING, p_noise=0.0)  # no generator exists on the meta device
    size = sampling_patch_size(PATCH, s)
    draw = draw_augmentation(5, 4, 2, PATCH, s, num_classes=3)
    image = torch.empty(4, 2, *size, device="meta")
    label = torch.empty(4, 1, *size, dtype=torch.uint8, device="meta")
    x, y = apply_augmentation(image, label, draw.plan, draw.params.to("meta"))
    assert x.shape == (4, 2, *PATCH) and y.shape == (4, 1, *PATCH) and x.is_meta and y.is_meta


def test_every_transform_ran_in_the_checked_batch(tmp_path):
    batches = _batches(tmp_path, EVERYTHING, in_loader=False)
    plan = batches[0]["plan"]
    for name in ("moved", "maps", "noise_std", "blur_sigma", "brightness", "contrast", "gamma_inverted", "gamma"):
        assert plan.has(name), name
    assert plan.lowres and plan.blur_radius > 0
    # mirroring is left at p 0.5 per axis: some batches have no flip at all (1 in 4096 here)
    assert plan.has("mirror") or any(batches[i]["plan"].has("mirror") for i in (1, 2))


def test_the_dataloader_and_lightning_move_only_the_three_tensors(tmp_path):
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torch.utils.data._utils.collate import default_convert
    from torch.utils.data._utils.pin_memory import pin_memory

    item = _batches(tmp_path, EVERYTHING, in_loader=False)[0]
    plan = item["plan"]
    assert pickle.loads(pickle.dumps(plan)) == plan  # from a loader worker
    assert default_convert(item)["plan"] is plan
    assert pin_memory({"plan": plan})["plan"] is plan  # tensors cannot be pinned without CUDA
    traffic = HostTraffic()
    with traffic:
        moved = move_data_to_device(item, torch.device("cpu"))
    assert moved["plan"] is plan and traffic.transfers == ["to (host tensor)"] * 3 and traffic.reads == []


def test_deferred_and_in_loader_augmentation_give_the_same_batch(tmp_path):
    for settings in (EVERYTHING, nnunet_settings(PATCH)):
        batches = _batches(tmp_path, settings, in_loader=False)
        deferred = _module(batches).on_after_batch_transfer(batches[0], 0)
        in_loader = _batches(tmp_path, settings, in_loader=True)[0]
        assert torch.equal(deferred[0], in_loader[0]) and torch.equal(deferred[1], in_loader[1])
