"""Helpers for predict_hippocampus.sh: one network for both frameworks.

  compare-plans NNUNET_PLANS MEDSEG_PLANS      the 3d_fullres topologies must agree (exit 1 otherwise)
  medseg-logits MEDSEG_CKPT OUT.pt              (medseg venv) the network's logits on a seeded random patch
  nnunet-folder MEDSEG_CKPT NNUNET_PLANS DATASET_JSON MODEL_DIR [OUT.pt]
                                                (nnunetv2 venv) an nnU-Net trained-model folder whose
                                                checkpoint_final.pth holds medseg's weights in the network that
                                                nnU-Net builds from its own plan; with OUT.pt, checks its logits

nnU-Net's PlainConvUNet keeps a bias in every conv and transposed conv; MONAI's DynUNet (medseg's unet) has none
(every conv is followed by instance norm, which removes a per-channel constant). The copied network gets zero
biases, so both compute the same function; nnU-Net also carries a 1x1 head per decoder level where medseg keeps
one deep-supervision head, neither used at inference. Parameter counts are printed both in full and as used
by the inference forward pass.
"""

from __future__ import annotations

import json
import sys

import torch

PATCH_SEED = 0


def compare_plans(nnunet_plans: str, medseg_plans: str) -> None:
    n = json.load(open(nnunet_plans))
    nc = n["configurations"]["3d_fullres"]
    na = nc["architecture"]["arch_kwargs"]
    m = json.load(open(medseg_plans))
    mc = m["configurations"]["3d_fullres"]
    rows = [
        ("patch_size", list(nc["patch_size"]), list(mc["patch_size"])),
        ("spacing", [float(s) for s in nc["spacing"]], [float(s) for s in mc["spacing"]]),
        ("transpose", list(n["transpose_forward"]), list(m["transpose"])),
        ("stages", na["n_stages"], len(mc["strides"])),
        ("features", list(na["features_per_stage"]), list(mc["features"])),
        ("strides", [list(s) for s in na["strides"]], [list(s) for s in mc["strides"]]),
        ("kernels", [list(k) for k in na["kernel_sizes"]], [list(k) for k in mc["kernel_sizes"]]),
        ("encoder convs", list(na["n_conv_per_stage"]), list(mc["encoder_blocks"])),
        ("decoder convs", list(na["n_conv_per_stage_decoder"]), list(mc["decoder_convs"])),
        ("normalization", nc["normalization_schemes"], mc["normalization"]),
    ]
    bad = False
    for name, a, b in rows:
        same = a == b or (name == "normalization" and [s.lower() for s in a] == [f"{s}normalization" for s in b])
        bad |= not same
        print(f"  {name:14s} nnunet {a}  medseg {b}  {'same' if same else 'DIFFERENT'}")
    if bad:
        sys.exit("plans differ")


def _medseg_state(ckpt_path: str) -> dict[str, torch.Tensor]:
    """DynUNet's state dict lists the encoder twice (also under skip_layers): one entry per tensor."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    return {k[len("model.net."):]: v for k, v in ckpt["state_dict"].items()
            if k.startswith("model.net.") and not k.startswith("model.net.skip_layers")}


def _patch(ckpt_path: str) -> torch.Tensor:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    patch = ckpt["medseg"]["plan"]["configurations"]["3d_fullres"]["patch_size"]
    return torch.randn((1, 1, *patch), generator=torch.Generator().manual_seed(PATCH_SEED))


def medseg_logits(ckpt_path: str, out: str) -> None:
    from medseg.inference.predictor import load_checkpoint

    model = load_checkpoint(ckpt_path, torch.device("cpu")).model
    with torch.inference_mode():
        torch.save(model(_patch(ckpt_path)), out)
    state = _medseg_state(ckpt_path)
    used = sum(v.numel() for k, v in state.items() if not k.startswith("deep_supervision_heads"))
    print(f"medseg unet (MONAI DynUNet): {sum(v.numel() for v in state.values()):,} parameters, "
          f"{used:,} used at inference")


def _copy_block(dst_convs, state: dict, prefix: str) -> None:
    """medseg UnetBasicBlock (conv1/norm1, conv2/norm2) -> nnU-Net StackedConvBlocks.convs[0..1]."""
    for i, block in enumerate(dst_convs):
        block.conv.weight.copy_(state[f"{prefix}conv{i + 1}.conv.weight"])
        block.conv.bias.zero_()
        block.norm.weight.copy_(state[f"{prefix}norm{i + 1}.weight"])
        block.norm.bias.copy_(state[f"{prefix}norm{i + 1}.bias"])


def nnunet_folder(ckpt_path: str, plans_path: str, dataset_json: str, model_dir: str, logits: str | None) -> None:
    import shutil
    from pathlib import Path

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset = json.load(open(dataset_json))
    plans_manager = PlansManager(plans_path)
    config = plans_manager.get_configuration("3d_fullres")
    # exactly what nnUNetPredictor.initialize_from_trained_model_folder builds
    net = nnUNetTrainer.build_network_architecture(
        plans_manager, config, determine_num_input_channels(plans_manager, config, dataset),
        plans_manager.get_label_manager(dataset).num_segmentation_heads, enable_deep_supervision=False)
    state = _medseg_state(ckpt_path)
    enc, dec = net.encoder.stages, net.decoder
    names = ["input_block."] + [f"downsamples.{i}." for i in range(len(enc) - 2)] + ["bottleneck."]
    with torch.no_grad():
        for stage, prefix in zip(enc, names, strict=True):
            _copy_block(stage[0].convs, state, prefix)
        for i, (tc, stage) in enumerate(zip(dec.transpconvs, dec.stages, strict=True)):
            tc.weight.copy_(state[f"upsamples.{i}.transp_conv.conv.weight"])
            tc.bias.zero_()
            _copy_block(stage.convs, state, f"upsamples.{i}.conv_block.")
        dec.seg_layers[-1].weight.copy_(state["output_block.conv.conv.weight"])
        dec.seg_layers[-1].bias.copy_(state["output_block.conv.conv.bias"])
    total = sum(p.numel() for p in net.parameters())
    unused = sum(p.numel() for p in dec.seg_layers[:-1].parameters())
    biases = sum(m.bias.numel() for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))
                 and m is not dec.seg_layers[-1] and m not in list(dec.seg_layers))
    print(f"nnU-Net {config.network_arch_class_name.rsplit('.', 1)[-1]}: {total:,} parameters, "
          f"{total - unused:,} used at inference, of which {biases:,} conv biases (zero here; MONAI has none)")
    out = Path(model_dir)
    (out / "fold_0").mkdir(parents=True, exist_ok=True)
    shutil.copy(plans_path, out / "plans.json")
    shutil.copy(dataset_json, out / "dataset.json")
    # the keys nnUNetPredictor reads (trainer_name, init_args.configuration, inference_allowed_mirroring_axes,
    # network_weights), as nnUNetTrainer.save_checkpoint writes them
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans_manager.plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": dataset, "device": torch.device("cpu")},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0},
               out / "fold_0" / "checkpoint_final.pth")
    if logits:
        net.eval()
        with torch.inference_mode():
            ours = net(_patch(ckpt_path))
        ref = torch.load(logits)
        err = (ours - ref).abs().max().item()
        agree = (ours.argmax(1) == ref.argmax(1)).float().mean().item()
        print(f"same weights, same random patch: max |logit difference| {err:.2e} (logits up to "
              f"{ref.abs().max().item():.2f}), argmax agreement {agree:.6f}")
        if err > 1e-3 * max(1.0, ref.abs().max().item()):
            sys.exit("the two networks do not compute the same function")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "compare-plans":
        compare_plans(*args)
    elif cmd == "medseg-logits":
        medseg_logits(*args)
    elif cmd == "nnunet-folder":
        nnunet_folder(*args[:4], args[4] if len(args) > 4 else None)
    else:
        sys.exit(__doc__)
