import resource
import time

import pytest
import torch
import torch.nn as nn

import medseg.models.mlstm as mlstm_module
from medseg.models.mlstm import ViLBlockPair, mLSTMLayer, mlstm_chunkwise, mlstm_parallel, run_on_feature_map

# (S, chunk_size): divisible, not divisible, chunk larger than S, chunk of one token, single full chunk
SHAPES = [(16, 4), (37, 8), (50, 64), (64, 16), (100, 16), (33, 1), (20, 7)]


def _inputs(seq: int, regime: str, dtype=torch.float32, batch: int = 2, heads: int = 3, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    # "balanced": O(1) outputs, both normaliser branches; "gate_bound": strongly negative input gates, so
    # exp(-m) dominates the normaliser; "wide": large gates and q.k, |n^T q| can nearly cancel (ill-conditioned);
    # "large_gates": input gates spanning exp(+-30), where the stabilised weights need float32 to stay accurate
    qk_scale, i_mean, i_std = {"balanced": (0.5, 0.0, 1.0), "gate_bound": (1.0, -3.0, 1.0),
                               "wide": (1.0, 0.0, 2.0), "large_gates": (1.0, 0.0, 10.0)}[regime]
    q = randn(batch, heads, seq, dim) * qk_scale
    k = randn(batch, heads, seq, dim) * qk_scale
    v = randn(batch, heads, seq, dim)
    i_gate = randn(batch, heads, seq) * i_std + i_mean
    f_gate = randn(batch, heads, seq) * 2.0 + 2.0
    return [t.requires_grad_() for t in (q, k, v, i_gate, f_gate)], randn(batch, heads, seq, dim)


def _output_and_grads(fn, inputs, upstream, **kw):
    out = fn(*inputs, **kw)
    return out, torch.autograd.grad((out * upstream).sum(), inputs)


def _recurrent_reference(q, k, v, i_gate, f_gate, eps=1e-6):
    """Token-by-token stabilised recurrence, written directly from the paper's recurrent equations."""
    batch, heads, seq, dim = q.shape
    c = q.new_zeros(batch, heads, dim, v.shape[-1])
    n = q.new_zeros(batch, heads, dim)
    m = q.new_full((batch, heads), float("-inf"))
    outs, gate_bound = [], 0
    for t in range(seq):
        log_f = torch.nn.functional.logsigmoid(f_gate[..., t])
        m_new = torch.maximum(log_f + m, i_gate[..., t])
        f_s, i_s = torch.exp(log_f + m - m_new), torch.exp(i_gate[..., t] - m_new)
        kt = k[..., t, :] / dim ** 0.5
        c = f_s[..., None, None] * c + i_s[..., None, None] * kt[..., :, None] * v[..., t, None, :]
        n = f_s[..., None] * n + i_s[..., None] * kt
        m = m_new
        qt = q[..., t, :]
        qn = (n * qt).sum(-1).abs()
        gate_bound += int((torch.exp(-m) > qn).sum())
        outs.append((qt[..., None, :] @ c).squeeze(-2) / (torch.maximum(qn, torch.exp(-m)) + eps)[..., None])
    return torch.stack(outs, 2), gate_bound


@pytest.mark.parametrize("regime", ["balanced", "gate_bound"])
def test_parallel_matches_the_paper_recurrence(regime):
    (q, k, v, i_gate, f_gate), _ = _inputs(24, regime, dtype=torch.float64)
    ref, gate_bound = _recurrent_reference(q, k, v, i_gate, f_gate)
    assert gate_bound > 0  # the exp(-m) branch of the normaliser is exercised
    if regime == "balanced":
        assert gate_bound < ref[..., 0].numel()  # ... and so is the |n^T q| branch
    torch.testing.assert_close(mlstm_parallel(q, k, v, i_gate, f_gate), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("regime", ["balanced", "gate_bound"])
@pytest.mark.parametrize("seq,chunk", SHAPES)
def test_chunkwise_matches_parallel_float32(seq, chunk, regime):
    inputs, upstream = _inputs(seq, regime)
    ref, ref_grads = _output_and_grads(mlstm_parallel, inputs, upstream)
    out, grads = _output_and_grads(mlstm_chunkwise, inputs, upstream, chunk_size=chunk)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    for name, g, g_ref in zip(["q", "k", "v", "i_gate", "f_gate"], grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=0, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("seq,chunk", [(37, 8), (100, 16), (50, 64)])
def test_chunkwise_matches_parallel_when_ill_conditioned(seq, chunk):
    # near-cancelling normalisers amplify float32 rounding; in float64 the two forms must agree to rounding
    inputs, upstream = _inputs(seq, "wide", dtype=torch.float64)
    ref, ref_grads = _output_and_grads(mlstm_parallel, inputs, upstream)
    out, grads = _output_and_grads(mlstm_chunkwise, inputs, upstream, chunk_size=chunk)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=0)
    # and in float32 to 1e-4 relative to the output/gradient scale
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out32, grads32 = _output_and_grads(mlstm_chunkwise, inputs32, upstream.float(), chunk_size=chunk)
    assert (out32.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    for g, g_ref in zip(grads32, ref_grads):
        assert (g.double() - g_ref).abs().max() <= 1e-4 * g_ref.abs().max()


@pytest.mark.parametrize("cell", [mlstm_chunkwise, mlstm_parallel])
def test_cells_compute_in_float32_under_bf16_autocast(cell):
    # autocast would re-cast the matmul inputs to bf16 after the cells upcast them; with large input gates that
    # costs a sizeable fraction of the output's scale
    inputs, upstream = _inputs(50, "large_gates")
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref, ref_grads = _output_and_grads(mlstm_parallel, inputs64, upstream.double())
    kw = {"chunk_size": 16} if cell is mlstm_chunkwise else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward only, as in training
        out = cell(*inputs, **kw)
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    assert out.dtype == torch.float32  # float32 in, float32 out
    assert (out.double() - ref).abs().max() <= 1e-3 * ref.abs().max()
    for name, g, g_ref in zip(["q", "k", "v", "i_gate", "f_gate"], grads, ref_grads):
        assert (g.double() - g_ref).abs().max() <= 1e-3 * g_ref.abs().max(), name


def test_layer_core_is_accurate_under_bf16_autocast(monkeypatch):
    calls = []

    def recording_chunkwise(*args, **kwargs):
        out = mlstm_chunkwise(*args, **kwargs)
        calls.append((args[:5], out))
        return out

    monkeypatch.setattr(mlstm_module, "mlstm_chunkwise", recording_chunkwise)
    torch.manual_seed(0)
    layer = mLSTMLayer(32, num_heads=2, chunk_size=16)
    with torch.no_grad():
        layer.i_gate.weight.normal_(0.0, 2.0)  # input-gate pre-activations with a std of about 6
    x = torch.randn(2, 60, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (q, k, v, i_gate, f_gate), h = calls[0]
    assert q.dtype == torch.bfloat16 and i_gate.abs().max() > 10
    assert h.dtype == torch.bfloat16  # the cell returns the caller's dtype ...
    assert y.dtype == torch.float32   # ... and the residual stream keeps the input's
    ref = mlstm_parallel(*(t.double() for t in (q, k, v, i_gate, f_gate)))
    # rounding the result to bf16 alone costs up to 2^-9 of it
    assert (h.double() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_chunkwise_rejects_bad_arguments():
    (q, k, v, i_gate, f_gate), _ = _inputs(8, "balanced")
    with pytest.raises(ValueError):
        mlstm_chunkwise(q, k, v, i_gate, f_gate, chunk_size=0)
    with pytest.raises(ValueError):
        mlstm_chunkwise(q, k, v, i_gate[..., :-1], f_gate)


def _layer_pair(**kw):
    torch.manual_seed(0)
    fwd = mLSTMLayer(16, num_heads=2, chunk_size=8, **kw)
    rev = mLSTMLayer(16, num_heads=2, chunk_size=8, reverse=True, **kw)
    rev.load_state_dict(fwd.state_dict())
    return fwd, rev


@pytest.mark.parametrize("shape", [(2, 16, 6, 7), (1, 16, 4, 5, 3)])
def test_block_pair_on_feature_maps(shape):
    torch.manual_seed(0)
    block = ViLBlockPair(16, num_heads=2, chunk_size=8)
    x = torch.randn(*shape, requires_grad=True)
    y = block.forward_feature_map(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(y, x)  # the residual branch contributes
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} receives no gradient"


def test_reverse_flag_changes_scan_direction():
    fwd, rev = _layer_pair()
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        y_fwd, y_rev = fwd(x), rev(x)
    assert torch.isfinite(y_fwd).all() and torch.isfinite(y_rev).all()
    assert (y_fwd - y_rev).abs().max() > 1e-3
    # the reverse layer is the forward layer applied to the flipped sequence
    torch.testing.assert_close(y_rev, fwd(x.flip(1)).flip(1).detach())

    # causality: a change at token 12 reaches only tokens >= 12 forwards, only tokens <= 12 in reverse
    x2 = x.clone()
    x2[:, 12] += 1.0
    with torch.no_grad():
        d_fwd = (fwd(x2) - y_fwd).abs().amax(dim=(0, 2))
        d_rev = (rev(x2) - y_rev).abs().amax(dim=(0, 2))
    assert d_fwd[:12].max() == 0 and d_fwd[12:].min() > 0
    assert d_rev[13:].max() == 0 and d_rev[:13].min() > 0


def test_layer_output_does_not_depend_on_chunk_size():
    fwd, _ = _layer_pair()
    x = torch.randn(2, 45, 16)
    with torch.no_grad():
        outs = []
        for chunk in (1, 8, 16, 1000):
            fwd.chunk_size = chunk
            outs.append(fwd(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=0)


def test_run_on_feature_map_uses_row_major_token_order():
    class CumSum(nn.Module):
        def forward(self, tokens):
            return tokens.cumsum(1)

    x = torch.randn(2, 3, 4, 5, 6)
    torch.testing.assert_close(run_on_feature_map(CumSum(), x), x.flatten(2).cumsum(-1).reshape(x.shape))
    torch.testing.assert_close(run_on_feature_map(nn.Identity(), x[..., 0]), x[..., 0])


def test_chunkwise_runs_a_32_cubed_feature_map_in_linear_memory():
    seq, heads, dim = 32 ** 3, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=g) * 0.5 for _ in range(3))
    i_gate = torch.randn(1, heads, seq, generator=g)
    f_gate = torch.randn(1, heads, seq, generator=g) + 5.0  # long memory, so the carried state matters
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with torch.no_grad():
        out = mlstm_chunkwise(q, k, v, i_gate, f_gate, chunk_size=64)
    elapsed = time.perf_counter() - start
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert out.shape == (1, heads, seq, dim) and torch.isfinite(out).all()
    assert elapsed < 30
    # one S x S float32 matrix per head alone would be 8 GiB; the chunkwise form needs well under 1 GiB
    assert growth_mib < 1024, f"peak RSS grew by {growth_mib:.0f} MiB"
    with torch.no_grad():
        # the prefix matches the exact quadratic form, and different chunk boundaries give the same result
        # deep into the sequence (where everything flows through the carried state)
        prefix = mlstm_parallel(q[:, :, :200], k[:, :, :200], v[:, :, :200], i_gate[..., :200], f_gate[..., :200])
        torch.testing.assert_close(out[:, :, :200], prefix, atol=1e-4, rtol=0)
        tail = slice(seq - 3000, seq)
        other = mlstm_chunkwise(q, k, v, i_gate, f_gate, chunk_size=96)
        torch.testing.assert_close(other[:, :, tail], out[:, :, tail], atol=1e-4, rtol=0)
