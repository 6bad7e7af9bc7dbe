"""medseg vs nnunetv2, one training component at a time, on the Hippocampus 3d_fullres plan (CPU, seconds).

Runs in medseg's venv; nnunetv2 and its dependencies are imported from the nnU-Net venv's site-packages, appended
to the path after medseg's own (the two venvs pin the same torch / numpy, checked below):

  OMP_NUM_THREADS=1 python benchmarks/nnunet_parity_components.py \
      [--nnunet-venv /tmp/nnunet_venv] [--data ../shared/data/Task04_Hippocampus] [--sections net,loss,optim,sampling]

Sections (each prints a table; "same" within float tolerance unless a number says otherwise):
  net       PlainConvUNet (nnU-Net's plan kwargs) vs medseg's unet: parameters, initialisation statistics over
            several seeds, outputs in training mode, deep-supervision heads, and the same function once the
            weights are copied (medseg -> nnU-Net, nnU-Net's conv biases zeroed).
  loss      one real batch (4 z-scored cases, centre patch [40, 56, 40], both classes present) through both
            networks with copied weights: nnU-Net's DeepSupervisionWrapper(DC_and_CE_loss) on targets downsampled
            by batchgeneratorsv2's DownsampleSegForDSTransform vs medseg's deep-supervision dice_ce; loss and the
            gradient of every parameter; then the same logits alone (Dice, CE, each deep-supervision level) and
            the gradient on the lower level's logits per class.
  optim     SGD hyper-parameters, poly lr per epoch, gradient clipping (as configured for Lightning).
  sampling  where the final patch lands on a case (random and forced-foreground samples), and the full training
            augmentation's effect on image statistics and class voxel counts.
  dynamics  (not in the default set; minutes) both networks from the same weights trained on the same batches
            (random cases, mirroring) with their own loss and SGD: held-out Dice per class and loss.
A closing table summarises the numbers.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
PATCH = [40, 56, 40]
FEATURES = [8, 16, 32, 64]
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
KERNELS = [[3, 3, 3]] * 4
NUM_CLASSES = 3


def _setup_paths(nnunet_venv: str) -> None:
    site = sorted(Path(nnunet_venv).glob("lib/python3*/site-packages"))
    if not site:
        sys.exit(f"no site-packages under {nnunet_venv}; create it with benchmarks/nnunet_venv.sh")
    sys.path.append(str(site[0]))  # after medseg's own packages: shared ones (torch, numpy) come from medseg's venv
    sys.path.insert(0, str(REPO / "src"))
    for pkg in ("torch", "numpy"):
        other = [d for d in site[0].glob(f"{pkg}-*.dist-info")]
        theirs = other[0].name[len(pkg) + 1:-len(".dist-info")] if other else "?"
        if theirs != md.version(pkg):
            print(f"warning: {pkg} {md.version(pkg)} here, {theirs} in the nnU-Net venv")


SUMMARY: list[tuple[str, str, str, str]] = []  # (component, measure, nnU-Net, medseg) for the closing table


def _note(component: str, measure: str, nnunet, medseg) -> None:
    SUMMARY.append((component, measure, str(nnunet), str(medseg)))


def _row(*cols, widths=(44, 16, 16, 24)):
    print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||"""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------------ networks
def nnunet_net(deep_supervision: bool = True):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    # the arch kwargs ExperimentPlanner writes into nnUNetPlans.json for this topology
    kwargs = {"n_stages": 4, "features_per_stage": FEATURES, "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": KERNELS, "strides": STRIDES, "n_conv_per_stage": [2] * 4,
              "n_conv_per_stage_decoder": [2] * 3, "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kwargs,
                                  ("conv_op", "norm_op", "dropout_op", "nonlin"), 1, NUM_CLASSES,
                                  allow_init=True, deep_supervision=deep_supervision)


def medseg_net(deep_supervision: bool = True):
    from medseg.models import create_model
    from medseg.planning.plan import ConfigurationPlan

    plan = ConfigurationPlan("3d_fullres", 3, [1.0] * 3, [36, 50, 35], PATCH, 4, STRIDES, KERNELS, FEATURES,
                             ["zscore"], [False])
    return create_model("unet", 3, 1, NUM_CLASSES, plan=plan, deep_supervision=deep_supervision)


def _medseg_dynunet(model):
    return model.net if hasattr(model, "net") else model


def pairs(m, n):
    """(name, medseg parameter or None, nnU-Net parameter or None) for every parameter of both networks; the
    nnU-Net name follows its modules (encoder.stages / decoder.stages / transpconvs / seg_layers)."""
    d = _medseg_dynunet(m)
    out = []

    def block(mb, nconvs, name):
        for i, nb in enumerate(nconvs):
            mc, mn = getattr(mb, f"conv{i + 1}").conv, getattr(mb, f"norm{i + 1}")
            out.append((f"{name}.conv{i}.weight", mc.weight, nb.conv.weight))
            out.append((f"{name}.conv{i}.bias", mc.bias, nb.conv.bias))
            out.append((f"{name}.norm{i}.weight", mn.weight, nb.norm.weight))
            out.append((f"{name}.norm{i}.bias", mn.bias, nb.norm.bias))

    enc = n.encoder.stages
    mblocks = [d.input_block, *d.downsamples, d.bottleneck]
    for s, (mb, nb) in enumerate(zip(mblocks, enc, strict=True)):
        block(mb, nb[0].convs, f"enc{s}")
    for i, (mu, tc, st) in enumerate(zip(d.upsamples, n.decoder.transpconvs, n.decoder.stages, strict=True)):
        out.append((f"dec{i}.transpconv.weight", mu.transp_conv.conv.weight, tc.weight))
        out.append((f"dec{i}.transpconv.bias", mu.transp_conv.conv.bias, tc.bias))
        block(mu.conv_block, st.convs, f"dec{i}")
    seg = n.decoder.seg_layers  # [lowest decoder level, ..., full resolution]
    heads = list(getattr(d, "deep_supervision_heads", []))
    # medseg's DS head i (0: half resolution) sits on the decoder level of nnU-Net's seg_layers[-2 - i]
    mseg = [None] * (len(seg) - 1 - len(heads)) + heads[::-1] + [d.output_block]
    for i, (mh, nh) in enumerate(zip(mseg, seg, strict=True)):
        level = len(seg) - 1 - i
        for k in ("weight", "bias"):
            out.append((f"seg@1/{2 ** level}.{k}", None if mh is None else getattr(mh.conv.conv, k), getattr(nh, k)))
    return out


def copy_weights(m, n) -> None:
    """medseg -> nnU-Net; nnU-Net-only parameters (conv biases before instance norm) set to zero, unsupervised
    heads left as initialised."""
    with torch.no_grad():
        for name, pm, pn in pairs(m, n):
            if pm is not None:
                pn.copy_(pm)
            elif not name.startswith("seg@"):
                pn.zero_()


def section_net() -> None:
    print("\n== 1. network and initialisation ==")
    torch.manual_seed(0)
    m, n = medseg_net(), nnunet_net()
    pm = {id(p) for p in m.parameters()}
    print(f"parameters: medseg {sum(p.numel() for p in m.parameters()):,} in {len(pm)} tensors, nnU-Net "
          f"{sum(p.numel() for p in n.parameters()):,} in {len(list(n.parameters()))} tensors")
    only_n = [(k, pn.numel()) for k, a, pn in pairs(m, n) if a is None and pn is not None]
    print(f"nnU-Net only: {len(only_n)} tensors, {sum(c for _, c in only_n):,} values "
          f"({', '.join(sorted({k.split('.', 1)[1] if not k.startswith('seg') else k for k, _ in only_n}))})")

    # initialisation: per-layer std over seeds vs He (a=0.01) expectation
    seeds = range(20)
    stats: dict[str, list] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        mm = medseg_net()
        torch.manual_seed(seed)
        nn_ = nnunet_net()
        for name, a, b in pairs(mm, nn_):
            s = stats.setdefault(name, [[], [], [], [], 0])
            if a is not None:
                s[0].append(a.float().std().item() if a.numel() > 1 else 0.0)
                s[2].append(a.float().mean().item())
            if b is not None:
                s[1].append(b.float().std().item() if b.numel() > 1 else 0.0)
                s[3].append(b.float().mean().item())
                s[4] = tuple(b.shape)
    _row("parameter (nnU-Net shape)", "std medseg", "std nnU-Net", "He std (a=0.01)")
    gain = (2.0 / (1 + 0.01 ** 2)) ** 0.5
    worst = 0.0
    for name, (sm, sn, _mm, mn_, shape) in stats.items():
        if not name.endswith("weight") or "norm" in name:
            if name.endswith("bias") and not sm and any(abs(v) > 0 for v in mn_):
                print(f"  {name}: nnU-Net bias nonzero at init")
            continue
        a = np.mean(sm) if sm else float("nan")
        b = np.mean(sn)
        if sm:
            worst = max(worst, abs(a / b - 1))
        fan_in = shape[1] * int(np.prod(shape[2:]))  # torch's fan_in: dim 1 (also for transposed convs)
        _row(f"{name} {list(shape)}", f"{a:.4f}", f"{b:.4f}", f"{gain / fan_in ** 0.5:.4f}")
    print(f"largest |std medseg / std nnU-Net - 1| over shared weights: {worst:.3f} (mean of {len(seeds)} seeds; "
          "sampling noise on the small head tensors)")
    _note("network", "init: weight std vs He(a=0.01), largest relative gap", "He", f"{worst:.3f} (noise)")
    biases = [k for k, (sm, sn, *_r) in stats.items() if k.endswith(".bias") and "norm" not in k]
    nb, mb = sum(1 for k in biases if stats[k][1]), sum(1 for k in biases if stats[k][0])
    print(f"conv biases: nnU-Net {nb} (zero at init), medseg {mb} (the output heads only; zero at init)")

    x = torch.randn(2, 1, *PATCH)
    m.train(), n.train()
    om, on = m(x), n(x)
    print("training outputs: medseg", [tuple(o.shape[2:]) for o in om], " nnU-Net", [tuple(o.shape[2:]) for o in on])
    _note("network", "training outputs (lowest has loss weight 0 in nnU-Net)", [tuple(o.shape[2:]) for o in on],
          [tuple(o.shape[2:]) for o in om])
    _note("network", "parameters / conv biases", f"{sum(p.numel() for p in n.parameters()):,} / {nb}",
          f"{sum(p.numel() for p in m.parameters()):,} / {mb} (heads)")
    copy_weights(m, n)
    m.eval(), n.eval()
    with torch.no_grad():
        ym, yn = m(x), n(x)
    # nnU-Net's decoder returns the list in eval too; its trainer switches decoder.deep_supervision off to predict
    yn = yn[0] if isinstance(yn, (list, tuple)) else yn
    print(f"copied weights, eval logits: max |difference| {(ym - yn).abs().max().item():.2e} "
          f"(logits up to {yn.abs().max().item():.2f})")
    _note("network", "same weights: max |logit difference|", "-", f"{(ym - yn).abs().max().item():.1e}")
    m.train(), n.train()
    with torch.no_grad():
        om, on = m(x), n(x)
        for i, o in enumerate(om):
            ref = on[i]
            how = "as is"
            if ref.shape != o.shape:
                ref, how = F.interpolate(ref, size=o.shape[2:], mode="nearest"), "upsampled (nearest)"
            print(f"  train output {i} {tuple(o.shape[2:])} vs nnU-Net output {i} {tuple(on[i].shape[2:])} {how}: "
                  f"max |diff| {(o - ref).abs().max().item():.2e}")


# ------------------------------------------------------------------------------------------------------ data
def _case_ids(data_root: str) -> list[str]:
    return sorted(p.name for p in (Path(data_root) / "labelsTr").glob("hippocampus_*.nii.gz"))


def load_case(data_root: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """z-scored image (nnU-Net's ZScoreNormalization, no mask) and label, zero-padded / centre-cropped to the
    patch (Hippocampus volumes are smaller than it, so nnU-Net's loader also places them whole)."""
    import nibabel as nib

    root = Path(data_root)
    seg = np.asarray(nib.load(root / "labelsTr" / name).dataobj).astype(np.int64)
    img = np.asarray(nib.load(root / "imagesTr" / name).dataobj).astype(np.float32)
    # both frameworks hold arrays in SimpleITK's axis order (reversed from nibabel's)
    img, seg = img.transpose(2, 1, 0), seg.transpose(2, 1, 0)
    img = (img - img.mean()) / max(img.std(), 1e-8)
    box = [((s - p) // 2, p) for s, p in zip(img.shape, PATCH)]
    pad = [(max(0, -lo), max(0, lo + p - s)) for (lo, p), s in zip(box, img.shape)]
    img, seg = np.pad(img, pad), np.pad(seg, pad)
    sl = tuple(slice(max(0, lo), max(0, lo) + p) for lo, p in box)
    return img[sl], seg[sl]


def real_batch(data_root: str, n: int = 4, seed: int = 0, exclude: tuple = ()):
    """n cases with both classes (random, seeded), as (B, 1, *PATCH) float image and integer label."""
    rng = np.random.default_rng(seed)
    imgs, segs = [], []
    for name in rng.permutation([c for c in _case_ids(data_root) if c not in exclude]):
        img, seg = load_case(data_root, name)
        if not {1, 2} <= set(np.unique(seg)):
            continue
        imgs.append(img)
        segs.append(seg)
        if len(imgs) == n:
            break
    return torch.from_numpy(np.stack(imgs))[:, None], torch.from_numpy(np.stack(segs))[:, None]


def nnunet_ds_targets(y: torch.Tensor, num_outputs: int) -> list[torch.Tensor]:
    """nnU-Net's deep-supervision targets: DownsampleSegForDSTransform per sample, with the scales
    nnUNetTrainer._get_deep_supervision_scales gives (cumulative pooling, the last stage dropped)."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    scales = list(list(i) for i in 1 / np.cumprod(np.vstack(STRIDES), axis=0))[:-1]
    assert len(scales) == num_outputs
    t = DownsampleSegForDSTransform(ds_scales=scales)
    per = [t(segmentation=s.to(torch.int16))["segmentation"] for s in y]
    return [torch.stack([p[i] for p in per]).long() for i in range(len(scales))]


def nnunet_loss(num_outputs: int):
    """nnUNetTrainer._build_loss for 3d_fullres, no regions, no ignore label, batch Dice off, no DDP."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    base = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    w = np.array([1 / (2 ** i) for i in range(num_outputs)])
    w[-1] = 0
    w = w / w.sum()
    return DeepSupervisionWrapper(base, w), base, w


def medseg_loss(num_outputs: int):
    from medseg.losses import create_loss
    from medseg.losses.registry import with_deep_supervision

    base = create_loss("dice_ce", batch_dice=False)
    return with_deep_supervision(base, num_outputs), base


def _per_class(g: torch.Tensor) -> list[float]:
    """norm of a gradient on logits (B, C, ...) per class channel"""
    return [g[:, c].norm().item() for c in range(g.shape[1])]


def section_loss(data_root: str) -> dict:
    print("\n== 2. loss and deep supervision (real batch, copied weights) ==")
    x, y = real_batch(data_root)
    frac = [(y == c).float().mean().item() for c in range(NUM_CLASSES)]
    print(f"batch {tuple(x.shape)}; voxel share per class {[f'{f:.4f}' for f in frac]}")
    torch.manual_seed(0)
    m, n = medseg_net(), nnunet_net()
    copy_weights(m, n)
    m.train(), n.train()
    om, on = m(x), n(x)
    targets = nnunet_ds_targets(y, len(on))
    lossn, basen, wn = nnunet_loss(len(on))
    lossm, basem = medseg_loss(len(om))
    print(f"outputs: nnU-Net {len(on)} at {[tuple(o.shape[2:]) for o in on]}, weights {np.round(wn, 4).tolist()}; "
          f"medseg {len(om)} at {[tuple(o.shape[2:]) for o in om]}, weights "
          f"{[round(w, 4) for w in lossm.get_weights(len(om))]}")
    down = targets[1]
    direct = F.interpolate(y.float(), size=down.shape[2:], mode="nearest-exact").long()
    print(f"DS target 1/2: DownsampleSegForDSTransform == F.interpolate(nearest-exact): "
          f"{bool((direct == down).all())}; class shares "
          f"{[round((down == c).float().mean().item(), 4) for c in range(NUM_CLASSES)]}")
    ln, lm = lossn(on, targets), lossm(om, y)
    ln.backward()
    lm.backward()
    print(f"full training loss: nnU-Net {ln.item():.6f}  medseg {lm.item():.6f}  (nnU-Net's Dice is -Dice, "
          f"MONAI's 1 - Dice: offset {sum(wn[:len(om)]):.3f} expected)")
    gn_tot = torch.sqrt(sum(p.grad.norm() ** 2 for p in n.parameters() if p.grad is not None)).item()
    gm_tot = torch.sqrt(sum(p.grad.norm() ** 2 for p in m.parameters() if p.grad is not None)).item()
    print(f"total gradient norm (clip at 12): nnU-Net {gn_tot:.4f}  medseg {gm_tot:.4f}")
    _note("loss", "training loss, real batch (MONAI Dice = 1 - Dice)", f"{ln.item():.5f}", f"{lm.item():.5f}")
    _note("loss", "total gradient norm", f"{gn_tot:.4f}", f"{gm_tot:.4f}")
    _row("parameter", "|g| nnU-Net", "|g| medseg", "rel. diff ||gm-gn||/||gn||")
    rows = {}
    for name, pm, pn in pairs(m, n):
        if pn is None or pn.grad is None:
            if pm is None and pn is not None and name.startswith("seg@"):
                _row(name, "no grad (w 0)", "-", "-")
            continue
        if pm is None:
            if pn.grad.norm() > 1e-6 * max(gn_tot, 1e-12):
                _row(name, f"{pn.grad.norm().item():.3e}", "absent", "-")
            continue
        rows[name] = _rel(pm.grad, pn.grad)
        _row(name, f"{pn.grad.norm().item():.3e}", f"{pm.grad.norm().item():.3e}", f"{rows[name]:.3f}")
    worst = max(rows, key=rows.get)
    _note("loss", "largest per-parameter gradient rel. diff", "-", f"{rows[worst]:.1e} ({worst})")
    print("output heads, gradient norm per class (weight rows + bias):")
    for name, pm, pn in pairs(m, n):
        if name.startswith("seg@") and name.endswith("weight") and pm is not None and pn.grad is not None:
            bias = dict((k, (a, b)) for k, a, b in pairs(m, n))[name[:-6] + "bias"]
            for c in range(NUM_CLASSES):
                gn_c = torch.cat([pn.grad[c].flatten(), bias[1].grad[c:c + 1]]).norm().item()
                gm_c = torch.cat([pm.grad[c].flatten(), bias[0].grad[c:c + 1]]).norm().item()
                print(f"  {name[:-7]} class {c}: nnU-Net {gn_c:.3e}  medseg {gm_c:.3e}  ratio {gm_c / gn_c:.3f}")
                if c:
                    _note("loss", f"head {name[4:-7]} gradient, class {c}", f"{gn_c:.4f}", f"{gm_c:.4f}")

    # ---- isolate: same logits, same targets ----
    print("\nsame logits (nnU-Net's, detached), full resolution, same target:")
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    full = on[0].detach()
    terms = {
        "Dice+CE": (basen, basem),
        "Dice": (MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=False, do_bg=False,
                                             smooth=1e-5, ddp=False), basem.dice),
        "CE": (basen.ce, basem.ce),
    }
    _row("term", "nnU-Net", "medseg", "grad per class rel. diff")
    for k, (fn, fm) in terms.items():
        a = full.clone().requires_grad_()
        b = full.clone().requires_grad_()
        va = fn(a, y) if k != "CE" else fn(a, y)
        vb = fm(b, y.float() if k != "CE" else y)
        va.backward()
        vb.backward()
        rel = [(b.grad[:, c] - a.grad[:, c]).norm().item() / a.grad[:, c].norm().item() for c in range(3)]
        _row(k, f"{va.item():.6f}", f"{vb.item():.6f}", " ".join(f"{r:.1e}" for r in rel))
        _note("loss", f"{k} on the same logits: grad rel. diff (worst class)", "-", f"{max(rel):.1e}")

    print("\ndeep-supervision level 1/2 on the same low-resolution logits L (nnU-Net's head output): nnU-Net's "
          "scheme vs DynUNet's (L upsampled by nearest to full resolution, scored against the full label; medseg "
          "before its heads kept their own resolution)")
    low = on[1].detach()
    a = low.clone().requires_grad_()
    b = low.clone().requires_grad_()
    va = basen(a, targets[1])  # nnU-Net: L vs the downsampled label
    vb = basem(F.interpolate(b, size=y.shape[2:]), y.float())  # medseg (DynUNet): L upsampled vs the full label
    va.backward()
    vb.backward()
    print(f"  loss: nnU-Net (L vs label downsampled) {va.item():.6f}  upsampled L vs full label {vb.item():.6f}")
    res = {"ds_level1": {}}
    for c in range(NUM_CLASSES):
        ga, gb = a.grad[:, c], b.grad[:, c]
        cos = F.cosine_similarity(ga.flatten(), gb.flatten(), dim=0).item()
        print(f"  class {c}: |dL| nnU-Net {ga.norm().item():.3e}  upsampled {gb.norm().item():.3e}  "
              f"ratio {gb.norm().item() / ga.norm().item():.3f}  cosine {cos:.3f}")
        _note("DS scheme", f"upsampled-logits scheme, 1/2 head, class {c}: |dL| ratio, cosine", "1, 1",
              f"{gb.norm().item() / ga.norm().item():.3f}, {cos:.3f}")
        res["ds_level1"][c] = (ga.norm().item(), gb.norm().item(), cos)
    for k, (fn, fm) in list(terms.items())[1:]:
        a = low.clone().requires_grad_()
        b = low.clone().requires_grad_()
        va = fn(a, targets[1])
        vb = fm(F.interpolate(b, size=y.shape[2:]), y.float() if k != "CE" else y)
        va.backward()
        vb.backward()
        print(f"  {k:4s} alone: nnU-Net {va.item():.6f}  upsampled {vb.item():.6f}  |dL| per class nnU-Net "
              f"{' '.join(f'{v:.2e}' for v in _per_class(a.grad))}  upsampled "
              f"{' '.join(f'{v:.2e}' for v in _per_class(b.grad))}")

    print("\nwhole deep-supervised loss on nnU-Net's outputs, medseg's wrapper given the low outputs at their own "
          "resolution (targets resized by MONAI, nearest-exact):")
    a = [o.detach().clone().requires_grad_() for o in on]
    b = [o.detach().clone().requires_grad_() for o in on[:len(om)]]
    va, vb = lossn(a, targets), lossm(b, y)
    va.backward()
    vb.backward()
    print(f"  loss nnU-Net {va.item():.6f}  medseg {vb.item():.6f}  (difference {vb.item() - va.item():+.6f}, "
          f"the Dice offset {sum(wn[:len(om)]):.3f})")
    for i in range(len(b)):
        print(f"  output {i}: grad rel. diff per class "
              f"{' '.join(f'{_rel(b[i].grad[:, c], a[i].grad[:, c]):.1e}' for c in range(NUM_CLASSES))}")
    return res


# ------------------------------------------------------------------------------------------------------ optim
def section_optim() -> None:
    print("\n== 3. optimiser, schedule, clipping ==")
    from omegaconf import OmegaConf
    from hydra.utils import instantiate

    sgd = OmegaConf.load(REPO / "src/medseg/configs/optimizer/sgd.yaml")
    poly = OmegaConf.load(REPO / "src/medseg/configs/scheduler/poly.yaml")
    trainer = OmegaConf.load(REPO / "src/medseg/configs/trainer/default.yaml")
    epochs = 6
    p = [torch.nn.Parameter(torch.zeros(1))]
    om = instantiate(sgd)(p)
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    pn = [torch.nn.Parameter(torch.zeros(1))]
    on = torch.optim.SGD(pn, 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)  # nnUNetTrainer
    for k in ("lr", "momentum", "nesterov", "weight_decay", "dampening"):
        a, b = om.param_groups[0][k], on.param_groups[0][k]
        _row(f"SGD {k}", a, b, "same" if a == b else "DIFFERENT")
        _note("optimiser", f"SGD {k}", b, a)
    poly = OmegaConf.merge(poly, {"total_epochs": epochs})
    sm = instantiate(poly)(om)
    sn = PolyLRScheduler(on, 1e-2, epochs)
    lm, ln = [], []
    for epoch in range(epochs):
        sn.step(epoch)  # nnU-Net: on_train_epoch_start
        lm.append(om.param_groups[0]["lr"])
        ln.append(on.param_groups[0]["lr"])
        with warnings.catch_warnings():  # no optimizer.step() here: only the lr is compared
            warnings.simplefilter("ignore")
            sm.step()  # Lightning: interval "epoch", after the epoch
    print(f"lr per epoch (medseg): {[f'{v:.5f}' for v in lm]}")
    print(f"lr per epoch (nnU-Net): {[f'{v:.5f}' for v in ln]}  max diff {max(abs(a - b) for a, b in zip(lm, ln)):.1e}")
    _note("schedule", f"poly lr, epochs 0..{epochs - 1}, max |difference|", "-",
          f"{max(abs(a - b) for a, b in zip(lm, ln)):.1e}")
    _note("clipping", "grad-norm clip before the step", "12 (norm)",
          f"{trainer.get('gradient_clip_val')} ({trainer.get('gradient_clip_algorithm', 'norm')})")
    print(f"clipping: medseg trainer gradient_clip_val={trainer.get('gradient_clip_val')} "
          f"algorithm={trainer.get('gradient_clip_algorithm', 'norm (Lightning default)')}; nnU-Net clip_grad_norm_ "
          "12 after backward, before optimizer.step (Lightning clips in the same place, before the step)")


# ------------------------------------------------------------------------------------------------------ dynamics
def _dice_counts(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    pred = logits.argmax(1)
    ref = y[:, 0]
    return np.array([[((pred == c) & (ref == c)).sum().item(), ((pred == c) & (ref != c)).sum().item(),
                      ((pred != c) & (ref == c)).sum().item()] for c in range(1, NUM_CLASSES)], dtype=float)


def section_dynamics(data_root: str, steps: int, every: int, seed: int) -> None:
    """Both recipes from the same weights on the same batches: only network, loss and optimiser differ."""
    print(f"\n== 5. training dynamics: same initial weights, same {steps} batches (random cases, mirroring), "
          "SGD 1e-2 / 0.99 Nesterov, clip 12 ==")
    ids = _case_ids(data_root)
    held = tuple(ids[::5])
    train = [c for c in ids if c not in held]
    xv, yv = real_batch(data_root, n=8, seed=seed + 1, exclude=tuple(train))  # held-out cases only
    torch.manual_seed(seed)
    m, n = medseg_net(), nnunet_net()
    copy_weights(m, n)
    m.train()
    with torch.no_grad():
        lossm, _ = medseg_loss(len(m(torch.zeros(1, 1, *PATCH))))
    lossn, _, _ = nnunet_loss(3)
    opts = {k: torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
            for k, net in (("medseg", m), ("nnunet", n))}
    rng = np.random.default_rng(seed)
    cache: dict = {}
    _row("step", "nnU-Net dice 1/2", "medseg dice 1/2", "loss nnU-Net / medseg", widths=(8, 20, 20, 28))
    last: list[float] = []  # the losses (nnU-Net, medseg) of the latest training step; none before the first
    for step in range(steps + 1):
        if step % every == 0 or step == steps:  # always at the end: the notes below report the final state
            out = {}
            for k, net in (("medseg", m), ("nnunet", n)):
                net.eval()
                with torch.no_grad():
                    y = net(xv)
                y = y[0] if isinstance(y, (list, tuple)) else y
                tp, fp, fn = _dice_counts(y, yv).T
                out[k] = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
                net.train()
            _row(step, " ".join(f"{v:.3f}" for v in out["nnunet"]), " ".join(f"{v:.3f}" for v in out["medseg"]),
                 f"{last[0]:.3f} / {last[1]:.3f}" if last else "-", widths=(8, 20, 20, 28))
        if step == steps:
            break
        imgs, segs = [], []
        for name in rng.choice(train, 4):
            if name not in cache:
                cache[name] = load_case(data_root, name)
            img, seg = cache[name]
            for axis in range(3):
                if rng.random() < 0.5:
                    img, seg = np.flip(img, axis), np.flip(seg, axis)
            imgs.append(img.copy())
            segs.append(seg.copy())
        x, y = torch.from_numpy(np.stack(imgs))[:, None], torch.from_numpy(np.stack(segs))[:, None]
        last = []
        recipes = (("nnunet", n, lambda o, y=y: lossn(o, nnunet_ds_targets(y, len(o)))),
                   ("medseg", m, lambda o, y=y: lossm(o, y)))
        for k, net, fn in recipes:
            opts[k].zero_grad(set_to_none=True)
            loss = fn(net(x))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opts[k].step()
            last.append(loss.item() + (1.0 if k == "nnunet" else 0.0))  # MONAI's Dice is 1 - Dice
    shared = [(a, b) for _, a, b in pairs(m, n) if a is not None and b is not None]
    dist = torch.sqrt(sum((a - b).norm() ** 2 for a, b in shared)) / torch.sqrt(sum(b.norm() ** 2 for _, b in shared))
    print(f"relative distance between the two weight sets after {steps} steps: {dist.item():.3f}")
    _note("dynamics", f"held-out Dice 1/2 after {steps} steps", " ".join(f"{v:.3f}" for v in out["nnunet"]),
          " ".join(f"{v:.3f}" for v in out["medseg"]))
    _note("dynamics", f"loss at step {steps}", f"{last[0]:.4f}" if last else "-", f"{last[1]:.4f}" if last else "-")
    _note("dynamics", "relative weight distance at the end", "-", f"{dist.item():.3f}")


# ------------------------------------------------------------------------------------------------------ sampling
def section_sampling(data_root: str, draws: int = 3000, seed: int = 0) -> None:
    """Where the final patch lands on the case: nnU-Net's nnUNetDataLoader.get_bbox (cut at its initial patch,
    then SpatialTransform crops the centre) vs medseg's sample_patch (cut at sampling_patch_size, then the
    augmentation crops the centre); spatial augmentation itself left out."""
    print("\n== 4. patch sampling: position of the final patch on the case ==")
    import nibabel as nib
    from types import SimpleNamespace

    from medseg.loading.augmentation import nnunet_settings, sampling_patch_size
    from medseg.loading.sampling import sample_patch
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    rot = (-30. / 360 * 2. * np.pi, 30. / 360 * 2. * np.pi)
    n_initial = [int(v) for v in get_patch_size(PATCH, rot, rot, rot, (0.85, 1.25))]
    m_initial = sampling_patch_size(PATCH, nnunet_settings(PATCH))
    print(f"patch cut before spatial augmentation: nnU-Net {n_initial}, medseg {m_initial}")
    root = Path(data_root)
    names = _case_ids(data_root)[:40]
    segs = {k: np.asarray(nib.load(root / "labelsTr" / k).dataobj).astype(np.int64).transpose(2, 1, 0)
            for k in names}
    loader = SimpleNamespace(need_to_pad=np.array(n_initial) - np.array(PATCH), patch_size=n_initial,
                             has_ignore=False, annotated_classes_key=tuple(range(1, NUM_CLASSES)))
    rng = np.random.default_rng(seed)
    np.random.seed(seed)
    half = np.array(PATCH) // 2
    res = {k: {"centre": [], "cls": [], "kept": []} for k in ("nnunet random", "nnunet forced", "medseg random",
                                                              "medseg forced")}
    for i in range(draws):
        name = names[rng.integers(len(names))]
        seg = segs[name]
        shape = np.array(seg.shape)
        forced = bool(i % 2)
        locs = {c: np.argwhere(seg == c) for c in range(1, NUM_CLASSES)}
        # nnU-Net: bbox of the initial patch, the final patch its centre
        nlocs = {c: np.concatenate([np.zeros((len(v), 1), int), v], 1) for c, v in locs.items()}
        lb, _ = nnUNetDataLoader.get_bbox(loader, shape, forced, nlocs)
        centre_n = np.array(lb) + np.array(n_initial) // 2
        # medseg: voxel indices travel through sample_patch as the image
        index = (np.arange(seg.size, dtype=np.float64).reshape(1, *seg.shape) + 1)
        x, _ = sample_patch(index, seg, locs, m_initial, rng, forced)
        crop = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(x.shape[1:], PATCH))
        fin = x[0][crop]
        p = np.argwhere(fin > 0)[0]
        u = np.array(np.unravel_index(int(fin[tuple(p)]) - 1, seg.shape))
        centre_m = u + (half - p)
        kind = "forced" if forced else "random"
        for fw, c in (("nnunet", centre_n), ("medseg", centre_m)):
            r = res[f"{fw} {kind}"]
            r["centre"].append(c - shape // 2)
            inside = all(0 <= c[d] < shape[d] for d in range(3))
            r["cls"].append(int(seg[tuple(c)]) if inside else -1)
            lo, hi = c - half, c - half + np.array(PATCH)
            kept = []
            for k in range(1, NUM_CLASSES):
                v = locs[k]
                kept.append(np.mean(np.all((v >= lo) & (v < hi), axis=1)))
            r["kept"].append(kept)
    _row("sampler", "centre shift sd", "class at centre", "share of class 1 / 2 in patch", widths=(16, 22, 34, 30))
    for k, r in res.items():
        cs = np.array(r["centre"])
        cls = np.array(r["cls"])
        share = " ".join(f"{lab}:{np.mean(cls == v):.2f}" for lab, v in (("out", -1), ("bg", 0), ("1", 1), ("2", 2)))
        kept = np.array(r["kept"]).mean(0)
        _row(k, " ".join(f"{v:.1f}" for v in cs.std(0)), share, " / ".join(f"{v:.3f}" for v in kept),
             widths=(16, 22, 34, 30))
        r["sd"] = " ".join(f"{v:.1f}" for v in cs.std(0))
    for kind in ("random", "forced"):
        _note("sampling", f"{kind} patches: patch-centre shift sd per axis (voxels)", res[f"nnunet {kind}"]["sd"],
              res[f"medseg {kind}"]["sd"])
    print("(centre shift: patch centre minus case centre, voxels, per axis; cases are smaller than the patch)")
    _augmentation_summary(data_root, n_initial, m_initial, seed)


def _augmentation_summary(data_root: str, n_initial, m_initial, seed: int, samples: int = 160) -> None:
    """The full training augmentation of both on the same cases (centred in each one's pre-augmentation patch):
    distribution of per-sample image statistics and of the classes' voxel counts relative to the input."""
    from medseg.loading.augmentation import augment_batch, nnunet_settings
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    rot = (-30. / 360 * 2. * np.pi, 30. / 360 * 2. * np.pi)
    tn = nnUNetTrainer.get_training_transforms(PATCH, rot, None, (0, 1, 2), False, use_mask_for_norm=[False])
    settings = nnunet_settings(PATCH)
    names = _case_ids(data_root)[:samples // 4]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    stats = {"nnunet": [], "medseg": []}
    for i in range(0, samples, 4):
        cases = [load_case(data_root, names[(i // 4 + k) % len(names)]) for k in range(4)]
        ref = [[(s == c).sum() for c in (1, 2)] for _, s in cases]

        def centred(size, pad_seg, cases=cases):
            imgs, segs = [], []
            for img, seg in cases:
                pads = [((t - p) // 2, t - p - (t - p) // 2) for t, p in zip(size, img.shape)]
                imgs.append(np.pad(img, pads))
                segs.append(np.pad(seg, pads, constant_values=pad_seg))
            return torch.from_numpy(np.stack(imgs))[:, None], torch.from_numpy(np.stack(segs))[:, None]

        x, y = centred(n_initial, -1)
        for b in range(4):
            out = tn(image=x[b].clone(), segmentation=y[b].to(torch.int16))
            stats["nnunet"].append(_aug_stats(out["image"], out["segmentation"], ref[b]))
        x, y = centred(m_initial, 0)
        xa, ya = augment_batch(x, y.to(torch.uint8), PATCH, settings, int(rng.integers(2 ** 62)))
        for b in range(4):
            stats["medseg"].append(_aug_stats(xa[b], ya[b], ref[b]))
    _row("augmented sample", "image mean", "image std", "class 1 / 2 voxels vs input (p10 / p50 / p90)",
         widths=(18, 26, 26, 50))
    quant = {}
    for k, v in stats.items():
        a = np.array(v)

        def q(col, a=a):
            return " / ".join(f"{np.percentile(a[:, col], p):.2f}" for p in (10, 50, 90))

        _row(k, q(0), q(1), f"{q(2)}  |  {q(3)}", widths=(18, 26, 26, 50))
        quant[k] = (q(1), q(3))
    _note("augmentation", "image std after augmentation (p10/p50/p90)", quant["nnunet"][0], quant["medseg"][0])
    _note("augmentation", "class-2 voxels kept (p10/p50/p90)", quant["nnunet"][1], quant["medseg"][1])
    print(f"({samples} samples each, percentiles 10 / 50 / 90; inputs z-scored; a shift of image statistics or a "
          "loss of class voxels on one side would show here)")


def _aug_stats(img: torch.Tensor, seg: torch.Tensor, ref) -> list[float]:
    seg = seg.long()
    return [img.float().mean().item(), img.float().std().item(),
            (seg == 1).sum().item() / max(ref[0], 1), (seg == 2).sum().item() / max(ref[1], 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nnunet-venv", default=os.environ.get("NNUNET_VENV", "/tmp/nnunet_venv"))
    ap.add_argument("--data", default=os.environ.get("MEDSEG_HIPPOCAMPUS",
                                                     str(REPO.parent / "shared/data/Task04_Hippocampus")))
    ap.add_argument("--sections", default="net,loss,optim,sampling",
                    help="comma-separated; 'dynamics' (a few minutes) is not in the default")
    ap.add_argument("--steps", type=int, default=60, help="dynamics: training steps per recipe")
    ap.add_argument("--every", type=int, default=20, help="dynamics: held-out Dice every this many steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _setup_paths(args.nnunet_venv)
    sections = args.sections.split(",")
    if "net" in sections:
        section_net()
    if "loss" in sections:
        section_loss(args.data)
    if "optim" in sections:
        section_optim()
    if "sampling" in sections:
        section_sampling(args.data)
    if "dynamics" in sections:
        section_dynamics(args.data, args.steps, args.every, args.seed)
    print("\n== summary ==")
    _row("component", "measure", "nnU-Net", "medseg", widths=(13, 58, 26, 30))
    for row in SUMMARY:
        _row(*row, widths=(13, 58, 26, 30))


if __name__ == "__main__":
    main()
