"""A trained run as one self-contained file: ``medseg-export run_dir=<run> output=<model>.zip``.

The archive holds everything prediction needs, so a model can be shared without its output tree:

    manifest.json                 format, version and the SHA-256 and size of every other member
    plan.json                     the plan (shared by every fold)
    labels.json                   the label scheme: values, names, regions
    postprocessing.json           the run's cross-validated post-processing (only where the run has one)
    model_card.json, MODEL_CARD.md   dataset, cross-validation metrics, the command that trained the run
    folds/fold_<k>/weights.npz    the fold's network weights: a NumPy archive of plain arrays
    folds/fold_<k>/model.json     configuration, model name and keys, training precision, source checkpoint
    folds/fold_<k>/run.json       the fold's resolved settings (the run record)
    folds/fold_<k>/metrics.json   the fold's validation summary (where the fold has one)

Weights are NumPy ``.npz`` arrays read with ``allow_pickle=False``: nothing in the archive is ever unpickled, not
even by torch's restricted ``weights_only`` unpickler, so a hostile archive cannot run code (safetensors would
do the same but is not a dependency). Loading first checks every member against the manifest: a damaged,
truncated or altered archive is refused naming the member, before any weights are used. The manifest detects
damage and edits; it is not a signature (whoever rewrites a member can rewrite the manifest too).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg import layout
from medseg.atomic import atomic_path, dumps_json
from medseg.checkpoint import load_weights_only
from medseg.errors import CheckpointError, MedsegError, WriteError
from medseg.inference.postprocessing import PostprocessingSpec, load_postprocessing
from medseg.inference.predictor import TrainedModel, build_model
from medseg.planning.plan import Plan

log = logging.getLogger(__name__)

FORMAT = "medseg-model"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
LABELS = "labels.json"
POSTPROCESSING = "postprocessing.json"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
# numpy has no bfloat16: such tensors are stored as float32 and cast back on loading (model.json says which)
_NUMPY_LESS = (torch.bfloat16,)


def fold_member(fold: int | str, name: str) -> str:
    return f"folds/{layout.fold_name(fold)}/{name}"


def is_archive(path: str | Path) -> bool:
    """A medseg model archive by name (a file ending in .zip); its content is checked when it is loaded."""
    return Path(path).suffix.lower() == ".zip"


# ---- writing ----------------------------------------------------------------------------------------------------

@dataclass
class FoldExport:
    key: int | str
    folder: Path
    checkpoint: Path


def exported_folds(run_dir: Path, checkpoint: str = "last", folds: list[int | str] | None = None) -> list[FoldExport]:
    """The run's finished folds (metrics.json written) with their chosen checkpoint; unfinished ones are left out
    with a warning. ``folds``: only those (each must be finished)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MedsegError(f"{run_dir}: run folder not found")
    candidates = layout.trained_fold_dirs(run_dir)
    if not candidates:
        raise MedsegError(f"{run_dir}: not a run folder (no fold_<k> folders in it)")
    wanted = None if folds is None else {str(f) for f in folds}
    chosen, unfinished = [], []
    for folder in candidates:
        key = layout.fold_key(folder)
        assert key is not None  # trained_fold_dirs lists fold folders only
        if wanted is not None and str(key) not in wanted:
            continue
        if not (folder / layout.METRICS).is_file():
            unfinished.append(folder)
            continue
        ckpt = next((c for c in (layout.checkpoint(folder, checkpoint), layout.checkpoint(folder)) if c.is_file()),
                    None)
        if ckpt is None:
            raise MedsegError(f"{folder}: finished, but {layout.checkpoint(folder, checkpoint)} is missing")
        chosen.append(FoldExport(key, folder, ckpt))
    if wanted is not None:
        missing = sorted(wanted - {str(f.key) for f in chosen} - {str(layout.fold_key(u)) for u in unfinished})
        if missing:
            raise MedsegError(f"{run_dir}: fold(s) {missing} not found")
        if unfinished:
            raise MedsegError(f"{unfinished[0]}: fold not finished (no {layout.METRICS}); finish its training first")
    if unfinished:
        log.warning("left out, not finished (no %s): %s", layout.METRICS, ", ".join(str(u) for u in unfinished))
    if not chosen:
        raise MedsegError(f"{run_dir}: no finished fold to export (a fold is finished once its {layout.METRICS} "
                          "is written)")
    return chosen


def _weights_npz(state: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, str]]:
    """The state dict as .npz bytes, and the original dtype of tensors numpy cannot hold."""
    arrays, dtypes = {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype in _NUMPY_LESS:
            dtypes[name] = str(tensor.dtype).removeprefix("torch.")
            tensor = tensor.float()
        arrays[name] = tensor.numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # names are keyword strings
    return buffer.getvalue(), dtypes


def _training_command(fold_dir: Path) -> str | None:
    """``medseg-train <overrides>`` of the fold's first Hydra run (fold_<k>/hydra/<time>/.hydra/overrides.yaml)."""
    import yaml

    runs = sorted((fold_dir / "hydra").glob("*/.hydra/overrides.yaml"))
    if not runs:
        return None
    overrides = yaml.safe_load(runs[0].read_text()) or []
    return " ".join(["medseg-train", *map(str, overrides)])


def _model_card(run_dir: Path, plan: Plan, folds: list[FoldExport], records: dict[str, dict],
                metrics: dict[str, dict], postprocessing: PostprocessingSpec | None, checkpoint: str) -> dict:
    per_fold = {}
    for f in folds:
        m = metrics.get(str(f.key), {})
        per_fold[layout.fold_name(f.key)] = {"dice": m.get("dice"), "dice_mean": m.get("dice_mean"),
                                             "hd95_mean": m.get("hd95_mean"), "nsd_mean": m.get("nsd_mean"),
                                             "num_cases": m.get("num_cases"), "epochs": m.get("epochs")}
    means = [v["dice_mean"] for v in per_fold.values() if isinstance(v["dice_mean"], (int, float))]
    first = records.get(str(folds[0].key), {})  # run.json: every fold trained by medseg has one
    commands = {layout.fold_name(f.key): _training_command(f.folder) for f in folds}
    return {"name": run_dir.name, "dataset": plan.dataset, "channels": plan.channel_names,
            "labels": plan.label_scheme.to_dict()["labels"], "configuration": first.get("configuration"),
            "model": first.get("model"), "loss": first.get("loss"),
            "training": {"epochs": first.get("max_epochs"), "iterations_per_epoch": first.get("iterations_per_epoch"),
                         "batch_size": first.get("batch_size"), "patch_size": first.get("patch_size"),
                         "precision": first.get("precision"),
                         "cases": {layout.fold_name(f.key): records.get(str(f.key), {}).get("num_train_cases")
                                   for f in folds}},
            "weights": checkpoint, "folds": [layout.fold_name(f.key) for f in folds],
            "cross_validation": {"per_fold": per_fold,
                                 "dice_mean_over_folds": float(np.mean(means)) if means else None},
            "postprocessing": postprocessing.to_dict() if postprocessing is not None else None,
            "training_commands": commands}


def _card_markdown(card: dict) -> str:
    labels = ", ".join(f"{k} {v}" for k, v in card["labels"].items())
    model = card["model"] or {}
    lines = [f"# {card['name']}", "",
             f"Segmentation model trained with medseg on **{card['dataset']}** ({card['configuration']}).", "",
             f"* model: {model.get('name')} {model.get('kwargs') or ''}".rstrip(),
             f"* channels: {', '.join(card['channels'])}; labels: {labels}",
             f"* weights: `{card['weights']}` of {', '.join(card['folds'])} (ensembled at prediction)",
             f"* post-processing: {card['postprocessing'] or 'none'}", "",
             "## Cross-validation (held-out cases of each fold)", "",
             "| fold | cases | mean Dice | per class |", "|---|---|---|---|"]
    for fold, m in card["cross_validation"]["per_fold"].items():
        per_class = ", ".join(f"{k} {v:.4f}" for k, v in (m["dice"] or {}).items())
        mean = f"{m['dice_mean']:.4f}" if isinstance(m["dice_mean"], (int, float)) else "-"
        lines.append(f"| {fold} | {m['num_cases']} | {mean} | {per_class} |")
    over = card["cross_validation"]["dice_mean_over_folds"]
    lines += ["", f"Mean Dice over folds: {over:.4f}" if over is not None else "", "", "## Training", ""]
    for fold, command in card["training_commands"].items():
        lines.append(f"* {fold}: `{command or 'not recorded'}`")
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | Path, output: str | Path, checkpoint: str = "last",
               folds: list[int | str] | None = None, overwrite: bool = False) -> Path:
    """Write the run's finished folds into one model archive at ``output`` (atomically; an existing file is
    refused unless ``overwrite``). Returns the archive's path."""
    run_dir, output = Path(run_dir), Path(output)
    if not is_archive(output):
        raise MedsegError(f"output={output}: a model archive is a .zip file")
    if output.exists() and not overwrite:
        raise MedsegError(f"{output} exists; medseg-export never replaces a file unless overwrite=true")
    chosen = exported_folds(run_dir, checkpoint, folds)
    members: dict[str, bytes] = {}
    plan_dict: dict | None = None
    records: dict[str, dict] = {}
    metrics: dict[str, dict] = {}
    for f in chosen:
        ckpt = load_weights_only(f.checkpoint)
        if not isinstance(ckpt, dict) or "medseg" not in ckpt or "state_dict" not in ckpt:
            raise CheckpointError(f"{f.checkpoint}: not a medseg checkpoint (no plan inside)")
        extras = ckpt["medseg"]
        if extras.get("previous_stage") or Plan.from_dict(extras["plan"]).configuration(
                extras["configuration"]).previous_stage:
            raise MedsegError(f"{f.checkpoint}: a cascade stage ({extras['configuration']}) needs its previous "
                              "stage's run at prediction; exporting cascades is not supported")
        if plan_dict is None:
            plan_dict = extras["plan"]
        elif extras["plan"] != plan_dict:
            raise MedsegError(f"{f.checkpoint}: its plan differs from that of {chosen[0].checkpoint}; the folds of "
                              "one archive must share their plan")
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        weights, dtypes = _weights_npz(state)
        members[fold_member(f.key, "weights.npz")] = weights
        info = {"fold": f.key, "configuration": extras["configuration"], "model": extras["model"],
                "precision": str(extras.get("precision", "32-true")), "dtypes": dtypes,
                "checkpoint": f"{layout.CHECKPOINTS}/{f.checkpoint.name}"}
        members[fold_member(f.key, "model.json")] = dumps_json(info, indent=1).encode()
        for name, store in ((layout.RUN_RECORD, records), (layout.METRICS, metrics)):
            path = f.folder / name
            if path.is_file():
                text = path.read_bytes()
                store[str(f.key)] = json.loads(text)
                members[fold_member(f.key, name)] = text
    assert plan_dict is not None  # at least one fold
    plan = Plan.from_dict(plan_dict)
    postprocessing = load_postprocessing(run_dir)
    members[PLAN] = dumps_json(plan_dict, indent=1).encode()
    members[LABELS] = dumps_json({**plan.label_scheme.to_dict(), "channel_names": plan.channel_names},
                                 indent=1).encode()
    if postprocessing is not None:
        members[POSTPROCESSING] = dumps_json(postprocessing.to_dict(), indent=1).encode()
    card = _model_card(run_dir, plan, chosen, records, metrics, postprocessing, checkpoint)
    members[CARD_JSON] = dumps_json(card, indent=1).encode()
    members[CARD_MD] = _card_markdown(card).encode()
    manifest = {"format": FORMAT, "version": VERSION,
                "members": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                            for name, data in sorted(members.items())}}
    try:
        with atomic_path(output, suffix=".zip") as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(MANIFEST, dumps_json(manifest, indent=1))
                for name, data in sorted(members.items()):
                    archive.writestr(name, data)
    except OSError as e:
        raise WriteError(f"{output}: cannot write ({e.strerror or e}); nothing was replaced") from e
    log.info("exported %d fold(s) of %s to %s", len(chosen), run_dir, output)
    return output


# ---- reading ----------------------------------------------------------------------------------------------------

def _refused(path: Path, member: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: member {member} {why}; the archive is damaged or was altered, "
                           "so the model is not loaded")


def read_archive(path: str | Path) -> dict[str, bytes]:
    """Every member of a model archive, each checked against the manifest (SHA-256 and size). A truncated or
    damaged archive, a member missing, added or altered: one CheckpointError naming the file and the member."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model archive not found")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable model archive; it is truncated or damaged ({e})") from None
    with archive:
        names = archive.namelist()
        if MANIFEST not in names:
            raise CheckpointError(f"{path}: not a medseg model archive (no {MANIFEST})")
        data: dict[str, bytes] = {}
        for name in names:
            try:
                data[name] = archive.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
                raise _refused(path, name, "is corrupt (fails its CRC-32 check or does not decompress)") from None
    try:
        manifest = json.loads(data.pop(MANIFEST))
        expected = manifest["members"]
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: member {MANIFEST} is not a medseg manifest ({e})") from None
    if int(manifest.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: archive version {manifest['version']} is newer than this medseg "
                              f"reads ({VERSION}); update medseg")
    for name in sorted(set(expected) - set(data)):
        raise _refused(path, name, "is listed in the manifest but missing")
    for name in sorted(set(data) - set(expected)):
        raise _refused(path, name, "is not listed in the manifest")
    for name, entry in sorted(expected.items()):
        digest = hashlib.sha256(data[name]).hexdigest()
        if digest != entry["sha256"] or len(data[name]) != entry["bytes"]:
            raise _refused(path, name, f"does not match the manifest (SHA-256 {digest[:12]}..., "
                                       f"expected {str(entry['sha256'])[:12]}...)")
    return data


@dataclass
class ModelArchive:
    """A verified archive: the plan, each fold's members, the post-processing and the model card."""

    path: Path
    members: dict[str, bytes]
    plan: Plan
    folds: list[str]  # fold keys as in folds/fold_<k>
    postprocessing: PostprocessingSpec | None
    card: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "ModelArchive":
        path = Path(path)
        members = read_archive(path)
        try:
            plan = Plan.from_dict(json.loads(members[PLAN]))
            folds = sorted({name.split("/")[1].removeprefix("fold_") for name in members
                            if name.startswith("folds/") and name.endswith("/weights.npz")},
                           key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
            post = (PostprocessingSpec.from_dict(json.loads(members[POSTPROCESSING]))
                    if POSTPROCESSING in members else None)
            card = json.loads(members[CARD_JSON]) if CARD_JSON in members else {}
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: not a medseg model archive ({type(e).__name__}: {e})") from None
        if not folds:
            raise CheckpointError(f"{path}: the archive holds no fold weights")
        return cls(path, members, plan, folds, post if post is not None and post.enabled else None, card)

    def fold_info(self, fold: str) -> dict:
        return json.loads(self.members[fold_member(fold, "model.json")])

    def state_dict(self, fold: str) -> dict[str, torch.Tensor]:
        """The fold's weights as tensors; read with allow_pickle=False, so nothing is unpickled."""
        member = fold_member(fold, "weights.npz")
        dtypes = self.fold_info(fold).get("dtypes", {})
        try:
            with np.load(io.BytesIO(self.members[member]), allow_pickle=False) as npz:
                state = {name: torch.from_numpy(np.array(npz[name])) for name in npz.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{self.path}: member {member} is not a weights archive ({e})") from None
        for name, dtype in dtypes.items():
            state[name] = state[name].to(getattr(torch, dtype))
        return state

    def select(self, folds: list[int | str] | None) -> list[str]:
        if folds is None:
            return list(self.folds)
        wanted = [str(f) for f in folds]
        missing = [f for f in wanted if f not in self.folds]
        if missing:
            raise MedsegError(f"{self.path}: fold(s) {missing} not in the archive (it holds {self.folds})")
        return wanted

    def load_models(self, device: torch.device, folds: list[int | str] | None = None) -> list[TrainedModel]:
        models = []
        for fold in self.select(folds):
            info = self.fold_info(fold)
            source = f"{self.path}::{fold_member(fold, 'weights.npz')}"
            config = self.plan.configuration(info["configuration"])
            model = build_model(self.plan, config, info["model"])
            try:
                model.load_state_dict(self.state_dict(fold))
            except RuntimeError as e:
                raise CheckpointError(f"{source}: the weights do not fit the model ({str(e)[:300]})") from None
            model.to(device).eval()
            models.append(TrainedModel(model, self.plan, config, source, str(info.get("precision", "32-true")),
                                       model_spec=info["model"]))
        return models
