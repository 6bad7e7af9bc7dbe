"""Intensity normalisation per channel, chosen by the plan (nnU-Net's schemes)."""

from __future__ import annotations

import numpy as np


def normalize(image: np.ndarray, schemes: list[str], use_mask: list[bool], mask: np.ndarray,
              intensity_properties: list[dict] | None = None) -> np.ndarray:
    """``zscore``: per-image (inside ``mask`` when asked, zero outside); ``ct``: clip to the dataset's
    foreground [p0.5, p99.5], then the dataset's foreground mean/std; ``rescale_0_1``: per-image min-max;
    ``rgb_0_1``: divide by 255; ``none``: unchanged (nnU-Net's schemes, chosen by channel name)."""
    out = np.empty_like(image, dtype=np.float32)
    for c, scheme in enumerate(schemes):
        x = image[c].astype(np.float32)
        if scheme == "ct":
            props = intensity_properties[c]
            x = np.clip(x, props["percentile_00_5"], props["percentile_99_5"])
            out[c] = (x - props["mean"]) / max(props["std"], 1e-8)
        elif scheme == "zscore":
            if use_mask[c]:
                vals = x[mask]
                mean, std = (vals.mean(), vals.std()) if vals.size else (0.0, 1.0)
                out[c] = np.where(mask, (x - mean) / max(std, 1e-8), 0.0)
            else:
                out[c] = (x - x.mean()) / max(x.std(), 1e-8)
        elif scheme == "rescale_0_1":
            out[c] = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
        elif scheme == "rgb_0_1":
            out[c] = x / 255.0
        elif scheme == "none":
            out[c] = x
        else:
            raise ValueError(f"unknown normalisation scheme {scheme!r}")
    return out
