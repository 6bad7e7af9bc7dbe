"""ViLU-Net: the residual-encoder U-Net (:mod:`medseg.models.resenc_unet`) with Vision-LSTM (mLSTM) layers after
the deeper encoder stages, after ViLU-Net (Vision-LSTM U-Net; cf. U-Mamba's "Enc" variant, mLSTM for Mamba).

Where the mLSTM layers go: after encoder stage i when its feature map, at the plan's patch size, has at most
``vil_max_tokens`` positions (default 16384: 24^3 in 3D, 128^2 in 2D), and always after the bottleneck.
Why: the scan is linear in the number of tokens, but its chunk loop is sequential (S / chunk_size steps) and
its activations are several times the feature map, so at full resolution it would dominate time and memory
while adding little over the convs there; global context is what the deep, coarse stages lack.

Each such stage gets ``vil_depth`` pre-norm residual mLSTM layers on its positions in row-major scan order.
Scan directions alternate forward / backward from one layer to the next across the whole network (as ViL
alternates between blocks), so with the default depth 2 every stage has one pass each way and every token
sees all others. The cell is :func:`medseg.models.mlstm.mlstm_chunkwise`: memory linear in the tokens, unlike
a parallel S x S formulation (which needs > 24 GB at 24^3).

The matched control, ``vilu_net_control`` (``control=True``), replaces each stage's mLSTM stack by
``nn.Identity``: the residual-encoder U-Net itself, trained with ViLU-Net's optimiser and schedule.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medseg.errors import ConfigError
from medseg.models.mlstm import mLSTMLayer, run_on_feature_map
from medseg.models.registry import register_control, register_model
from medseg.models.resenc_unet import ResEncUNet, residual_blocks, sequence_stages
from medseg.planning.plan import ConfigurationPlan

__all__ = ["ViLUNet", "vil_stages", "build_vilu_net"]


def vil_stages(patch_size, strides, max_tokens: int) -> list[int]:
    """Encoder stages that get mLSTM layers: those with at most ``max_tokens`` positions at ``patch_size``
    (after the cumulative ``strides``), plus the bottleneck (the last stage) in every case."""
    return sequence_stages(patch_size, strides, max_tokens)


class FeatureMapMLSTM(nn.Module):
    """mLSTM layers over a (B, C, *spatial) feature map, positions as tokens in row-major order."""

    def __init__(self, layers: list[mLSTMLayer]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_on_feature_map(self.layers, x)


class ViLUNet(ResEncUNet):
    """ResEncUNet with mLSTM layers appended to the encoder stages in ``vil_stages`` (forward, decoder and
    deep-supervision outputs are ResEncUNet's)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, features: list[int], strides, kernels,
                 encoder_blocks: list[int], decoder_convs: list[int], vil_stages: list[int],
                 deep_supervision: bool = True, vil_depth: int = 2, num_heads: int = 4, chunk_size: int = 64,
                 control: bool = False):
        if vil_depth < 1:
            raise ConfigError(f"vil_depth must be >= 1, got {vil_depth}")
        super().__init__(dims, in_channels, out_channels, features, strides, kernels, encoder_blocks,
                         decoder_convs, deep_supervision)
        self.vil_stages = sorted(vil_stages)
        # one stack per encoder stage (empty where none); the direction counter runs across stages so the
        # alternation also holds between consecutive stages when vil_depth is odd
        self.vil = nn.ModuleList()
        layer_index = 0
        for i in range(len(features)):
            layers = []
            if i in self.vil_stages:
                for _ in range(0 if control else vil_depth):
                    layers.append(mLSTMLayer(features[i], num_heads=num_heads, chunk_size=chunk_size,
                                             reverse=layer_index % 2 == 1))
                    layer_index += 1
                stage = self.encoder[i]
                assert isinstance(stage, nn.Sequential)  # ResEncUNet builds each encoder stage as one
                # the control keeps the slot (same module indices) but it does nothing
                stage.append(nn.Identity() if control else FeatureMapMLSTM(layers))
            self.vil.append(nn.Sequential(*layers))

    def mlstm_layers(self) -> list[mLSTMLayer]:
        """All mLSTM layers in network order (the order their scan directions alternate in)."""
        return [m for m in self.vil.modules() if isinstance(m, mLSTMLayer)]


@register_model("vilu_net", default_optimizer="adamw", default_scheduler="warmup_cosine")
def build_vilu_net(spatial_dims: int, in_channels: int, out_channels: int, plan: ConfigurationPlan | None = None,
                   deep_supervision: bool = True, chunk_size: int = 64, vil_max_tokens: int = 16384,
                   vil_depth: int = 2, vil_heads: int = 4, control: bool = False) -> nn.Module:
    """control: every stage's mLSTM stack is nn.Identity (the matched control, model vilu_net_control)."""
    if plan is None:
        raise ConfigError("model 'vilu_net' is built from a plan's topology; pass plan=")
    blocks, decoder = residual_blocks(plan)
    stages = vil_stages(plan.patch_size, plan.strides, vil_max_tokens)
    return ViLUNet(spatial_dims, in_channels, out_channels, plan.features, plan.strides, plan.kernel_sizes,
                   blocks, decoder, stages, deep_supervision, vil_depth, vil_heads, chunk_size, control)


# the matched control: a model of its own name (run folder, checkpoint), ViLU-Net's optimiser and schedule
register_control("vilu_net")
