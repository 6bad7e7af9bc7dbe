"""U-Mamba (Ma, Li, Wang 2024, arXiv:2401.04722): the residual-encoder U-Net with Mamba state-space layers that
give the convolutional encoder long-range context.

Two variants, built from the plan exactly like ``resenc_unet`` (same stem, encoder, decoder and heads):

- ``umamba_bot``: one Mamba layer after the last encoder stage (the bottleneck), where tokens are few.
- ``umamba_enc``: a Mamba layer after every encoder stage, except stages whose token count at the plan's patch
  size exceeds ``mamba_max_tokens`` (default 32768). The pure-PyTorch scan materialises (L, 2C, 16) states per
  token, so the full- (and, for big 3D patches, half-) resolution stages would not fit in memory; the paper
  applies the layer everywhere with its fused CUDA kernel. The rule depends only on the plan, never on the
  device, so a checkpoint loads wherever it is used.

Mamba layer: LayerNorm over channels, spatial dims flattened in raster order to a (B, L, C) token sequence, a
Mamba block (d_state 16, d_conv 4, expand 2), reshaped back, residual add. The block runs on ``mamba_ssm``'s
CUDA kernels when that package imports (its compiled selective-scan extension included) and the input is on
CUDA, else on ``mambapy``'s parallel scan. An installed but broken ``mamba_ssm`` (a build for another torch or
CUDA, or a kernel missing for this GPU) is not fatal: the import, or the first forward, fails, one warning says
why, and mambapy is used for the rest of the process. Both name their parameters identically (in_proj,
conv1d, x_proj, dt_proj, A_log, D, out_proj), so one set of weights (owned by the mambapy block, hence one state
dict) serves both backends.

Each variant has a matched control, ``umamba_bot_control`` / ``umamba_enc_control`` (``control=True``): the same
network with every Mamba layer replaced by ``nn.Identity``, i.e. the residual-encoder U-Net the layers were added
to, trained with the family's own optimiser and schedule, so that the layers' own contribution can be measured.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
from mambapy.mamba import MambaBlock, MambaConfig

from medseg.errors import ConfigError
from medseg.models.registry import register_control, register_model
from medseg.models.resenc_unet import ResEncUNet, residual_blocks, sequence_stages
from medseg.planning.plan import ConfigurationPlan

D_STATE, D_CONV, EXPAND = 16, 4, 2  # U-Mamba's hyperparameters (also Mamba's defaults)
DEFAULT_MAX_TOKENS = 32768

log = logging.getLogger(__name__)

# the submodules and parameters both implementations have, under the same names and shapes
_SHARED = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj")


# why mamba_ssm was given up on in this process (None while it has not been); set once, by _fall_back
_fallback_reason: str | None = None


def _fall_back(error: BaseException, stage: str) -> None:
    """Give up on mamba_ssm for the rest of the process, with one warning however many layers hit the error."""
    global _fallback_reason
    if _fallback_reason is not None:
        return
    _fallback_reason = f"{type(error).__name__} while {stage}: {error}"
    log.warning("mamba_ssm is installed but unusable (%s); Mamba layers use mambapy's pure-PyTorch scan instead "
                "(same weights and results, slower and more memory)", _fallback_reason)


@functools.cache
def mamba_ssm_available() -> bool:
    """Whether mamba_ssm really imports. Finding the package is not enough: its compiled extension fails only
    when loaded (ImportError/OSError "undefined symbol" for a build against another torch or CUDA)."""
    try:
        from mamba_ssm import Mamba  # noqa: F401
        import selective_scan_cuda  # noqa: F401  (the scan kernel; mamba_ssm loads it when imported)
    except ModuleNotFoundError as e:
        if e.name != "mamba_ssm":  # installed, but something it needs is missing
            _fall_back(e, "importing it")
        return False
    except Exception as e:
        _fall_back(e, "importing it")
        return False
    return True


def select_backend(device_type: str, force_mambapy: bool = False) -> str:
    """"mamba_ssm" or "mambapy": the Mamba implementation for inputs on ``device_type``. Only CUDA inputs try
    mamba_ssm (importing it the first time), so CPU runs never touch the package."""
    if device_type != "cuda" or force_mambapy or _fallback_reason is not None or not mamba_ssm_available():
        return "mambapy"
    return "mamba_ssm"


class MambaLayer(nn.Module):
    """x + Mamba(LayerNorm(x)) over the flattened spatial tokens of a (B, C, *spatial) map."""

    def __init__(self, channels: int, d_state: int = D_STATE, d_conv: int = D_CONV, expand: int = EXPAND):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        # mambapy's Mamba wraps the block in its own RMSNorm and residual; the bare block is the equivalent of
        # mamba_ssm.Mamba, so take that and keep the norm/residual here
        self.mamba = MambaBlock(MambaConfig(d_model=channels, n_layers=1, d_state=d_state, d_conv=d_conv,
                                            expand_factor=expand, pscan=True))
        self.dims = (channels, d_state, d_conv, expand)
        self.force_mambapy = False  # set True to run the pure-PyTorch scan on CUDA too (to compare backends)
        # mamba_ssm's module is built on first CUDA use and kept out of the module tree (a list hides it), so
        # the state dict and parameters() see the weights once
        self._ssm: list[nn.Module] = []
        self._ssm_ran = False  # whether mamba_ssm's forward has succeeded here (later errors are real errors)

    def _use_mamba_ssm(self, x: torch.Tensor) -> bool:
        return select_backend(x.device.type, self.force_mambapy) == "mamba_ssm"

    @property
    def backend(self) -> str:
        """"mamba_ssm" or "mambapy": what forward would use for an input on this layer's parameters' device."""
        return "mamba_ssm" if self._use_mamba_ssm(self.norm.weight) else "mambapy"

    def _mamba_ssm_block(self) -> nn.Module:
        if not self._ssm:
            from mamba_ssm import Mamba

            channels, d_state, d_conv, expand = self.dims
            self._ssm.append(Mamba(d_model=channels, d_state=d_state, d_conv=d_conv, expand=expand))
        ssm = self._ssm[0]
        # rebind on every call: .to()/.cuda() may replace parameter objects, and this is cheap
        for name in _SHARED:
            setattr(ssm, name, getattr(self.mamba, name))
        return ssm

    def _mamba_ssm_forward(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """mamba_ssm's output (it handles autocast itself), or None when its first forward here fails."""
        try:
            y = self._mamba_ssm_block()(tokens)
        except torch.cuda.OutOfMemoryError:
            raise  # a memory problem, not a broken install; mambapy would need more
        except Exception as e:
            if self._ssm_ran:
                raise
            _fall_back(e, "running its first forward")
            return None
        self._ssm_ran = True
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, L, C), raster order
        y = self._mamba_ssm_forward(tokens) if self._use_mamba_ssm(x) else None
        if y is None:
            # the scan multiplies L exponentials; half precision under/overflows, so run it in float32
            with torch.autocast(x.device.type, enabled=False):
                y = self.mamba(tokens.float()).to(x.dtype)
        return x + y.transpose(1, 2).reshape(b, c, *spatial)


class UMamba(ResEncUNet):
    """ResEncUNet with a MambaLayer appended to the encoder stages listed in ``mamba_stages`` (the forward pass,
    decoder and deep-supervision outputs are ResEncUNet's)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, features: list[int], strides, kernels,
                 encoder_blocks: list[int], decoder_convs: list[int], mamba_stages: list[int],
                 deep_supervision: bool = True, control: bool = False):
        super().__init__(dims, in_channels, out_channels, features, strides, kernels, encoder_blocks,
                         decoder_convs, deep_supervision)
        self.mamba_stages = sorted(mamba_stages)
        for i in self.mamba_stages:
            stage = self.encoder[i]
            assert isinstance(stage, nn.Sequential)  # ResEncUNet builds each encoder stage as one
            # the control keeps the slot (same module indices) but the layer does nothing
            stage.append(nn.Identity() if control else MambaLayer(features[i]))

    def mamba_layers(self) -> list[MambaLayer]:
        return [m for m in self.modules() if isinstance(m, MambaLayer)]


def _build(variant: str, spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None,
           deep_supervision: bool, mamba_max_tokens: int, control: bool) -> UMamba:
    if plan is None:
        raise ConfigError(f"model 'umamba_{variant}' is built from a plan's topology; pass plan=")
    if plan.spatial_dims != spatial_dims:
        raise ConfigError(f"plan {plan.name!r} is {plan.spatial_dims}D but spatial_dims={spatial_dims}")
    blocks, decoder = residual_blocks(plan)
    # the bottleneck always has a layer, so umamba_enc is never less than umamba_bot
    stages = [plan.num_stages - 1] if variant == "bot" else sequence_stages(plan.patch_size, plan.strides,
                                                                             mamba_max_tokens)
    return UMamba(spatial_dims, in_channels, out_channels, plan.features, plan.strides, plan.kernel_sizes,
                  blocks, decoder, stages, deep_supervision, control)


@register_model("umamba_bot", default_optimizer="adamw", default_scheduler="warmup_cosine")
def build_umamba_bot(spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None = None,
                     deep_supervision: bool = True, control: bool = False) -> nn.Module:
    """control: every Mamba layer is nn.Identity (the matched control, model umamba_bot_control)."""
    return _build("bot", spatial_dims, in_channels, out_channels, plan, deep_supervision, 0, control)


@register_model("umamba_enc", default_optimizer="adamw", default_scheduler="warmup_cosine")
def build_umamba_enc(spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None = None,
                     deep_supervision: bool = True, mamba_max_tokens: int = DEFAULT_MAX_TOKENS,
                     control: bool = False) -> nn.Module:
    """control: every Mamba layer is nn.Identity (the matched control, model umamba_enc_control)."""
    return _build("enc", spatial_dims, in_channels, out_channels, plan, deep_supervision, mamba_max_tokens,
                  control)


# the matched controls: models of their own name (run folders, checkpoints), the family's optimiser and schedule
register_control("umamba_bot")
register_control("umamba_enc")
