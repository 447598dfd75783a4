"""The RMSNorm folded into the small-M GEMMs (``KVCacheConfig.fold_norms``): ``tpfuse.small_gemm.small_m_gemm_add``
(the GEMM + residual add, the next GEMM's rows times the norm weight, partial sums of squares: kernel
``_small_m_gemm_norm_kernel`` with ADD_RES, or the split-K reduce ``_split_k_reduce_add_kernel``) and
``small_m_gemm(..., norm_sumsq=)`` (each token's sums times its rstd, NORM_IN), each against the fp64 oracle of the
unfused pair (GEMM, then add + RMSNorm, then GEMM) and the plain-torch reference
(``tpfuse.reference.small_m_gemm_add`` / ``small_m_gemm``), with poisoned outputs.
Interpreted on CPU at small shapes (N not a multiple of the tile, K tails, M 1 / 3 / 17 / 64, split-K, outliers on
the residual, bias, the SiLU*mul epilogue), compiled on a GPU at the 8B decode shapes and in a CUDA graph."""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, capture, record_launches
from tpfuse import reference, small_gemm
from tpfuse.errors import TPFuseInputError
from tpfuse.kernels import small_m_configs as smc
from tpfuse.tolerance import assert_close

BF = torch.bfloat16
ROWS = smc.SUMSQ_ROWS


def _data(gen, m, n, k, outliers=False):
    x = torch.randn(m, k, generator=gen).to(BF)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(BF)
    res = (torch.randn(m, n, generator=gen) * 2).to(BF)
    if outliers:  # a residual channel 100x the rest on the last token (real residual streams have them)
        res[m - 1, 7] = 400.0
        res[:, n - 1] *= 50.0
    return x.to(DEVICE), w.to(DEVICE), res.to(DEVICE)


def _oracle_h(x, w, res, b=None):
    """fp64 ``x @ w.T + b`` rounded to bf16 (the GEMM's output), then + residual rounded (the add's)."""
    y = x.cpu().double() @ w.cpu().double().t()
    if b is not None:
        y = y + b.cpu().double()
    return (y.to(BF).double() + res.cpu().double()).to(BF)


def _config(n, split, block_n=None):
    return smc.GemmConfig(block_n=block_n or (32 if n % 64 else 64), block_k=64, split_k=split, num_warps=4,
                          num_stages=2)


@pytest.mark.usefixtures("kernels", "poisoned_small_m")
@pytest.mark.parametrize("m,n,k,split,block_n,bias", [
    (1, 128, 96, 1, None, False), (3, 96, 256, 1, None, False), (17, 160, 256, 3, None, True),
    (64, 64, 256, 2, None, False),
    (5, 96, 128, 1, 64, True),     # a masked half tile: its partials past N / 32 are not written
    (2, 256, 64, 1, 128, False),   # four partials from one tile
    (4, 64, 64, 1, 16, False),     # tiles below 32 rows are raised to 32
])
def test_add_matches_oracle(m, n, k, split, block_n, bias, gen, kernels, monkeypatch):
    """h equals the unfused pair's residual_out (two roundings) up to the GEMM's own fp32-sum order; x_next is
    round(h * norm_weight) bit for bit; each partial sum of squares is that of the stored h over its 32 features."""
    monkeypatch.setattr(smc, "forced_config", lambda: _config(n, split, block_n))
    add = record_launches(monkeypatch, kernels.small_m_gemm, "_small_m_gemm_norm_kernel")
    red = record_launches(monkeypatch, kernels.small_m_gemm, "_split_k_reduce_add_kernel")
    x, w, res = _data(gen, m, n, k, outliers=True)
    nw = (torch.rand(n, generator=gen) + 0.5).to(BF).to(DEVICE)
    b = torch.randn(n, generator=gen).to(BF).to(DEVICE) if bias else None
    h, x_next, sumsq = small_gemm.small_m_gemm_add(x, w, res, nw, bias=b)
    assert h.shape == x_next.shape == (m, n) and h.dtype == x_next.dtype == BF
    assert sumsq.shape == (n // ROWS, m) and sumsq.dtype == torch.float32
    assert len(add.launches) == 1 and add.launches[0][0][1] == split, add.launches
    assert add.launches[0][1]["BLOCK_N"] == max(32, block_n or 0) or block_n is None, add.launches
    assert len(red.launches) == (split > 1), red.launches
    assert_close(h.cpu().float(), _oracle_h(x, w, res, b).double(), BF, f"h M={m} N={n} split={split}")
    assert torch.equal(x_next.cpu(), (h.cpu().float() * nw.cpu().float()).to(BF)), "x_next != round(h * w)"
    want = reference.sumsq_partials(h.cpu(), ROWS)
    assert torch.allclose(sumsq.cpu(), want, rtol=1e-6, atol=0), (sumsq, want)


@pytest.mark.usefixtures("kernels", "poisoned_small_m")
@pytest.mark.parametrize("m,k,split,silu", [(1, 96, 1, False), (3, 160, 2, True), (17, 128, 1, True),
                                            (64, 64, 1, False)])
def test_norm_in_matches_the_normed_gemm(m, k, split, silu, gen, kernels, monkeypatch):
    """``small_m_gemm(h * w, W, norm_sumsq=...)`` == ``RMSNorm(h) @ W.T`` (+ bias, SiLU*mul): vs the fp64 oracle of the
    exactly normed rows (bf16 tolerance: the weighted rows carry one bf16 rounding), and vs the reference (the same
    math in fp32) within half the budget; split-K scales its partials."""
    n = 96 if silu else 80
    monkeypatch.setattr(smc, "forced_config", lambda: _config(n // (2 if silu else 1), split))
    launches = record_launches(monkeypatch, kernels.small_m_gemm, "_small_m_gemm_norm_kernel")
    h = (torch.randn(m, k, generator=gen) * 3).to(BF)
    h[0, 5] = 250.0  # one outlier feature: it dominates its row's rstd
    nw = (torch.rand(k, generator=gen) + 0.5).to(BF)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(BF)
    b = torch.randn(n, generator=gen).to(BF)
    x_next = (h.float() * nw.float()).to(BF)
    sumsq = reference.sumsq_partials(h, 16)  # any partition of the features: P = k / 16 here
    eps = 1e-5
    out = small_gemm.small_m_gemm(x_next.to(DEVICE), w.to(DEVICE), bias=b.to(DEVICE), silu_mul=silu,
                                  norm_sumsq=sumsq.to(DEVICE), norm_eps=eps)
    assert len(launches.launches) == 1 and launches.launches[0][1]["NORM_IN"], launches.launches
    hd = h.double()
    xn = (hd * torch.rsqrt(hd.square().mean(1, keepdim=True) + eps)) * nw.double()
    y = xn @ w.double().t() + b.double()
    if silu:
        g, u = y.chunk(2, -1)
        y = torch.nn.functional.silu(g) * u
    assert_close(out.cpu().float(), y, BF, f"norm_in M={m} silu={silu}")
    ref = reference.small_m_gemm(x_next, w, bias=b, silu_mul=silu, norm_sumsq=sumsq, norm_eps=eps)
    assert_close(out.cpu().float(), ref.double(), BF, "vs reference", factor=0.5)


def _w8(w):
    """``(e4m3 weight, per-channel fp32 scales [N, 1], the dequantized weight in fp64)`` of a bf16 weight."""
    from tpfuse import quant as q

    ws = q.fp8_dynamic_scale(w.float().abs().amax(1, keepdim=True))
    w8 = q._fp8_cast(w.float() / ws)
    return w8, ws, w8.cpu().double() * ws.cpu().double()


def _normed_oracle(h, nw, w64, silu, eps=1e-5):
    """fp64 ``RMSNorm(h) * nw @ w64.T`` (then SiLU*mul)."""
    hd = h.cpu().double()
    y = (hd * torch.rsqrt(hd.square().mean(1, keepdim=True) + eps)) * nw.cpu().double() @ w64.t()
    if silu:
        g, u = y.chunk(2, -1)
        y = torch.nn.functional.silu(g) * u
    return y


@pytest.mark.usefixtures("kernels", "poisoned_small_m")
@pytest.mark.parametrize("m,split,silu,fma", [(1, 1, False, False), (3, 1, True, False), (17, 3, False, False),
                                               (1, 1, True, True), (3, 2, False, True)])
def test_w8_fold_matches_oracle(m, split, silu, fma, gen, kernels, monkeypatch):
    """The FP8 layers' weight-only fold: ``small_m_gemm_add`` with an e4m3 weight and per-channel scales (split-K:
    its reduce kernel scales), then the next e4m3 GEMM on its pending norm (NORM_IN, SiLU*mul), each vs the fp64
    oracle of the dequantized weights (bf16 budget) and the reference within half of it; ``fma``: both on the
    CUDA-core main loop (``small_m_gemm.FMA_MAX_M``, BLOCK_M = M rounded up to a power of two)."""
    n, k, n2 = 96, 128, 96
    monkeypatch.setattr(smc, "forced_config", lambda: _config(n, split))
    monkeypatch.setattr(kernels.small_m_gemm, "FMA_MAX_M", 4 if fma else 0)
    add = record_launches(monkeypatch, kernels.small_m_gemm, "_small_m_gemm_norm_kernel")
    x, w, res = _data(gen, m, n, k, outliers=True)
    w8, ws, w64 = _w8(w)
    nw = (torch.rand(n, generator=gen) + 0.5).to(BF).to(DEVICE)
    h, x_next, sumsq = small_gemm.small_m_gemm_add(x, w8, res, nw, w_scale=ws)
    assert add.launches and add.launches[0][1]["W_FP8"] and add.launches[0][1]["W_SCALE"] == 2, add.launches
    want_h = ((x.cpu().double() @ w64.t()).to(BF).double() + res.cpu().double()).to(BF)
    assert_close(h.cpu().float(), want_h.double(), BF, f"w8 h M={m} split={split}")
    assert torch.equal(x_next.cpu(), (h.cpu().float() * nw.cpu().float()).to(BF)), "x_next != round(h * w)"
    assert torch.allclose(sumsq.cpu(), reference.sumsq_partials(h.cpu(), ROWS), rtol=1e-6, atol=0)
    ref_h = reference.small_m_gemm_add(x.cpu(), w8.cpu(), res.cpu(), nw.cpu(), rows=ROWS, w_scale=ws.cpu())[0]
    assert_close(h.cpu().float(), ref_h.double(), BF, "w8 h vs reference", factor=0.5)
    w2_8, ws2, w2_64 = _w8((torch.randn(n2, n, generator=gen) / n ** 0.5).to(BF).to(DEVICE))
    out = small_gemm.small_m_gemm(x_next, w2_8, w_scale=ws2, silu_mul=silu, norm_sumsq=sumsq, norm_eps=1e-5)
    assert_close(out.cpu().float(), _normed_oracle(h, nw, w2_64, silu), BF, f"w8 norm_in M={m} silu={silu}")
    assert [bool(kw.get("FMA")) for _, kw in add.launches] == [fma, fma], add.launches


@pytest.mark.usefixtures("kernels")
def test_chain_equals_add_rmsnorm_then_gemm(gen):
    """o-proj with the add, then the next GEMM on its pending norm == the unfused ops (GEMM, ops.add_rmsnorm, GEMM)
    within bf16's tolerance (the rounding of the normed rows falls elsewhere): the model's fold at one layer
    boundary."""
    from tpfuse import ops

    x, w, res = _data(gen, 5, 128, 64)
    w2 = (torch.randn(48, 128, generator=gen) / 128 ** 0.5).to(BF).to(DEVICE)
    nw = (torch.rand(128, generator=gen) + 0.5).to(BF).to(DEVICE)
    h, x_next, sumsq = small_gemm.small_m_gemm_add(x, w, res, nw)
    got = small_gemm.small_m_gemm(x_next, w2, norm_sumsq=sumsq, norm_eps=1e-6)
    xn, res_out = ops.add_rmsnorm(small_gemm.small_m_gemm(x, w), res, nw, 1e-6)
    assert_close(h.cpu().float(), res_out.cpu().double(), BF, "h vs residual_out")
    assert_close(got.cpu().float(), (xn.cpu().double() @ w2.cpu().double().t()), BF, "normed GEMM vs unfused")


def _bad_calls():
    dev, f8 = DEVICE, torch.float8_e4m3fn
    x, w = torch.zeros(4, 64, dtype=BF, device=dev), torch.zeros(96, 64, dtype=BF, device=dev)
    res, nw = torch.zeros(4, 96, dtype=BF, device=dev), torch.ones(96, dtype=BF, device=dev)
    sq, s1 = torch.ones(2, 4, device=dev), torch.ones((), device=dev)
    add, mm = small_gemm.small_m_gemm_add, small_gemm.small_m_gemm
    return [
        ("multiple of 32", lambda: add(x, w[:48], res[:, :48], nw[:48])),
        ("residual must be", lambda: add(x, w, res[:3], nw)),
        ("residual must be", lambda: add(x, w, res.float(), nw)),
        ("norm_weight must be", lambda: add(x, w, res, nw[:95])),
        ("norm_weight must be", lambda: add(x, w, res, nw.float())),
        ("needs a bf16 x", lambda: mm(x.to(f8), w.to(f8), x_scale=s1, w_scale=s1, norm_sumsq=sq)),
        ("needs a bf16 x", lambda: add(x.half(), w.half(), res.half(), nw.half())),
        ("norm_sumsq must be", lambda: mm(x, w, norm_sumsq=sq[:, :3])),
        ("norm_sumsq must be", lambda: mm(x, w, norm_sumsq=sq.to(BF))),
        ("no out_scale", lambda: mm(x, w, out_scale=s1, norm_sumsq=sq)),
    ]


@pytest.mark.parametrize("match,call", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_rejects_what_the_kernel_cannot_take(match, call):
    with pytest.raises(TPFuseInputError, match=match):
        call()


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h, xn, sq = torch.ops.tpfuse.small_m_gemm_add(torch.empty(5, 64, dtype=BF), torch.empty(96, 64, dtype=BF),
                                                      torch.empty(5, 96, dtype=BF), torch.empty(96, dtype=BF), None)
        out = torch.ops.tpfuse.small_m_gemm(torch.empty(5, 64, dtype=BF), torch.empty(96, 64, dtype=BF), None, None,
                                            None, None, True, None, torch.empty(2, 5), 1e-6)
    assert (h.shape, h.dtype, xn.shape, xn.dtype) == ((5, 96), BF, (5, 96), BF)
    assert (sq.shape, sq.dtype) == ((3, 5), torch.float32)
    assert (out.shape, out.dtype) == ((5, 48), BF)


def test_traces_under_torch_compile(gen):
    """Both ops as custom ops in one fullgraph trace (their fake impls give the shapes): the compiled chain equals
    the eager one."""
    x, w, res = _data(gen, 3, 64, 32)
    w2 = (torch.randn(32, 64, generator=gen) / 8).to(BF).to(DEVICE)
    nw = (torch.rand(64, generator=gen) + 0.5).to(BF).to(DEVICE)

    def chain(x, w, res, w2, nw):
        h, x_next, sumsq = small_gemm.small_m_gemm_add(x, w, res, nw)
        return h, small_gemm.small_m_gemm(x_next, w2, norm_sumsq=sumsq, norm_eps=1e-5)

    torch._dynamo.reset()
    got = torch.compile(chain, fullgraph=True, backend="aot_eager")(x, w, res, w2, nw)
    want = chain(x, w, res, w2, nw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    @pytest.mark.parametrize("m", [1, 8, 64])
    def test_llama_8b_layer_boundaries(self, m, gen):
        """The 8B's o-proj and down-proj with the add (table or default configs, split-K where they take it), then
        qkv and gate-up + SiLU*mul on the pending norm, each vs the unfused ops."""
        from tpfuse import ops

        for n, k, n2 in ((4096, 4096, 6144), (4096, 14336, 28672)):
            x, w, res = _data(gen, m, n, k, outliers=True)
            nw = (torch.rand(n, generator=gen) + 0.5).to(BF).to(DEVICE)
            h, x_next, sumsq = small_gemm.small_m_gemm_add(x, w, res, nw)
            assert_close(h.float().cpu(), _oracle_h(x, w, res).double(), BF, f"h M={m} K={k}")
            assert torch.equal(x_next, (h.float() * nw.float()).to(BF))
            w2 = (torch.randn(n2, n, generator=gen) / n ** 0.5).to(BF).to(DEVICE)
            silu = n2 == 28672
            got = small_gemm.small_m_gemm(x_next, w2, silu_mul=silu, norm_sumsq=sumsq, norm_eps=1e-5)
            xn, _ = ops.add_rmsnorm(h, None, nw, 1e-5)
            want = reference.small_m_gemm(xn.cpu(), w2.cpu(), silu_mul=silu)
            assert_close(got.float().cpu(), want.double(), BF, f"normed GEMM M={m} N={n2}")

    @pytest.mark.parametrize("m", [1, 8, 64])
    def test_w8_llama_8b_layer_boundaries(self, m, gen):
        """The same with e4m3 weights and per-channel scales (the FP8 layers' weight-only fold), vs the fp64 oracle
        of the dequantized weights."""
        for n, k, n2 in ((4096, 4096, 6144), (4096, 14336, 28672)):
            x, w, res = _data(gen, m, n, k, outliers=True)
            w8, ws, w64 = _w8(w)
            nw = (torch.rand(n, generator=gen) + 0.5).to(BF).to(DEVICE)
            h, x_next, sumsq = small_gemm.small_m_gemm_add(x, w8, res, nw, w_scale=ws)
            want_h = ((x.cpu().double() @ w64.t()).to(BF).double() + res.cpu().double()).to(BF)
            assert_close(h.float().cpu(), want_h.double(), BF, f"w8 h M={m} K={k}")
            assert torch.equal(x_next, (h.float() * nw.float()).to(BF))
            w2_8, ws2, w2_64 = _w8((torch.randn(n2, n, generator=gen) / n ** 0.5).to(BF).to(DEVICE))
            silu = n2 == 28672
            got = small_gemm.small_m_gemm(x_next, w2_8, w_scale=ws2, silu_mul=silu, norm_sumsq=sumsq, norm_eps=1e-5)
            assert_close(got.float().cpu(), _normed_oracle(h, nw, w2_64, silu), BF, f"w8 normed GEMM M={m} N={n2}")

    def test_cuda_graph_replays(self, gen):
        """Both ops captured in one graph: replays with new inputs give the eager results bit for bit."""
        x, w, res = _data(gen, 4, 4096, 4096)
        nw = (torch.rand(4096, generator=gen) + 0.5).to(BF).to(DEVICE)
        w2 = (torch.randn(6144, 4096, generator=gen) / 64).to(BF).to(DEVICE)

        def step():
            h, x_next, sumsq = small_gemm.small_m_gemm_add(x, w, res, nw)
            return h, small_gemm.small_m_gemm(x_next, w2, norm_sumsq=sumsq)

        graph, (h_g, out_g) = capture(step)
        for _ in range(3):
            x.copy_(_data(gen, 4, 4096, 4096)[0])
            graph.replay()
            torch.cuda.synchronize()
            h_e, out_e = step()
            assert torch.equal(h_g, h_e) and torch.equal(out_g, out_e)
