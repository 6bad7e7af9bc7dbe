"""Peak memory and wall time of medseg-predict on one large CT volume, on CPU.

Generates a CT-like volume (512 x 512 x 300 voxels, int16, 0.8 x 0.8 x 2.5 mm, air, a body with lungs, bone and
bright contrast blobs), plans a dataset of such scans (the planner's own rules on a fingerprint of 20 CT-like
cases: 3d_fullres, nnU-Net's default U-Net), saves a checkpoint of that network with random weights, then runs
``medseg-predict`` on the volume in a subprocess and reports its peak RSS (getrusage of the child, plus an RSS
timeline sampled from /proc) and wall time. The volume is resampled on the way in and out (plan spacing 0.78 mm
in-plane), as most real cases are.

    python benchmarks/large_volume_memory.py [--work DIR] [--base-features 4] [--overlap 0]
                                             [--mirror-axes [0]] [--sw-batch-size auto]

nnU-Net's default width (32 base features) costs one to two minutes per window on 2 CPU cores and the volume
has over 200 windows at overlap 0.5 (times 8 with mirroring): hours. So the pipeline runs a narrow copy of the
same network by default (4 base features: same topology, patch and volume-sized buffers), and a probe measures,
each in its own process, the activation memory of one forward pass of the narrow and of the full-width network
at the batch sizes used: the full-width peak is the pipeline's peak with the narrow network's window
activations replaced by the full-width ones, plus the difference in weights (the only memory that depends on
the width). --base-features 32 runs the full-width network end to end where time allows.

The defaults (no overlap, one mirrored pass) need the same memory as overlap 0.5 with mirroring on all axes in a
fraction of the time: the sliding window's buffers are sized by the volume, not by the number of windows, and
mirrored passes run one after the other, each needing what the first one needs. Target: peak below 8 GB.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medseg.atomic import write_json
from medseg.models import create_model
from medseg.planning.fingerprint import CaseFingerprint, ChannelIntensity, DatasetFingerprint
from medseg.planning.planner import PlannerSettings, plan_dataset

SHAPE_IJK = (512, 512, 300)  # nibabel voxel order: x, y, z
SPACING_IJK = (0.8, 0.8, 2.5)
LABELS = {0: "background", 1: "organ", 2: "lesion"}
TARGET_GB = 8.0


def ct_like_volume(seed: int = 0) -> np.ndarray:
    """int16 Hounsfield-like units: air outside an elliptic body, lungs, a spine, bright contrast blobs."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = SHAPE_IJK
    x = ((np.arange(nx, dtype=np.float32) - nx / 2) * SPACING_IJK[0])[:, None]
    y = ((np.arange(ny, dtype=np.float32) - ny / 2) * SPACING_IJK[1])[None, :]
    body = (x / 170) ** 2 + (y / 120) ** 2 <= 1
    lungs = (((np.abs(x) - 75) / 55) ** 2 + ((y + 10) / 70) ** 2 <= 1)
    spine = (x / 18) ** 2 + ((y - 85) / 18) ** 2 <= 1
    plane = np.full((nx, ny), -1000, np.int16)
    plane[body] = 40
    plane[lungs & body] = -850
    plane[spine] = 700
    volume = np.repeat(plane[:, :, None], nz, axis=2)
    volume += rng.normal(0, 20, volume.shape).astype(np.int16)
    for _ in range(12):  # contrast-enhanced blobs, 8-30 mm
        c = rng.uniform([150, 150, 20], [nx - 150, ny - 150, nz - 20])
        r = rng.uniform(8, 30) / np.asarray(SPACING_IJK)
        lo, hi = np.maximum((c - r).astype(int), 0), np.minimum((c + r).astype(int) + 1, SHAPE_IJK)
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1
        block = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        block[inside] = rng.integers(180, 320)
    return volume


def ct_plan():
    """The planner's own plan for a dataset of such scans (array order z, y, x)."""
    rng = np.random.default_rng(1)
    cases = [CaseFingerprint(f"ct_{i:03d}", [float(rng.choice([2.0, 2.5, 2.5, 3.0])), 0.78, 0.78],
                             [300, 512, 512], [int(rng.integers(250, 350)), 512, 512], 0.9) for i in range(20)]
    intensity = [ChannelIntensity(mean=60.0, std=180.0, min=-1024.0, max=3000.0, median=45.0,
                                  percentile_00_5=-950.0, percentile_99_5=1200.0)]
    fp = DatasetFingerprint("CTLike", "", cases, intensity)
    return plan_dataset(fp, ["CT"], LABELS, PlannerSettings())


def save_checkpoint(plan, path: Path, base_features: int) -> dict:
    """A medseg checkpoint of the plan's 3d_fullres default U-Net with random weights."""
    plan = copy.deepcopy(plan)  # the checkpoint carries its own plan: narrowed, it rebuilds the narrow network
    config = plan.configuration("3d_fullres")
    if base_features != 32:  # same topology and patch, narrower: compute scales with the square of the width
        config.features = [max(1, f * base_features // 32) for f in config.features]
    torch.manual_seed(0)
    net = create_model("unet", 3, 1, len(LABELS), plan=config)
    extras = {"plan": plan.to_dict(), "configuration": "3d_fullres", "fold": 0, "model": {"name": "unet", "kwargs": {}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "medseg": extras}, path)
    return {"patch_size": config.patch_size, "features": config.features, "spacing": config.spacing,
            "parameters": sum(p.numel() for p in net.parameters())}


class RssSampler:
    """Samples a process's resident memory from /proc every ``interval`` seconds: a timeline of the peak."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            self.samples.append((time.perf_counter() - self._start, kb / 1e6))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def _status_gb(key: str) -> float:
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(key + ":"))
    return int(line.split()[1]) / 1e6


def probe_window(checkpoint: str, batch: int) -> None:
    """(In a child process) memory of one forward pass of ``batch`` windows, above the loaded model."""
    from medseg.inference.predictor import load_checkpoint

    trained = load_checkpoint(checkpoint, torch.device("cpu"))
    x = torch.zeros(batch, 1, *trained.config.patch_size)
    before = _status_gb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    t0 = time.perf_counter()
    with torch.no_grad():
        trained.model(x)
    print(json.dumps({"activation_gb": _status_gb("VmHWM") - before, "seconds": time.perf_counter() - t0,
                      "model_loaded_gb": before}))


def run_probe(checkpoint: Path, batch: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--probe", str(checkpoint), str(batch)], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def full_width_estimate(args, plan, narrow: dict, narrow_peak: float) -> dict:
    """The pipeline's peak with the full-width network: the narrow network's window activations (at the batch
    size the run used) swapped for the full-width ones (at 1 and, for contrast, 4 windows), weights added."""
    used = 1 if args.sw_batch_size == "auto" else int(args.sw_batch_size)  # auto is 1 on the CPU
    full_dir = args.work / "run_w32"
    full = save_checkpoint(plan, full_dir / "fold_0" / "checkpoints" / "last.ckpt", 32)
    probes = {}
    for width, run_dir in [(args.base_features, args.work / f"run_w{args.base_features}"), (32, full_dir)]:
        for b in sorted({used} if width != 32 else {1, 4, used}):
            probe = run_probe(run_dir / "fold_0" / "checkpoints" / "last.ckpt", b, args.threads)
            probes[f"w{width}_b{b}"] = probe
            print(f"one forward pass, {width} base features, {b} window(s): {probe['activation_gb']:.2f} GB above "
                  f"the loaded model ({probe['seconds']:.0f} s)", flush=True)
    weights_gb = (full["parameters"] - narrow["parameters"]) * 4 / 1e9
    estimates = {}
    for b in sorted({1, 4, used}):
        estimate = narrow_peak - probes[f"w{args.base_features}_b{used}"]["activation_gb"] + \
            probes[f"w32_b{b}"]["activation_gb"] + weights_gb
        estimates[f"sw_batch_size_{b}"] = estimate
        print(f"full-width network ({full['parameters'] / 1e6:.1f} M parameters), sw_batch_size {b}: peak "
              f"{estimate:.2f} GB; target < {TARGET_GB:.0f} GB {'met' if estimate < TARGET_GB else 'NOT met'}")
    return {"probes": probes, "full_width_peak_gb": estimates}


def run_predict(args, run_dir: Path, inputs: Path, output: Path) -> dict:
    exe = Path(sys.executable).with_name("medseg-predict")
    cmd = [str(exe), f"ckpt_dir={run_dir}", f"input={inputs}", f"output={output}", "device=cpu",
           f"overlap={args.overlap}", f"mirror_axes={args.mirror_axes}", f"sw_batch_size={args.sw_batch_size}",
           "overwrite=true", f"paths.output={args.work / 'outputs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = RssSampler(proc.pid)
    log = proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - started
    timeline = sampler.stop()
    peak_rusage_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB on Linux
    if proc.returncode != 0:
        print(log[-4000:])
        raise SystemExit(f"medseg-predict failed with exit status {proc.returncode}")
    return {"wall_s": wall, "peak_rss_gb": peak_rusage_gb, "timeline": timeline, "log": log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_large_volume"))
    parser.add_argument("--base-features", type=int, default=4, help="width of the network run end to end "
                        "(32: nnU-Net's default)")
    parser.add_argument("--overlap", type=float, default=0.0)
    parser.add_argument("--mirror-axes", default="[0]", help="all, null, or e.g. [0]")
    parser.add_argument("--sw-batch-size", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", nargs=2, metavar=("CHECKPOINT", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--no-probe", action="store_true", help="skip the full-width window probe")
    args = parser.parse_args()
    if args.probe:
        probe_window(args.probe[0], int(args.probe[1]))
        return
    args.work.mkdir(parents=True, exist_ok=True)

    scans = args.work / "scans"
    image = scans / "ct_large.nii.gz"
    if not image.is_file():
        scans.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        nib.save(nib.Nifti1Image(ct_like_volume(), np.diag([*SPACING_IJK, 1.0])), str(image))
        print(f"volume {SHAPE_IJK} int16 written in {time.perf_counter() - t0:.0f}s: {image}")
    plan = ct_plan()
    run_dir = args.work / f"run_w{args.base_features}"
    model = save_checkpoint(plan, run_dir / "fold_0" / "checkpoints" / "last.ckpt", args.base_features)
    print(f"model: default unet, patch {model['patch_size']}, features {model['features']}, "
          f"{model['parameters'] / 1e6:.1f} M parameters, plan spacing {model['spacing']} (z, y, x)", flush=True)
    print(f"predicting on CPU ({args.threads} threads): overlap {args.overlap}, mirror_axes {args.mirror_axes}, "
          f"sw_batch_size {args.sw_batch_size}", flush=True)

    result = run_predict(args, run_dir, scans, args.work / "preds")
    case_lines = [line for line in result["log"].splitlines() if "ct_large:" in line]
    print("\n".join(case_lines))
    step = max(1, len(result["timeline"]) // 40)  # where the peak happened: the sampled timeline, coarsened
    print("RSS timeline (s, GB): " + ", ".join(f"{t:.0f}:{gb:.2f}" for t, gb in result["timeline"][::step]))
    sampled_peak = max((gb for _, gb in result["timeline"]), default=0.0)
    peak = result["peak_rss_gb"]
    print(f"peak RSS {peak:.2f} GB (sampled {sampled_peak:.2f} GB), wall time {result['wall_s']:.0f} s", flush=True)
    record = {"pipeline": {k: v for k, v in result.items() if k not in ("log", "timeline")}, "model": model,
              "args": {k: str(v) for k, v in vars(args).items()}}
    if args.base_features != 32 and not args.no_probe:
        record.update(full_width_estimate(args, plan, model, peak))
    else:
        print(f"target < {TARGET_GB:.0f} GB: {'met' if peak < TARGET_GB else 'NOT met'}")
    write_json(args.work / f"result_w{args.base_features}.json", record)


if __name__ == "__main__":
    main()
