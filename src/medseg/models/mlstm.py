"""mLSTM (matrix-memory LSTM, xLSTM: Beck et al. 2024, arXiv:2405.04517) in plain PyTorch, and the
Vision-LSTM style layer built on it (as used by ViL / ViLU-Net).

Cell equations, per head, with head dimension D (keys scaled by 1/sqrt(D)):

    C_t = f_t C_{t-1} + i_t k_t v_t^T         n_t = f_t n_{t-1} + i_t k_t
    h_t = C_t^T q_t / max(|n_t^T q_t|, 1)
    i_t = exp(i~_t)                           f_t = sigmoid(f~_t)

The exponential input gate overflows, so everything is carried relative to a running log-scale m_t
(the "stabiliser"): with log-decay weights  w_tj = sum_{s=j+1..t} log f_s + i~_j  (j <= t),
m_t = max_j w_tj, and

    h_t = sum_j exp(w_tj - m_t) (q_t.k_j) v_j / max(|sum_j exp(w_tj - m_t) (q_t.k_j)|, exp(-m_t))

which is the recurrence above multiplied through by exp(-m_t) (the 1 in the denominator becomes exp(-m_t)).
The zero initial state has m_0 = -inf, so it never wins the max and the parallel and chunkwise forms agree
exactly, normaliser included.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["mlstm_parallel", "mlstm_chunkwise", "mLSTMLayer", "ViLBlockPair", "run_on_feature_map"]

# Added to the normaliser so that an all-zero head (e.g. zero keys at init) cannot divide by zero; it is the
# same in both forms so they stay comparable.
_EPS = 1e-6


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i_gate: torch.Tensor,
                  f_gate: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be (B, H, S, D) and v (B, H, S, Dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if i_gate.shape != q.shape[:3] or f_gate.shape != q.shape[:3]:
        raise ValueError(f"gates must be (B, H, S) = {tuple(q.shape[:3])}; got {tuple(i_gate.shape)}, "
                         f"{tuple(f_gate.shape)}")


def _upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # exp/cumsum of the gates lose too much in half precision: work in at least float32 (float64 stays)
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    # torch.autocast rejects device types without autocast (e.g. "meta"), where nothing is re-cast anyway
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))  # torch < 2.4
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def _outside_autocast(cell):
    """Run ``cell`` with autocast off on the inputs' device. Upcasting to float32 is not enough on its own:
    autocast re-casts matmul inputs to half precision, and with large input gates the stabilised weights
    exp(w - m) then lose most of their accuracy. The result keeps the caller's dtype (``v``'s)."""

    @functools.wraps(cell)
    def run(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with _autocast_off(q.device.type):
            return cell(q, *args, **kwargs)

    return run


@_outside_autocast
def mlstm_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i_gate: torch.Tensor,
                   f_gate: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Quadratic (S x S per head) mLSTM; the reference for :func:`mlstm_chunkwise` on short sequences.

    q, k: (B, H, S, D); v: (B, H, S, Dv); i_gate, f_gate: pre-activations (B, H, S). Returns (B, H, S, Dv).
    """
    _check_inputs(q, k, v, i_gate, f_gate)
    dtype, seq = v.dtype, q.shape[2]
    q, k, v, i_gate, f_gate = _upcast(q, k, v, i_gate, f_gate)

    log_f = F.logsigmoid(f_gate).cumsum(-1)                                        # (B, H, S)
    log_w = log_f[..., :, None] - log_f[..., None, :] + i_gate[..., None, :]        # (B, H, S, S)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    log_w = log_w.masked_fill(~causal, float("-inf"))
    m = log_w.amax(-1, keepdim=True)                                               # (B, H, S, 1)

    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) * torch.exp(log_w - m)
    norm = torch.maximum(scores.sum(-1, keepdim=True).abs(), torch.exp(-m))
    return ((scores @ v) / (norm + eps)).to(dtype)


@_outside_autocast
def mlstm_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i_gate: torch.Tensor,
                    f_gate: torch.Tensor, chunk_size: int = 64, eps: float = _EPS) -> torch.Tensor:
    """Chunkwise-parallel mLSTM: quadratic inside chunks of ``chunk_size`` tokens, recurrent across them.

    Memory is O(S * chunk_size + (S / chunk_size) * D * Dv) per head, i.e. linear in S. Same arguments and
    result as :func:`mlstm_parallel`; S need not be a multiple of ``chunk_size``.
    """
    _check_inputs(q, k, v, i_gate, f_gate)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, heads, seq, dim = q.shape
    dtype, dim_v = v.dtype, v.shape[-1]
    q, k, v, i_gate, f_gate = _upcast(q, k, v, i_gate, f_gate)

    size = min(chunk_size, seq)
    chunks = math.ceil(seq / size)
    pad = chunks * size - seq
    if pad:
        # padding goes at the end, so causality keeps it out of every real output; it only touches the
        # final state, which is discarded
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i_gate, f_gate = F.pad(i_gate, (0, pad)), F.pad(f_gate, (0, pad))

    q = q.reshape(batch, heads, chunks, size, dim) * dim ** -0.5
    k = k.reshape(batch, heads, chunks, size, dim)
    v = v.reshape(batch, heads, chunks, size, dim_v)
    i_gate = i_gate.reshape(batch, heads, chunks, size)
    # cumulative log forget from each chunk's start (inclusive); cumsum stays local so it never drifts over S
    log_f = F.logsigmoid(f_gate).reshape(batch, heads, chunks, size).cumsum(-1)
    log_f_total = log_f[..., -1]                                                   # (B, H, N)

    # each chunk's own contribution to the state at its end, stabilised by its own max
    log_w_end = log_f_total[..., None] - log_f + i_gate                            # (B, H, N, L)
    m_local = log_w_end.amax(-1)                                                   # (B, H, N)
    w_end = torch.exp(log_w_end - m_local[..., None])[..., None]
    c_local = (k * w_end).transpose(-1, -2) @ v                                    # (B, H, N, D, Dv)
    n_local = (k * w_end).sum(-2)                                                  # (B, H, N, D)

    # Recurrence over chunks: O(D * Dv) per step. The state entering chunk c is stored (stabilised by
    # m_in[c]); the zero initial state has m = -inf, so exp(... + m) is exactly 0 and m never comes from it.
    c_state = q.new_zeros(batch, heads, dim, dim_v)
    n_state = q.new_zeros(batch, heads, dim)
    m_state = q.new_full((batch, heads), float("-inf"))
    c_steps, n_steps, m_steps = [c_state], [n_state], [m_state]
    for c in range(chunks - 1):
        m_new = torch.maximum(log_f_total[..., c] + m_state, m_local[..., c])
        decay = torch.exp(log_f_total[..., c] + m_state - m_new)
        scale = torch.exp(m_local[..., c] - m_new)
        c_state = decay[..., None, None] * c_state + scale[..., None, None] * c_local[:, :, c]
        n_state = decay[..., None] * n_state + scale[..., None] * n_local[:, :, c]
        m_state = m_new
        c_steps.append(c_state)
        n_steps.append(n_state)
        m_steps.append(m_state)
    c_in, n_in, m_in = torch.stack(c_steps, 2), torch.stack(n_steps, 2), torch.stack(m_steps, 2)

    # outputs: intra-chunk quadratic part plus the carried state, both under the exact running max m_t
    log_w = log_f[..., :, None] - log_f[..., None, :] + i_gate[..., None, :]       # (B, H, N, L, L)
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    log_w = log_w.masked_fill(~causal, float("-inf"))
    log_w_state = log_f + m_in[..., None]                                          # (B, H, N, L)
    m = torch.maximum(log_w_state, log_w.amax(-1))
    w_state = torch.exp(log_w_state - m)[..., None]
    scores = (q @ k.transpose(-1, -2)) * torch.exp(log_w - m[..., None])
    num = scores @ v + w_state * (q @ c_in)
    den = scores.sum(-1, keepdim=True) + w_state * (q * n_in[:, :, :, None]).sum(-1, keepdim=True)
    h = num / (torch.maximum(den.abs(), torch.exp(-m)[..., None]) + eps)
    return h.reshape(batch, heads, chunks * size, dim_v)[:, :, :seq].to(dtype)


class _HeadwiseLinear(nn.Module):
    """Block-diagonal linear map (blocks of ``block_size`` channels), as ViL uses for q, k and v: cheap, and
    keeps channels from mixing across heads."""

    def __init__(self, dim: int, block_size: int, bias: bool):
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim {dim} is not a multiple of block_size {block_size}")
        self.blocks, self.block_size = dim // block_size, block_size
        self.weight = nn.Parameter(torch.empty(self.blocks, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.einsum("...gi,goi->...go", x.reshape(*shape[:-1], self.blocks, self.block_size), self.weight)
        y = y.reshape(shape)
        return y if self.bias is None else y + self.bias


class mLSTMLayer(nn.Module):  # noqa: N801 (the paper's name)
    """Pre-norm residual mLSTM block in the Vision-LSTM layout, on tokens (B, S, C) -> (B, S, C).

    x -> LayerNorm -> up-projection to (x_m, z), each ``expansion * C`` wide;
    q, k from the causal depthwise conv + SiLU of x_m, v from x_m (headwise projections);
    input/forget gates (one per head) from [q, k, v]; cell -> per-head LayerNorm -> + skip * conv branch;
    gated by SiLU(z) -> down-projection -> dropout -> + x.

    ``reverse=True`` runs the scan from the last token to the first (the sequence is flipped before, and the
    result back after, so causality, the conv included, points the other way).
    """

    def __init__(self, dim: int, num_heads: int = 4, expansion: int = 2, conv_kernel_size: int = 4,
                 qkv_block_size: int = 4, chunk_size: int = 64, reverse: bool = False, bias: bool = False,
                 dropout: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        inner = expansion * dim
        if inner % num_heads:
            raise ValueError(f"expansion * dim = {inner} is not divisible by num_heads = {num_heads}")
        self.dim, self.inner, self.num_heads = dim, inner, num_heads
        self.chunk_size, self.reverse, self.norm_eps = chunk_size, reverse, norm_eps

        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.proj_up = nn.Linear(dim, 2 * inner, bias=bias)
        # depthwise and left-padded only: token t sees tokens t-k+1..t
        self.conv = nn.Conv1d(inner, inner, conv_kernel_size, groups=inner, padding=conv_kernel_size - 1)
        self.q_proj = _HeadwiseLinear(inner, qkv_block_size, bias)
        self.k_proj = _HeadwiseLinear(inner, qkv_block_size, bias)
        self.v_proj = _HeadwiseLinear(inner, qkv_block_size, bias)
        self.i_gate = nn.Linear(3 * inner, num_heads)
        self.f_gate = nn.Linear(3 * inner, num_heads)
        self.out_norm_weight = nn.Parameter(torch.ones(inner))
        self.skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # "small init" (std sqrt(2 / 5d)) as in xLSTM/ViL; exact init details are not critical here
        for lin in (self.proj_up, self.proj_down):
            nn.init.normal_(lin.weight, std=math.sqrt(2.0 / (5.0 * lin.in_features)))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=math.sqrt(2.0 / (5.0 * proj.block_size)))
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        # gates start input-independent: forget biases in [3, 6] keep long memory at init (sigmoid ~ 0.95-1),
        # input biases near 0
        nn.init.zeros_(self.i_gate.weight)
        nn.init.normal_(self.i_gate.bias, std=0.1)
        nn.init.zeros_(self.f_gate.weight)
        with torch.no_grad():
            self.f_gate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.out_norm_weight)
        nn.init.ones_(self.skip)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.reshape(b, s, self.num_heads, -1).transpose(1, 2)                 # (B, H, S, Dh)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        x_m, z = self.proj_up(x).chunk(2, dim=-1)
        x_conv = F.silu(self.conv(x_m.transpose(1, 2))[..., :s].transpose(1, 2))
        q, k, v = self.q_proj(x_conv), self.k_proj(x_conv), self.v_proj(x_m)
        qkv = torch.cat([q, k, v], dim=-1)
        i_gate = self.i_gate(qkv).transpose(1, 2)                                  # (B, H, S)
        f_gate = self.f_gate(qkv).transpose(1, 2)
        h = mlstm_chunkwise(self._heads(q), self._heads(k), self._heads(v), i_gate, f_gate, self.chunk_size)
        # per-head LayerNorm (a GroupNorm with one group per head), then a shared per-channel scale
        h = F.layer_norm(h, h.shape[-1:], eps=self.norm_eps).transpose(1, 2).reshape(b, s, self.inner)
        h = h * self.out_norm_weight + self.skip * x_conv
        return self.dropout(self.proj_down(h * F.silu(z)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens (B, S, {self.dim}), got {tuple(x.shape)}")
        y = self.norm(x)
        if self.reverse:
            return x + self._mix(y.flip(1)).flip(1)
        return x + self._mix(y)


class ViLBlockPair(nn.Module):
    """A forward-scan mLSTMLayer followed by a backward-scan one, so that every token sees all others (ViL /
    ViLU-Net alternate directions between blocks). Tokens (B, S, C) -> (B, S, C); see :meth:`forward_feature_map`
    for (B, C, *spatial) inputs."""

    def __init__(self, dim: int, **layer_kwargs):
        super().__init__()
        layer_kwargs.pop("reverse", None)
        self.forward_layer = mLSTMLayer(dim, reverse=False, **layer_kwargs)
        self.backward_layer = mLSTMLayer(dim, reverse=True, **layer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backward_layer(self.forward_layer(x))

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return run_on_feature_map(self, x)


def run_on_feature_map(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a token module (B, S, C) -> (B, S, C) to a feature map (B, C, *spatial), 2D or 3D: spatial
    positions become tokens in row-major (C-order) scan order, and the result is folded back."""
    if x.dim() < 3:
        raise ValueError(f"expected a feature map (B, C, *spatial), got {tuple(x.shape)}")
    batch, channels, *spatial = x.shape
    tokens = module(x.flatten(2).transpose(1, 2))
    return tokens.transpose(1, 2).reshape(batch, channels, *spatial)
