"""Checks of what only a GPU reaches, each the GPU twin of a CPU stand-in test, for a bare GPU machine with the
bundle (scripts/gpu/README.md). Prints one line per check and writes checks.json to $OUT (or --out).

    python3 scripts/gpu/check_gpu_paths.py                 # on the GPU machine
    python3 scripts/gpu/check_gpu_paths.py --device cpu    # rehearsal: the same steps on the CPU

Checks (CPU stand-in in brackets):
- fit on the GPU, final validation and timing on the GPU, bf16 on compute capability >= 8.0
  [tests/training/test_gpu_path.py]
- trainer.deterministic=true trains unet, resenc_unet and vilu_net; lists the ops that warned
  [test_deterministic_mode_warns_for_ops_without_a_deterministic_implementation]
- device-side augmentation under torch.cuda.set_sync_debug_mode("error"): no host-device sync
  [tests/data/test_augmentation_transfers.py]
- compile=true trains [none: torch.compile's CPU path differs]
- the chunkwise mLSTM under CUDA bf16 autocast against a float64 reference [tests/models/test_mlstm.py]
- the Mamba backend chosen on this machine [tests/models/test_umamba.py]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
NONDETERMINISTIC = re.compile(r"(\w+) does not have a deterministic implementation")


def _train(work: Path, device: str, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    accelerator = "gpu" if device == "cuda" else "cpu"
    cmd = [sys.executable, "-m", "medseg.cli.train", "debug=fast", "trainer=default",
           f"trainer.accelerator={accelerator}", "trainer.max_epochs=2", "callbacks.progress=plain",
           f"paths.data={work / 'data'}",
           f"paths.output={work / 'out'}", f"paths.preprocessed={work / 'pre'}", f"experiment_name={name}",
           f"hydra.run.dir={work / 'hydra' / name}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = list((work / "out" / name).glob("*/fold_0/metrics.json"))
    return result, json.loads(found[0].read_text()) if found else None


def check_training_device(work: Path, device: str) -> dict:
    result, metrics = _train(work, device, "device")
    if result.returncode != 0 or metrics is None:
        return {"ok": False, "error": result.stderr[-2000:]}
    expected = "bf16-mixed" if device == "cuda" and torch.cuda.get_device_capability() >= (8, 0) else \
        ("16-mixed" if device == "cuda" else "32-true")
    timing = metrics["timing"]
    ok = ((timing["device"] != "cpu") == (device == "cuda") and metrics["precision"]["training"] == expected
          and (timing["peak_gpu_memory_gb"] is not None) == (device == "cuda"))
    return {"ok": ok, "device": timing["device"], "precision": metrics["precision"], "expected": expected,
            "peak_gpu_memory_gb": timing["peak_gpu_memory_gb"], "inference_s_per_case": timing["inference_s_per_case"],
            "dice_mean": metrics["dice_mean"]}


def check_deterministic(work: Path, device: str) -> dict:
    report = {}
    for model in ("unet", "resenc_unet", "vilu_net"):
        result, metrics = _train(work, device, f"deterministic_{model}", f"model={model}", "trainer.deterministic=true")
        ops = sorted(set(NONDETERMINISTIC.findall(result.stdout + result.stderr)))
        report[model] = {"ok": result.returncode == 0 and metrics is not None, "warned_ops": ops,
                         **({} if result.returncode == 0 else {"error": result.stderr[-1500:]})}
    return {"ok": all(r["ok"] for r in report.values()), **report}


def check_compile(work: Path, device: str) -> dict:
    start = time.perf_counter()
    result, metrics = _train(work, device, "compiled", "compile=true")
    return {"ok": result.returncode == 0 and metrics is not None, "seconds": round(time.perf_counter() - start, 1),
            **({} if result.returncode == 0 else {"error": result.stderr[-1500:]})}


def check_augmentation_sync(device: str) -> dict:
    from medseg.loading.augmentation import apply_augmentation, draw_augmentation, nnunet_settings, sampling_patch_size

    patch = [40, 56, 40]
    settings = nnunet_settings(patch, p_rotation=1.0, p_scaling=1.0, p_noise=1.0, p_blur=1.0, p_brightness=1.0,
                               p_contrast=1.0, p_lowres=1.0, p_gamma=1.0, p_gamma_inverted=1.0)
    size = sampling_patch_size(patch, settings)
    image = torch.randn(8, 1, *size).pin_memory() if device == "cuda" else torch.randn(8, 1, *size)
    label = torch.randint(0, 3, (8, 1, *size), dtype=torch.uint8)
    draw = draw_augmentation(7, 8, 1, patch, settings, 3)
    params = draw.params.pin_memory() if device == "cuda" else draw.params
    dev = torch.device(device)
    image, label, params = (t.to(dev, non_blocking=True) for t in (image, label, params))
    if device != "cuda":
        apply_augmentation(image, label, draw.plan, params)
        return {"ok": True, "note": "no CUDA: ran the device path on the CPU, sync detection needs CUDA"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = apply_augmentation(image, label, draw.plan, params)
        error = None
    except RuntimeError as e:  # a synchronising call inside the device path
        error = str(e)[:500]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {"ok": error is None, **({"error": error} if error else {})}


def check_mlstm_autocast(device: str) -> dict:
    from medseg.models.mlstm import mlstm_chunkwise, mlstm_parallel

    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 300, 16)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    i_gate, f_gate = torch.randn(shape[:3], generator=g) * 10, torch.randn(shape[:3], generator=g) * 3 + 3
    ref = mlstm_parallel(*(t.double() for t in (q, k, v, i_gate, f_gate)))
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        out = mlstm_chunkwise(*(t.to(device) for t in (q, k, v, i_gate, f_gate)), chunk_size=64)
    error = float((out.double().cpu() - ref).abs().max() / ref.abs().max())
    return {"ok": error < 1e-2, "relative_error": error}


def check_mamba_backend(device: str) -> dict:
    from medseg.models.umamba import select_backend

    return {"ok": True, "backend": select_backend(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip", nargs="*", default=[], help="checks to leave out (e.g. compile)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="medseg-gpu-checks-"))
    checks = {
        "augmentation_sync": lambda: check_augmentation_sync(args.device),
        "mlstm_autocast": lambda: check_mlstm_autocast(args.device),
        "mamba_backend": lambda: check_mamba_backend(args.device),
        "training_device": lambda: check_training_device(work, args.device),
        "deterministic": lambda: check_deterministic(work, args.device),
        "compile": lambda: check_compile(work, args.device),
    }
    results = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
               "torch": torch.__version__}
    for name, check in checks.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            results[name] = check()
        except Exception as e:  # one broken check must not hide the others' figures
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500]}
        results[name]["check_s"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} {json.dumps(results[name])[:600]}", flush=True)
    (out / "checks.json").write_text(json.dumps(results, indent=2))
    failed = [n for n, r in results.items() if isinstance(r, dict) and not r.get("ok", True)]
    print(f"{len(failed)} check(s) failed: {failed}" if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
