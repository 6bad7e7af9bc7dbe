"""ONNX export of trained networks and an onnxruntime backend for prediction.

``medseg-export ... format=onnx`` writes ``<name>_fold_<k>.onnx`` per fold and ``<name>.json``, which describes
everything around the network (preprocessing, its statistics, patch, axis order, mirroring, sliding window, label
scheme, post-processing, the plan). ``medseg-predict backend=onnxruntime`` runs medseg's own sliding window with an
onnxruntime session in place of the torch network, from that description, a run folder or a model archive.

Export uses torch's TorchScript-based exporter (``dynamo=False``): the default dynamo exporter needs
``onnxscript``, which medseg does not depend on; the networks here are traced at the fixed patch size, which the
TorchScript exporter handles. The batch axis stays dynamic (sliding-window batches, mirrored copies, 2D slices).

Families and what export does with them (tests/inference/test_onnx.py checks each):
- unet, resenc_unet, swin_unetr, unetr, unetr_small: exported as they are.
- umamba_bot, umamba_enc: mambapy's parallel scan does not survive tracing (in-place updates of views: the
  exported graph's logits are off by ~1e-3), so Mamba layers are exported with mambapy's sequential scan, which
  computes the same recurrence and traces exactly but unrolls one step per token: layers with more than
  MAMBA_MAX_TOKENS tokens at the patch are refused (U-Mamba Bot's bottleneck fits; U-Mamba Enc's
  full-resolution stages at real patch sizes do not).
- vilu_net: refused; its chunkwise mLSTM computes with the batch size read from tensor shapes, which the
  TorchScript exporter cannot trace with a dynamic batch axis (SymbolicValueError), and the dynamo exporter needs
  onnxscript. (A fixed batch of 1 does trace, exactly, but unrolls every chunk: 18 s for a 16^3 toy network.)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from medseg import layout
from medseg.atomic import atomic_path, dumps_json
from medseg.errors import CheckpointError, MedsegError, WriteError
from medseg.inference.postprocessing import PostprocessingSpec
from medseg.inference.predictor import TrainedModel, resolve_mirror_axes
from medseg.planning.plan import Plan
from medseg.preprocessing.previous_stage import num_input_channels

log = logging.getLogger(__name__)

FORMAT = "medseg-onnx"
VERSION = 1
OPSET = 17
INPUT, OUTPUT = "image", "logits"
MAMBA_MAX_TOKENS = 2048  # sequential-scan export unrolls one step per token: ~9 ms of export and 1 kB each


def _module_classes(model: nn.Module) -> set[str]:
    return {f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()}


def unexportable_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be exported to ONNX, or None where it can (checked before any export is tried)."""
    if "medseg.models.mlstm.mLSTMLayer" in _module_classes(model):
        return ("its chunkwise mLSTM (ViLU-Net) computes with the batch size read from tensor shapes, which "
                "torch's TorchScript-based ONNX exporter cannot trace with a dynamic batch axis (SymbolicValueError; "
                "the dynamo exporter would need onnxscript)")
    return None


def _mamba_blocks(model: nn.Module) -> list[Any]:
    from mambapy.mamba import MambaBlock

    return [m for m in model.modules() if isinstance(m, MambaBlock)]


def _token_counts(model: nn.Module, example: torch.Tensor, blocks: list[Any]) -> list[int]:
    """Sequence length each Mamba block sees at the patch (one forward pass with hooks)."""
    seen: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[1]))) for b in blocks]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


@contextlib.contextmanager
def _sequential_scan(blocks: list[Any]) -> Iterator[None]:
    """mambapy's sequential scan while exporting (the parallel one does not trace correctly)."""
    before = [b.config.pscan for b in blocks]
    for b in blocks:
        b.config.pscan = False
    try:
        yield
    finally:
        for b, value in zip(blocks, before):
            b.config.pscan = value


def export_network(model: nn.Module, in_channels: int, patch_size: list[int], target: str | Path | io.BytesIO,
                   source: str = "model") -> None:
    """Trace ``model`` (eval mode, CPU) at the patch with a dynamic batch axis into ONNX at ``target``."""
    reason = unexportable_reason(model)
    if reason:
        raise MedsegError(f"{source}: cannot be exported to ONNX: {reason}")
    model = model.cpu().eval()
    example = torch.zeros(1, in_channels, *patch_size)
    blocks = _mamba_blocks(model)
    if blocks:
        tokens = max(_token_counts(model, example, blocks))
        if tokens > MAMBA_MAX_TOKENS:
            raise MedsegError(f"{source}: cannot be exported to ONNX: a Mamba layer sees {tokens} tokens at the "
                              f"patch {patch_size}; its sequential-scan export unrolls one step per token and is "
                              f"limited to {MAMBA_MAX_TOKENS} (U-Mamba Bot, or umamba_enc with a smaller "
                              "model.mamba_max_tokens, fit)")
    with _sequential_scan(blocks), warnings.catch_warnings():
        # tracer warnings about Python values taken from shapes: the patch is fixed, the batch axis is dynamic
        warnings.simplefilter("ignore")
        # a BytesIO target works too (torch's annotation names paths only)
        torch.onnx.export(model, (example,), target,  # type: ignore[arg-type]
                          dynamo=False, opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


class OnnxNetwork(nn.Module):
    """An onnxruntime session behind nn.Module's call: the sliding window feeds it as it feeds a torch network
    (float32 (batch, c, *patch) in, logits out, on the input's device)."""

    def __init__(self, model: bytes | str, device: torch.device | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch was given
        providers = ["CPUExecutionProvider"]
        if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            where = model if isinstance(model, str) else "exported network"
            raise CheckpointError(f"{where}: not a loadable ONNX model ({str(e)[:300]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def to_onnxruntime(models: list[TrainedModel], device: torch.device | None = None) -> list[TrainedModel]:
    """Each model exported to ONNX in memory and run by onnxruntime (float32), same plan and configuration."""
    out = []
    for m in models:
        buffer = io.BytesIO()
        export_network(m.model, num_input_channels(m.plan, m.config), m.config.patch_size, buffer, m.source)
        out.append(TrainedModel(OnnxNetwork(buffer.getvalue(), device), m.plan, m.config, m.source, "32-true",
                                m.previous_stage))
    return out


# ---- the export on disk: <name>_fold_<k>.onnx + <name>.json ----------------------------------------------------

def describe(plan: Plan, models: dict[str, TrainedModel], files: dict[str, str], hashes: dict[str, str],
             records: dict[str, Any], postprocessing: PostprocessingSpec | None, source: str) -> dict:
    """What a consumer of the ONNX files must do around the network, as medseg does it."""
    first = next(iter(models.values()))
    config = first.config
    scheme = plan.label_scheme
    norm = []
    for c, (name, scheme_name) in enumerate(zip(plan.channel_names, config.normalization)):
        stats = plan.intensity_properties[c] if c < len(plan.intensity_properties) else None
        norm.append({"channel": c, "name": name, "scheme": scheme_name, "use_nonzero_mask": config.use_mask_for_norm[c],
                     "statistics": stats if scheme_name == "ct" else None})
    values = scheme.regions_class_order if scheme.has_regions else scheme.values
    return {
        "format": FORMAT, "version": VERSION, "source": source, "opset": OPSET,
        "files": files, "sha256": hashes,
        "input": {"name": INPUT, "shape": ["batch", num_input_channels(plan, config), *config.patch_size],
                  "dtype": "float32",
                  "note": "one preprocessed patch per batch item, axes (channel, *patch) in the planning axis order"},
        "output": {"name": OUTPUT, "shape": ["batch", scheme.num_outputs, *config.patch_size], "dtype": "float32",
                   "activation": "sigmoid per region" if scheme.has_regions else "softmax over channels",
                   "channel_label_values": [int(v) for v in values]},
        "preprocessing": {
            "array_order": "SimpleITK's (z, y, x): a file's voxel axes reversed, for every format",
            "transpose": plan.transpose,
            "crop": "to the bounding box of voxels nonzero in any channel",
            "target_spacing": config.spacing,
            "resampling": "images: order 3 (anisotropic, spacing ratio > 3: in-plane order 3, nearest along the "
                          "coarse axis); logits back to the input grid: linear",
            "normalization": norm},
        "sliding_window": {"patch_size": config.patch_size, "overlap": 0.5,
                           "weighting": "gaussian (MONAI, sigma_scale 0.125)", "padding": "constant 0",
                           "mirror_axes": list(resolve_mirror_axes("all", config.spatial_dims) or ()),
                           "mirroring": "mean of the logits of every combination of flips along mirror_axes",
                           "ensemble": "mean of the folds' logits"},
        "configuration": config.name, "spatial_dims": config.spatial_dims,
        "labels": scheme.to_dict(), "channel_names": plan.channel_names,
        "postprocessing": postprocessing.to_dict() if postprocessing is not None else None,
        "models": records, "plan": plan.to_dict(),
    }


def export_onnx(models: dict[str, TrainedModel], records: dict[str, Any], postprocessing: PostprocessingSpec | None,
                output_dir: str | Path, name: str, source: str, overwrite: bool = False) -> list[Path]:
    """``<output_dir>/<name>_fold_<k>.onnx`` per fold and ``<name>.json``; existing files are refused unless
    ``overwrite``, every file is written atomically, the description last."""
    output_dir = Path(output_dir)
    files = {fold: f"{name}_{fold}.onnx" for fold in models}
    targets = [output_dir / f for f in files.values()] + [output_dir / f"{name}.json"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise MedsegError(f"{existing[0]} exists; medseg-export never replaces a file unless overwrite=true")
    for m in models.values():  # refuse before any file is written
        reason = unexportable_reason(m.model)
        if reason:
            raise MedsegError(f"{m.source}: cannot be exported to ONNX: {reason}")
    plan = next(iter(models.values())).plan
    hashes = {}
    try:
        for fold, m in models.items():
            buffer = io.BytesIO()
            export_network(m.model, num_input_channels(m.plan, m.config), m.config.patch_size, buffer, m.source)
            data = buffer.getvalue()
            hashes[fold] = hashlib.sha256(data).hexdigest()
            with atomic_path(output_dir / files[fold], suffix=".onnx") as tmp:
                tmp.write_bytes(data)
        description = describe(plan, models, files, hashes, records, postprocessing, source)
        with atomic_path(targets[-1], suffix=".json") as tmp:
            tmp.write_text(dumps_json(description, indent=1))
    except OSError as e:
        raise WriteError(f"{output_dir}: cannot write ({e.strerror or e})") from e
    return targets


@dataclass
class OnnxExport:
    """A description written by export_onnx, with each fold's ONNX file checked against its SHA-256."""

    path: Path
    description: dict
    plan: Plan
    postprocessing: PostprocessingSpec | None

    @classmethod
    def open(cls, path: str | Path) -> "OnnxExport":
        path = Path(path)
        try:
            description = json.loads(path.read_text())
            if description.get("format") != FORMAT:
                raise ValueError(f"format {description.get('format')!r}, expected {FORMAT!r}")
            plan = Plan.from_dict(description["plan"])
            post = description.get("postprocessing")
            spec = PostprocessingSpec.from_dict(post) if post else None
        except FileNotFoundError:
            raise MedsegError(f"{path}: ONNX description not found") from None
        except (ValueError, KeyError, TypeError) as e:
            raise MedsegError(f"{path}: not a medseg ONNX description ({e})") from None
        return cls(path, description, plan, spec if spec is not None and spec.enabled else None)

    @property
    def folds(self) -> list[str]:
        return list(self.description["files"])

    def load_models(self, device: torch.device | None = None,
                    folds: list[int | str] | None = None) -> list[TrainedModel]:
        wanted = self.folds if folds is None else [layout.fold_name(f) for f in folds]
        missing = [f for f in wanted if f not in self.description["files"]]
        if missing:
            raise MedsegError(f"{self.path}: {missing} not in the export (it holds {self.folds})")
        config = self.plan.configuration(self.description["configuration"])
        models = []
        for fold in wanted:
            file = self.path.parent / self.description["files"][fold]
            if not file.is_file():
                raise CheckpointError(f"{file}: ONNX file missing (listed in {self.path})")
            data = file.read_bytes()
            if hashlib.sha256(data).hexdigest() != self.description["sha256"][fold]:
                raise CheckpointError(f"{file}: does not match the SHA-256 in {self.path}; the file is damaged or "
                                      "was altered, so the model is not loaded")
            models.append(TrainedModel(OnnxNetwork(data, device), self.plan, config, str(file), "32-true"))
        return models
