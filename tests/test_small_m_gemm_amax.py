"""Per-token FP8 quantization across two small-M GEMMs: ``tpfuse.small_gemm.small_m_gemm_amax`` (the GEMM, a 16-bit
output and its partial maxima of ``|out|`` per 32 features: ``_small_m_gemm_norm_kernel`` with AMAX_OUT) and
``small_m_gemm(h, W_e4m3, w_scale=, x_amax=)`` (h quantized per token on load: X_DYN).

The oracle of X_DYN is the unfused pair it replaces, bit for bit: the standalone per-token quantizer
(``tpfuse.ops.quantize``, itself bit-exact to ``tpfuse.quant``), then the e4m3 GEMM with its scales; the partial
maxima are those of the stored output exactly (``tpfuse.reference.amax_partials``). Interpreted on CPU at small
shapes (N not a multiple of the tile, K tails, M 1 / 3 / 17 / 64, a split-K config, outliers and a NaN on a non-zero
row), compiled on a GPU at the 8B's gate-up / down shapes and in a CUDA graph."""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, capture, record_launches
from tpfuse import ops, reference, small_gemm
from tpfuse import quant as q
from tpfuse.errors import TPFuseInputError
from tpfuse.kernels import small_m_configs as smc
from tpfuse.tolerance import REL_ERR_FP8, assert_close, rel_err

BF, F8 = torch.bfloat16, q.FP8_DTYPE
ROWS = smc.SUMSQ_ROWS


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as NaN: unwritten elements show (out through alloc_out, the partial maxima through
    torch.empty)."""
    alloc, empty = small_gemm.alloc_out, torch.empty

    def poisoned_alloc(*args):
        return alloc(*args).fill_(float("nan"))

    def poisoned_empty(*args, **kw):
        t = empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(small_gemm, "alloc_out", poisoned_alloc)
    monkeypatch.setattr(small_gemm.torch, "empty", poisoned_empty)


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


def _unfused(h, w8, ws):
    """The pair X_DYN replaces: the per-token quantize kernel, then the e4m3 GEMM."""
    a = ops.quantize(h, q.FP8PerToken())
    return small_gemm.small_m_gemm(a.data, w8, x_scale=a.scale, w_scale=ws)


@pytest.mark.usefixtures("kernels", "poisoned")
@pytest.mark.parametrize("m,n,k,split,block_n", [
    (1, 96, 64, 1, None), (3, 128, 96, 1, None), (17, 64, 160, 1, None), (64, 96, 128, 1, None),
    (5, 96, 128, 3, None),   # a split-K config: X_DYN launches at split 1
    (2, 96, 64, 1, 64),      # a masked half tile
])
def test_x_amax_equals_quantize_then_gemm(m, n, k, split, block_n, gen, kernels, monkeypatch):
    """``small_m_gemm(h, W, w_scale, x_amax=amax_partials(h))`` == quantize(h, per token) then the e4m3 GEMM, bit
    for bit (the same e4m3 x, the same K loop, the same epilogue order); the partials may partition the features
    any way (16 here where K allows)."""
    monkeypatch.setattr(smc, "forced_config", lambda: _config(n, split, block_n))
    dyn = record_launches(monkeypatch, kernels.small_m_gemm, "_small_m_gemm_norm_kernel")
    h = _activation(gen, m, k)
    w8, ws = _weight(gen, n, k)
    amax = reference.amax_partials(h.cpu(), 16).to(DEVICE)
    got = small_gemm.small_m_gemm(h, w8, w_scale=ws, x_amax=amax)
    assert len(dyn.launches) == 1 and dyn.launches[0][1]["X_DYN"] and dyn.launches[0][0][1] == 1, dyn.launches
    want = _unfused(h, w8, ws)
    assert got.dtype == BF and got.shape == (m, n)
    assert torch.equal(got.cpu(), want.cpu()), (got - want).abs().max()
    ref = reference.small_m_gemm(h.cpu(), w8.cpu(), w_scale=ws.cpu(), x_amax=amax.cpu())
    assert_close(got.cpu().float(), ref.double(), BF, f"x_amax M={m} vs reference", factor=2.0)


@pytest.mark.usefixtures("kernels", "poisoned")
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


@pytest.mark.usefixtures("kernels", "poisoned")
def test_nan_stays_in_its_token(gen):
    """A NaN in token 1 of h: its partial maxima and its output row are NaN, every other token's are finite."""
    h = _activation(gen, 3, 64)
    h[1, 10] = float("nan")
    w8, ws = _weight(gen, 32, 64)
    amax = reference.amax_partials(h.cpu(), ROWS)
    assert bool(amax[:, 1].isnan().any()) and not bool(amax[:, [0, 2]].isnan().any())
    got = small_gemm.small_m_gemm(h, w8, w_scale=ws, x_amax=amax.to(DEVICE)).cpu()
    assert bool(got[1].isnan().all()) and bool(got[[0, 2]].isfinite().all())
    w16 = torch.eye(32, 64, dtype=BF, device=DEVICE)
    out, part = small_gemm.small_m_gemm_amax(h, w16)
    assert bool(part[:, 1].isnan().any()) and bool(part[:, [0, 2]].isfinite().all())


@pytest.mark.usefixtures("kernels")
def test_chain_equals_silu_quantize_then_gemm(gen):
    """The FP8 layer's gate-up -> down with the per-token quantization carried across: gate-up + SiLU*mul with its
    partial maxima, then down quantizing on load == the same gate-up, the quantize kernel, then down (bit for
    bit); and within e4m3's tolerance of the fp64 GEMM of the bf16 h."""
    k, inter, n = 64, 96, 64
    x = ops.quantize(_activation(gen, 4, k), q.FP8PerToken())
    wgu, wsgu = _weight(gen, 2 * inter, k)
    wd, wsd = _weight(gen, n, inter)
    h, amax = small_gemm.small_m_gemm_amax(x.data, wgu, x_scale=x.scale, w_scale=wsgu, silu_mul=True)
    got = small_gemm.small_m_gemm(h, wd, w_scale=wsd, x_amax=amax)
    assert torch.equal(got.cpu(), _unfused(h, wd, wsd).cpu())
    exact = h.cpu().double() @ (wd.cpu().double() * wsd.cpu().double()).t()
    assert rel_err(got.cpu().float(), exact) <= REL_ERR_FP8, "down of the e4m3 h vs of the bf16 h"


def _bad_calls():
    dev = DEVICE
    x, w = torch.zeros(4, 64, dtype=BF, device=dev), torch.zeros(96, 64, dtype=BF, device=dev)
    w8, ws, s1 = w.to(F8), torch.ones(96, 1, device=dev), torch.ones((), device=dev)
    amax = torch.ones(2, 4, device=dev)
    mm, amx = small_gemm.small_m_gemm, small_gemm.small_m_gemm_amax
    return [
        ("needs a bf16/fp16 x", lambda: mm(x.to(F8), w8, x_scale=s1, w_scale=ws, x_amax=amax)),
        ("needs a bf16/fp16 x", lambda: mm(x, w, x_amax=amax)),
        ("takes no x_scale", lambda: mm(x, w8, w_scale=ws, x_amax=amax, out_scale=s1)),
        ("x_amax must be", lambda: mm(x, w8, w_scale=ws, x_amax=amax[:, :3])),
        ("x_amax must be", lambda: mm(x, w8, w_scale=ws, x_amax=amax.to(BF))),
        ("multiple of 32", lambda: amx(x, w[:48])),
        ("multiple of 32", lambda: amx(x.to(F8), w8, x_scale=s1, w_scale=ws, silu_mul=True)),  # I = 48
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
        y = torch.ops.tpfuse.small_m_gemm(torch.empty(5, 96, dtype=BF), torch.empty(64, 96, dtype=F8), None,
                                          torch.empty(64, 1), None, None, False, None, None, 0.0,
                                          torch.empty(3, 5))
    assert (out.shape, out.dtype, amax.shape, amax.dtype) == ((5, 96), BF, (3, 5), torch.float32)
    assert (y.shape, y.dtype) == ((5, 64), BF)


def test_traces_under_torch_compile(gen):
    """Both ops as custom ops in one fullgraph trace: the compiled chain equals the eager one."""
    x = ops.quantize(_activation(gen, 3, 64), q.FP8PerToken())
    wgu, wsgu = _weight(gen, 128, 64)
    wd, wsd = _weight(gen, 32, 64)

    def chain(xd, xs, wgu, wsgu, wd, wsd):
        h, amax = small_gemm.small_m_gemm_amax(xd, wgu, x_scale=xs, w_scale=wsgu, silu_mul=True)
        return small_gemm.small_m_gemm(h, wd, w_scale=wsd, x_amax=amax)

    torch._dynamo.reset()
    args = (x.data, x.scale, wgu, wsgu, wd, wsd)
    got = torch.compile(chain, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(got, chain(*args))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    @pytest.mark.parametrize("m", [1, 8, 16, 64])
    def test_llama_8b_gate_up_down(self, m, gen):
        """The 8B's FP8 gate-up (+ SiLU*mul, partial maxima) and down (quantizing on load) at their table or default
        configs == gate-up, the quantize kernel, down; the partial maxima those of the stored h."""
        x = ops.quantize(_activation(gen, m, 4096), q.FP8PerToken())
        wgu, wsgu = _weight(gen, 28672, 4096)
        wd, wsd = _weight(gen, 4096, 14336)
        h, amax = small_gemm.small_m_gemm_amax(x.data, wgu, x_scale=x.scale, w_scale=wsgu, silu_mul=True)
        assert torch.equal(h, small_gemm.small_m_gemm(x.data, wgu, x_scale=x.scale, w_scale=wsgu, silu_mul=True))
        assert torch.equal(amax.cpu(), reference.amax_partials(h.cpu(), ROWS))
        got = small_gemm.small_m_gemm(h, wd, w_scale=wsd, x_amax=amax)
        assert torch.equal(got, _unfused(h, wd, wsd)), (got.float() - _unfused(h, wd, wsd).float()).abs().max()

    def test_cuda_graph_replays(self, gen):
        """Both ops captured in one graph: replays with new inputs give the eager results bit for bit."""
        x = ops.quantize(_activation(gen, 4, 4096), q.FP8PerToken())
        wgu, wsgu = _weight(gen, 28672, 4096)
        wd, wsd = _weight(gen, 4096, 14336)

        def step():
            h, amax = small_gemm.small_m_gemm_amax(x.data, wgu, x_scale=x.scale, w_scale=wsgu, silu_mul=True)
            return small_gemm.small_m_gemm(h, wd, w_scale=wsd, x_amax=amax)

        graph, out_g = capture(step)
        for _ in range(3):
            new = ops.quantize(_activation(gen, 4, 4096), q.FP8PerToken())
            x.data.copy_(new.data)
            x.scale.copy_(new.scale)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out_g, step())
