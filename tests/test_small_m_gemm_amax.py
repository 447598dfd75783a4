"""The FP8 layers' per-token quantization of gate-up + SiLU*mul's output from partial maxima:
``tpfuse.small_gemm.small_m_gemm_amax`` (the GEMM, a 16-bit output and its partial maxima of ``|out|`` per 32
features: ``_small_m_gemm_norm_kernel`` with AMAX_OUT) and ``tpfuse.ops.quantize_from_amax`` (per-token FP8 from
those partials, many programs a row: ``_quantize_amax_kernel``).

Oracles: the amax op's output is the plain op's bit for bit and its partials are those of the stored output
exactly (``tpfuse.reference.amax_partials``); ``quantize_from_amax`` gives the bytes and scales of the per-token
quantizer (``tpfuse.ops.quantize`` / ``tpfuse.quant``) with exact partials, any partition of the features.
Interpreted on CPU at small shapes (N not a multiple of the tile, K tails, M 1 / 3 / 17 / 64, a split-K config,
outliers and a NaN on a non-zero row), compiled on a GPU at the 8B's gate-up shape and in a CUDA graph."""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, capture, record_launches
from tpfuse import ops, reference, small_gemm
from tpfuse import quant as q
from tpfuse.errors import TPFuseInputError
from tpfuse.kernels import small_m_configs as smc
from tpfuse.tolerance import REL_ERR_FP8, rel_err

BF, F8 = torch.bfloat16, q.FP8_DTYPE
ROWS = smc.SUMSQ_ROWS


def _weight(gen, n, k):
    """An e4m3 weight with per-channel scales (``[N, 1]``, as the FP8 layers hold them) and a 50x channel."""
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    w[1] *= 50.0
    ws = q.fp8_dynamic_scale(w.abs().amax(1, keepdim=True))
    return q._fp8_cast(w / ws).to(DEVICE), ws.to(DEVICE)


def _activation(gen, m, k):
    """bf16 rows with outliers on the last token (real activations have a few channels far above the rest)."""
    h = (torch.randn(m, k, generator=gen) * 2).to(BF)
    h[m - 1, 3] = 300.0
    h[:, k - 1] *= 40.0
    return h.to(DEVICE)


def _config(n, split=1, block_n=None):
    return smc.GemmConfig(block_n=block_n or (32 if n % 64 else 64), block_k=64, split_k=split, num_warps=4,
                          num_stages=2)


def _same_quant(a, b, what):
    """Two per-token FP8 activations with the same bytes and the same scales."""
    assert torch.equal(a.data.view(torch.uint8).cpu(), b.data.view(torch.uint8).cpu()), what
    assert torch.equal(a.scale.reshape(-1).cpu(), b.scale.reshape(-1).cpu()), what


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("t,h,rows", [(1, 96, 32), (3, 2048 + 96, 32), (17, 160, 16), (64, 64, 64), (5, 2048, 8)])
def test_quantize_from_amax_equals_the_per_token_quantizer(t, h, rows, gen, kernels, monkeypatch):
    """With exact partial maxima (any group size), the bytes and scales of ``quantize(x, FP8PerToken())``; the row
    spread over cdiv(H, AMAX_BLOCK) programs (a row longer than one program's tile, and a masked last tile)."""
    launches = record_launches(monkeypatch, kernels.quantize, "_quantize_amax_kernel")
    x = _activation(gen, t, h)
    amax = reference.amax_partials(x.cpu(), rows).to(DEVICE)
    got = ops.quantize_from_amax(x, amax)
    assert got.data.dtype == F8 and got.scale.shape == (t, 1) and type(got.spec) is q.FP8PerToken
    _same_quant(got, ops.quantize(x, q.FP8PerToken()), f"T={t} H={h}")
    assert [tuple(g) for g, *_ in launches.launches] == [(-(-h // kernels.quantize.AMAX_BLOCK), t)], launches.launches
    ref_data, ref_scale = reference.quantize_from_amax(x.cpu(), amax.cpu())
    assert torch.equal(got.data.view(torch.uint8).cpu(), ref_data.view(torch.uint8))


@pytest.mark.usefixtures("kernels")
def test_quantize_from_amax_follows_its_partials(gen):
    """The scale is the partials' (not the row's own) maximum: larger partials give the larger scale exactly, as
    the reference; a NaN partial makes that token's scale and bytes NaN only."""
    x = _activation(gen, 3, 128)
    amax = reference.amax_partials(x.cpu(), 32)
    amax[2, 1] = 1000.0
    amax[0, 2] = float("nan")
    got = ops.quantize_from_amax(x, amax.to(DEVICE))
    ref_data, ref_scale = reference.quantize_from_amax(x.cpu(), amax)
    assert float(got.scale[1]) == float(ref_scale[1]) == float(torch.tensor(1000.0) / 448.0)
    assert torch.equal(got.data.view(torch.uint8).cpu()[:2], ref_data.view(torch.uint8)[:2])
    assert bool(got.scale[2].isnan()) and bool(got.data[2].float().isnan().all())
    assert bool(got.scale[:2].isfinite().all())


@pytest.mark.usefixtures("kernels", "poisoned_small_m")
@pytest.mark.parametrize("m,n,k,silu,block_n,split", [
    (1, 96, 64, False, None, 1), (3, 64, 96, True, None, 1), (17, 160, 128, False, None, 2),
    (64, 64, 64, True, None, 1),
    (5, 96, 128, False, 64, 1),   # a masked half tile: partials past N / 32 are not written
    (2, 256, 64, False, 128, 1),  # four partials from one tile
    (4, 64, 64, False, 16, 1),    # tiles below 32 rows are raised to 32
])
def test_amax_out_is_the_stored_outputs(m, n, k, silu, block_n, split, gen, kernels, monkeypatch):
    """``small_m_gemm_amax`` stores the plain op's output bit for bit and, per token, the max |out| of each 32
    features of it exactly; e4m3 x and weight (the FP8 gate-up) with SiLU*mul and without."""
    n_out = n // 2 if silu else n
    monkeypatch.setattr(smc, "forced_config", lambda: _config(n_out, split, block_n))
    amx = record_launches(monkeypatch, kernels.small_m_gemm, "_small_m_gemm_norm_kernel")
    x = _activation(gen, m, k)
    a = ops.quantize(x, q.FP8PerToken())
    w8, ws = _weight(gen, n, k)
    b = torch.randn(n, generator=gen).to(BF).to(DEVICE)
    out, amax = small_gemm.small_m_gemm_amax(a.data, w8, x_scale=a.scale, w_scale=ws, bias=b, silu_mul=silu)
    assert len(amx.launches) == 1 and amx.launches[0][1]["AMAX_OUT"] and amx.launches[0][0][1] == 1
    assert amx.launches[0][1]["BLOCK_N"] >= ROWS
    plain = small_gemm.small_m_gemm(a.data, w8, x_scale=a.scale, w_scale=ws, bias=b, silu_mul=silu)
    assert out.shape == (m, n_out) and amax.shape == (n_out // ROWS, m) and amax.dtype == torch.float32
    assert torch.equal(out.cpu(), plain.cpu())
    assert torch.equal(amax.cpu(), reference.amax_partials(out.cpu(), ROWS))


@pytest.mark.usefixtures("kernels", "poisoned_small_m")
def test_nan_stays_in_its_token(gen):
    """A NaN in token 1 of the GEMM's input: its partial maxima are NaN, every other token's finite."""
    h = _activation(gen, 3, 64)
    h[1, 10] = float("nan")
    w16 = torch.eye(32, 64, dtype=BF, device=DEVICE)
    out, part = small_gemm.small_m_gemm_amax(h, w16)
    assert bool(part[:, 1].isnan().any()) and bool(part[:, [0, 2]].isfinite().all())


@pytest.mark.usefixtures("kernels")
def test_chain_equals_gate_up_then_the_per_token_quantizer(gen):
    """The FP8 layer's gate-up + SiLU*mul with its partial maxima, then quantize_from_amax == the same gate-up, then
    the per-token quantizer of its output (bytes and scales); the quantized h within e4m3's budget of the bf16 h."""
    k, inter = 64, 96
    x = ops.quantize(_activation(gen, 4, k), q.FP8PerToken())
    wgu, wsgu = _weight(gen, 2 * inter, k)
    h, amax = small_gemm.small_m_gemm_amax(x.data, wgu, x_scale=x.scale, w_scale=wsgu, silu_mul=True)
    got = ops.quantize_from_amax(h, amax)
    _same_quant(got, ops.quantize(h, q.FP8PerToken()), "chain")
    assert rel_err(got.dequantize().cpu(), h.cpu().double()) <= REL_ERR_FP8


def _bad_calls():
    dev = DEVICE
    x, w = torch.zeros(4, 64, dtype=BF, device=dev), torch.zeros(96, 64, dtype=BF, device=dev)
    w8, ws, s1 = w.to(F8), torch.ones(96, 1, device=dev), torch.ones((), device=dev)
    amax = torch.ones(2, 4, device=dev)
    amx, qa = small_gemm.small_m_gemm_amax, ops.quantize_from_amax
    return [
        ("multiple of 32", lambda: amx(x, w[:48])),
        ("multiple of 32", lambda: amx(x.to(F8), w8, x_scale=s1, w_scale=ws, silu_mul=True)),  # I = 48
        ("bf16/fp16", lambda: qa(x.float(), amax)),
        ("bf16/fp16", lambda: qa(x[0], amax)),
        ("x_amax must be", lambda: qa(x, amax[:, :3])),
        ("x_amax must be", lambda: qa(x, amax.to(BF))),
        ("x_amax must be", lambda: qa(x, amax.t().contiguous().t())),
    ]


@pytest.mark.parametrize("match,call", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_rejects_what_the_kernel_cannot_take(match, call):
    with pytest.raises(TPFuseInputError, match=match):
        call()


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out, amax = torch.ops.tpfuse.small_m_gemm_amax(torch.empty(5, 64, dtype=F8), torch.empty(192, 64, dtype=F8),
                                                       torch.empty(5, 1), torch.empty(192, 1), None, True)
        data, scale = torch.ops.tpfuse.quantize_from_amax(torch.empty(5, 96, dtype=BF), torch.empty(3, 5))
    assert (out.shape, out.dtype, amax.shape, amax.dtype) == ((5, 96), BF, (3, 5), torch.float32)
    assert (data.shape, data.dtype, scale.shape, scale.dtype) == ((5, 96), F8, (5, 1), torch.float32)


def test_traces_under_torch_compile(gen):
    """Both ops as custom ops in one fullgraph trace: the compiled chain equals the eager one."""
    x = ops.quantize(_activation(gen, 3, 64), q.FP8PerToken())
    wgu, wsgu = _weight(gen, 128, 64)
    wd, wsd = _weight(gen, 32, 64)

    def chain(xd, xs, wgu, wsgu, wd, wsd):
        h, amax = small_gemm.small_m_gemm_amax(xd, wgu, x_scale=xs, w_scale=wsgu, silu_mul=True)
        a = ops.quantize_from_amax(h, amax)
        return small_gemm.small_m_gemm(a.data, wd, x_scale=a.scale, w_scale=wsd)

    torch._dynamo.reset()
    args = (x.data, x.scale, wgu, wsgu, wd, wsd)
    got = torch.compile(chain, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(got, chain(*args))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    @pytest.mark.parametrize("m", [1, 8, 16, 64])
    def test_llama_8b_gate_up_then_quantize(self, m, gen):
        """The 8B's FP8 gate-up (+ SiLU*mul, partial maxima) at its table or proxy config == the plain op bit for
        bit, its partial maxima those of the stored h, and quantize_from_amax == the per-token quantizer of h."""
        x = ops.quantize(_activation(gen, m, 4096), q.FP8PerToken())
        wgu, wsgu = _weight(gen, 28672, 4096)
        h, amax = small_gemm.small_m_gemm_amax(x.data, wgu, x_scale=x.scale, w_scale=wsgu, silu_mul=True)
        assert torch.equal(h, small_gemm.small_m_gemm(x.data, wgu, x_scale=x.scale, w_scale=wsgu, silu_mul=True))
        assert torch.equal(amax.cpu(), reference.amax_partials(h.cpu(), ROWS))
        _same_quant(ops.quantize_from_amax(h, amax), ops.quantize(h, q.FP8PerToken()), f"M={m}")

    def test_cuda_graph_replays(self, gen):
        """Gate-up with its partial maxima, quantize_from_amax and down captured in one graph: replays with new
        inputs give the eager results bit for bit."""
        x = ops.quantize(_activation(gen, 4, 4096), q.FP8PerToken())
        wgu, wsgu = _weight(gen, 28672, 4096)
        wd, wsd = _weight(gen, 4096, 14336)

        def step():
            h, amax = small_gemm.small_m_gemm_amax(x.data, wgu, x_scale=x.scale, w_scale=wsgu, silu_mul=True)
            a = ops.quantize_from_amax(h, amax)
            return small_gemm.small_m_gemm(a.data, wd, x_scale=a.scale, w_scale=wsd)

        graph, out_g = capture(step)
        for _ in range(3):
            new = ops.quantize(_activation(gen, 4, 4096), q.FP8PerToken())
            x.data.copy_(new.data)
            x.scale.copy_(new.scale)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out_g, step())
