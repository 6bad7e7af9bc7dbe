#!/usr/bin/env python
"""GPU check: U-Mamba's pure-PyTorch Mamba fallback (mambapy) equals mamba-ssm's CUDA kernels.

One ``medseg.models.umamba.MambaLayer`` per shape, with a fixed seed, is run twice on the same weights and the
same input: once on the ``mamba_ssm`` backend (CUDA) and once with ``force_mambapy = True`` (mambapy's parallel
scan). Compared, in float32 with TF32 off:

- ``out``: the Mamba branch of the output, ``layer(x) - x`` (the residual would hide errors in the branch);
- ``dx``: the branch's part of the input gradient, ``d<layer(x), g>/dx - g``, for one fixed random ``g``;
- ``dW``: the gradients of the shared weights (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) and norm.

Error = max |a - b| / max |b| (b: mamba_ssm), per tensor, the worst over the parameters for ``dW``. PASS when
every error of every shape is within ``--tolerance`` (default 1e-3). Both backends are also timed (forward +
backward, median over ``--repeats``).

Without CUDA or without an importable ``mamba_ssm`` the comparison cannot run: the script says so, runs the
mambapy path on a tiny CPU shape as a smoke test, prints "GPU figures pending" and exits 0. Exit 1 on FAIL.
Takes well under a minute on one GPU.

    python scripts/gpu_check_mamba.py [--device cuda] [--tolerance 1e-3] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from medseg.models.umamba import MambaLayer

DEFAULT_SHAPES = ["2x64x12x12x12", "2x32x64x64", "2x256x5x7x5"]  # 3D, 2D, an odd-length U-Mamba bottleneck
SMOKE_SHAPES = ["1x16x4x4x4", "1x8x6x5"]


def parse_shape(s: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in s.lower().split("x"))
    if len(shape) not in (4, 5):
        raise argparse.ArgumentTypeError(f"shape {s!r} is not BxCxHxW or BxCxDxHxW")
    return shape


def mamba_ssm_status() -> str | None:
    """None when mamba_ssm imports with its CUDA extension, else why not."""
    try:
        import mamba_ssm  # noqa: F401
        from mamba_ssm import Mamba  # noqa: F401
        import selective_scan_cuda  # noqa: F401  (the compiled kernel mamba_ssm's fast path calls)
    except Exception as e:  # ImportError, or an OSError/undefined symbol from a mismatched build
        return f"{type(e).__name__}: {e}"
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_backend(layer: MambaLayer, x: torch.Tensor, g: torch.Tensor, force_mambapy: bool):
    """Branch output, branch input gradient and parameter gradients of one forward+backward."""
    layer.force_mambapy = force_mambapy
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    out = layer(xi)
    (out * g).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    return (out - xi).detach(), (xi.grad - g).detach(), grads


def time_backend(layer: MambaLayer, x: torch.Tensor, g: torch.Tensor, force_mambapy: bool, repeats: int) -> float:
    """Median milliseconds of forward + backward."""
    layer.force_mambapy = force_mambapy
    times = []
    for i in range(repeats + 2):  # two warm-up runs
        xi = x.detach().clone().requires_grad_(True)
        sync(x.device)
        t0 = time.perf_counter()
        (layer(xi) * g).sum().backward()
        sync(x.device)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    layer.zero_grad(set_to_none=True)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    abs_err = (a.double() - b.double()).abs().max().item()
    return abs_err, abs_err / max(b.double().abs().max().item(), 1e-12)


def build(shape: tuple[int, ...], device: torch.device, seed: int):
    torch.manual_seed(seed)
    layer = MambaLayer(shape[1]).to(device)
    x = torch.randn(shape, device=device)
    g = torch.randn(shape, device=device)
    return layer, x, g


def smoke(device: torch.device, shapes: list[tuple[int, ...]], seed: int, repeats: int) -> bool:
    ok = True
    print(f"{'shape':<22} {'backend':<8} {'finite':<7} {'fwd+bwd ms':>11}")
    for shape in shapes:
        layer, x, g = build(shape, device, seed)
        layer.force_mambapy = True
        out, dx, grads = run_backend(layer, x, g, force_mambapy=True)
        finite = bool(torch.isfinite(out).all() and torch.isfinite(dx).all()
                      and all(torch.isfinite(v).all() for v in grads.values()) and out.abs().max() > 0)
        ok &= finite
        ms = time_backend(layer, x, g, True, repeats)
        print(f"{'x'.join(map(str, shape)):<22} {layer.backend:<8} {str(finite):<7} {ms:>11.2f}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda[:N] for the comparison (default: cuda when available), cpu for the smoke test only")
    ap.add_argument("--tolerance", type=float, default=1e-3,
                    help="max relative error (max|a-b| / max|b|), float32 (default 1e-3)")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES],
                    help=f"BxCxDxHxW / BxCxHxW shapes (default {' '.join(DEFAULT_SHAPES)})")
    ap.add_argument("--repeats", type=int, default=10, help="timed forward+backward runs per backend")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    # float32 means float32: no TF32 in matmuls or cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, device {device}, tolerance {args.tolerance:g} relative (float32, TF32 off)")

    why_not = None
    if device.type != "cuda":
        why_not = f"device {device} is not CUDA"
    elif not torch.cuda.is_available():
        why_not = "CUDA is not available on this machine"
    else:
        status = mamba_ssm_status()
        if status is not None:
            why_not = f"mamba_ssm does not import ({status})"
    if why_not is not None:
        print(f"NO COMPARISON: {why_not}; mamba-ssm vs mambapy needs a CUDA GPU with mamba_ssm installed.")
        smoke_device = device if device.type == "cuda" and torch.cuda.is_available() else torch.device("cpu")
        print(f"Smoke test of the mambapy path on {smoke_device}:")
        shapes = SMOKE_SHAPES if smoke_device.type == "cpu" else [
            "x".join(map(str, s)) for s in args.shapes]
        ok = smoke(smoke_device, [parse_shape(s) for s in shapes], args.seed, min(args.repeats, 3))
        print(f"mambapy smoke test {'ok' if ok else 'FAILED'}. GPU figures pending.")
        return 0 if ok else 1

    print(f"GPU: {torch.cuda.get_device_name(device)}")
    return 0 if compare(device, args.shapes, args.tolerance, args.repeats, args.seed) else 1


def compare(device: torch.device, shapes: list[tuple[int, ...]], tolerance: float, repeats: int, seed: int) -> bool:
    header = (f"{'shape':<18} {'out abs':>9} {'out rel':>9} {'dx abs':>9} {'dx rel':>9} {'dW rel':>9} "
              f"{'ssm ms':>8} {'mambapy ms':>10} {'ratio':>6}  ok")
    print(header)
    print("-" * len(header))
    all_ok = True
    worst = 0.0
    for shape in shapes:
        layer, x, g = build(shape, device, seed)
        layer.force_mambapy = False
        assert layer.backend == "mamba_ssm", layer.backend
        out_s, dx_s, dw_s = run_backend(layer, x, g, force_mambapy=False)
        out_p, dx_p, dw_p = run_backend(layer, x, g, force_mambapy=True)
        out_abs, out_rel = rel_err(out_p, out_s)
        dx_abs, dx_rel = rel_err(dx_p, dx_s)
        missing = set(dw_s) ^ set(dw_p)
        dw_rel = max(rel_err(dw_p[n], dw_s[n])[1] for n in dw_s if n in dw_p)
        if missing:
            print(f"  parameters with a gradient on one backend only: {sorted(missing)}")
        t_ssm = time_backend(layer, x, g, False, repeats)
        t_py = time_backend(layer, x, g, True, repeats)
        ok = not missing and max(out_rel, dx_rel, dw_rel) <= tolerance
        all_ok &= ok
        worst = max(worst, out_rel, dx_rel, dw_rel)
        print(f"{'x'.join(map(str, shape)):<18} {out_abs:>9.2e} {out_rel:>9.2e} {dx_abs:>9.2e} {dx_rel:>9.2e} "
              f"{dw_rel:>9.2e} {t_ssm:>8.2f} {t_py:>10.2f} {t_py / t_ssm:>6.1f}  {'yes' if ok else 'NO'}")
        del layer, x, g
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{'PASS' if all_ok else 'FAIL'}: mambapy vs mamba_ssm, worst relative error {worst:.2e} "
          f"(tolerance {tolerance:g}, float32)")
    return all_ok


if __name__ == "__main__":
    sys.exit(main())
