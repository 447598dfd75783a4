"""The small-M GEMM (``kernels/small_m_gemm.py`` through ``tpfuse.small_gemm.small_m_gemm``) against the fp64 oracle
and the plain-torch reference (``tpfuse.reference.small_m_gemm``: fp32 math, rounded once), with poisoned outputs.
Compiled on a GPU; through the Triton interpreter on CPU (the ``kernels`` fixture, tests/kernel_env.py), at small
shapes: N and K odd multiples of 16 (masked N tiles and K tails), M 1 / 3 / 16 / 33 / 64, every operand scheme,
bias, the fused SiLU*mul epilogue (bf16 and static-FP8 outputs), split-K, outliers, NaN, strided x, and the calls
the kernel cannot take. Also the launch table (tpfuse.kernels.small_m_configs): buckets, lookup, routing."""

import dataclasses
import json
import os

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, record_launches
from tpfuse import quant as q
from tpfuse import reference, small_gemm
from tpfuse.errors import TPFuseInputError
from tpfuse.kernels import small_m_configs as smc
from tpfuse.tolerance import assert_close, assert_quant_close

FP8 = q.FP8_DTYPE
SCHEMES = ("bf16", "fp16", "w8", "fp8_row", "fp8_tensor")
ARCH = small_gemm.device_info(torch.device(DEVICE))[0]


@pytest.fixture
def poisoned_out(monkeypatch):
    """Every output the op allocates starts as 0xFF bytes (NaN in bf16 / fp16 / e4m3): unwritten elements show."""
    alloc = small_gemm.alloc_out

    def poisoned(*args):
        t = alloc(*args)
        t.view(torch.uint8).fill_(0xFF)
        return t

    monkeypatch.setattr(small_gemm, "alloc_out", poisoned)


def _fp8(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q._fp8_cast(t / scale)


def operands(gen, scheme, m, n, k, *, outliers=False, bias=False):
    """``(x, w, x_scale, w_scale, bias)`` on DEVICE for one scheme; FP8 scales are the amax rule of tpfuse.quant."""
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    if outliers:  # a few channels / tokens 100x the rest, as activations and weights of real checkpoints have
        x[:, 3] *= 100.0
        x[m // 2, k - 1] = 300.0
        w[1] *= 50.0
        w[n - 1, 5] = 40.0
    b = torch.randn(n, generator=gen).to(torch.bfloat16).to(DEVICE) if bias else None
    if scheme in ("bf16", "fp16"):
        dt = torch.bfloat16 if scheme == "bf16" else torch.float16
        return x.to(dt).to(DEVICE), w.to(dt).to(DEVICE), None, None, b
    row = scheme in ("w8", "fp8_row")
    ws = q.fp8_dynamic_scale(w.abs().amax(1, keepdim=True) if row else w.abs().amax())
    w8 = _fp8(w, ws).to(DEVICE)
    if scheme == "w8":
        return x.to(torch.bfloat16).to(DEVICE), w8, None, ws.to(DEVICE), b
    xs = q.fp8_dynamic_scale(x.abs().amax(1, keepdim=True) if row else x.abs().amax())
    return _fp8(x, xs).to(DEVICE), w8, xs.to(DEVICE), ws.to(DEVICE), b


def oracle(x, w, xs, ws, b, silu=False):
    """fp64 ``(x * xs) @ (w * ws).T + b`` (SiLU*mul of the halves) of the exact operand values."""
    def deq(t, s):
        t = t.cpu().double()
        if s is None:
            return t
        per_tensor = s.dim() <= 1 and s.numel() == 1
        return t * s.cpu().double().reshape(() if per_tensor else (-1, 1))

    y = deq(x, xs) @ deq(w, ws).t()
    if b is not None:
        y = y + b.cpu().double()
    if silu:
        g, u = y.chunk(2, -1)
        y = torch.nn.functional.silu(g) * u
    return y


FP8_MMA_REL_ERR = 2.0 ** -12  # of sum_k |x w|: Hopper's FP8 tensor cores keep ~14 bits of each sum, 4x margin


def fp8_mma_slack(x, w, xs, ws, silu):
    """Per-element bound of the FP8 tensor cores' accumulation error (e4m3 x and W only; 0 elsewhere): within a
    128-K chunk the MMA keeps about 14 bits of its sum, not fp32 (``torch._scaled_mm`` alike), so an output that
    cancels (``|y|`` far below ``sum_k |x w|``) carries an error far above fp32's. SiLU*mul propagates it:
    ``|silu(g)| * e_u + |u| * max|silu'| * e_g`` (``|silu'| <= 1.1``)."""
    if x.dtype != FP8:
        return None
    absolute = lambda t: t.float().abs().to(t.dtype)  # noqa: E731 - exact for e4m3 (a sign bit)
    absum = oracle(absolute(x), absolute(w), xs.abs(), ws.abs(), None) * FP8_MMA_REL_ERR
    if not silu:
        return absum
    y = oracle(x, w, xs, ws, None)
    g, u = y.chunk(2, -1)
    e_g, e_u = absum.chunk(2, -1)
    return torch.nn.functional.silu(g).abs() * e_u + u.abs() * 1.1 * e_g


def test_fp8_mma_slack_only_where_x_is_fp8(gen):
    """The accumulation slack is for FP8 dots only: 16-bit x (an e4m3 weight converted in registers) gets none."""
    for scheme in ("bf16", "w8"):
        x, w, xs, ws, _ = operands(gen, scheme, 3, 16, 32)
        assert fp8_mma_slack(x, w, xs, ws, silu=False) is None, scheme
    x, w, xs, ws, _ = operands(gen, "fp8_row", 3, 16, 32)
    slack = fp8_mma_slack(x, w, xs, ws, silu=False)
    assert slack.shape == (3, 16) and bool((slack > 0).all())
    # a small fraction of the output's scale: far below one e4m3 step of a typical element
    assert float(slack.max()) < 1e-2 * float(oracle(x, w, xs, ws, None).abs().max())


def run(x, w, xs, ws, b, **kw):
    return small_gemm.small_m_gemm(x, w, x_scale=xs, w_scale=ws, bias=b, **kw)


def check(out, ops, what, silu=False, out_scale=None):
    """``out`` vs the fp64 oracle (tolerance of its dtype) and vs the reference (half that budget)."""
    x, w, xs, ws, b = ops
    ref = reference.small_m_gemm(x.cpu(), w.cpu(), None if xs is None else xs.cpu(), None if ws is None else ws.cpu(),
                                 None if b is None else b.cpu(), silu_mul=silu,
                                 out_scale=None if out_scale is None else out_scale.cpu())
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, out.dtype, ref.shape, ref.dtype)
    o = oracle(x, w, xs, ws, b, silu)
    if out_scale is not None:
        spec = q.FP8Static(out_scale.cpu())
        assert_quant_close(q.QuantizedActivation(out.cpu(), out_scale.cpu(), spec, torch.bfloat16, out.shape), o, what,
                           value_atol=fp8_mma_slack(x, w, xs, ws, silu))
        return
    assert_close(out.cpu().float(), o, out.dtype, what)
    assert_close(out.cpu().float(), ref.float(), out.dtype, what + " vs reference", factor=0.5)


# --------------------------------------------------------------------------------------------------------------
# numerics


@pytest.mark.usefixtures("kernels", "poisoned_out")
@pytest.mark.parametrize("m", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_oracle(scheme, m, gen):
    n, k = 48, 208  # 3 and 13 x 16: a masked N tile, a masked K tail
    ops = operands(gen, scheme, m, n, k, bias=m % 2 == 1)
    check(run(*ops), ops, f"{scheme} M={m}")


@pytest.mark.usefixtures("poisoned_out")
@pytest.mark.parametrize("m,silu,bias,outliers", [(1, False, True, False), (1, True, False, True),
                                                  (2, True, True, False), (3, False, False, True),
                                                  (4, False, True, False)])
def test_w8_fma_main_loop_matches_oracle(m, silu, bias, outliers, gen, kernels, monkeypatch):
    """``small_m_gemm.FMA_MAX_M``: weight-only launches (e4m3 weight, bf16 x) of at most that many rows run the
    CUDA-core main loop with ``fma_config``'s tiles (split-K on this small grid: serial, the last program's reduce at
    BLOCK_M = M; at M = 3 the reduce kernel) - the same sums as the oracle, a K tail, SiLU*mul, bias, outliers; one
    row more takes the MMA loop."""
    smg = kernels.small_m_gemm
    monkeypatch.setattr(smg, "FMA_MAX_M", 4)
    monkeypatch.setattr(smg, "SERIAL", m != 3)
    launches = []
    record_launches(monkeypatch, smg, "_small_m_gemm_kernel", launches)
    record_launches(monkeypatch, smg, "_small_m_gemm_serial_kernel", launches)  # split-K, serial (the default)
    n, k = (96, 528) if silu else (48, 528)  # 528 = 512 + 16: a K tail at every BLOCK_K
    ops = operands(gen, "w8", m, n, k, bias=bias, outliers=outliers)
    out = run(*ops, silu_mul=silu)
    check(out, ops, f"w8 fma M={m} silu={silu}", silu=silu)
    (grid, kw), = launches
    bm = 1 << (m - 1).bit_length()
    assert kw.get("FMA") is True and (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]) == (bm, 16, 512 // bm)
    sms = small_gemm.device_info(torch.device(DEVICE))[1]
    assert grid[1] == smg.fma_config(n // 2 if silu else n, k, sms, m).split_k > 1
    launches.clear()
    x5 = torch.cat([ops[0]] * 5)[:5]
    run(x5, *ops[1:], silu_mul=silu)
    assert not launches[-1][1].get("FMA"), "5 rows: the tensor-core loop"


@pytest.mark.usefixtures("kernels", "poisoned_out")
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("scheme", ["bf16", "w8", "fp8_row", "fp8_tensor", "fp8_tensor_q8"])
def test_silu_mul_epilogue(scheme, m, gen):
    """Fused gate-up weight ``[gate (I); up (I)]``: each program's gate and up tiles give silu(g) * u [M, I]."""
    inter, k = 48, 80
    ops = operands(gen, scheme.replace("_q8", ""), m, 2 * inter, k, bias=True)
    out_scale = torch.tensor(0.02, device=DEVICE) if scheme.endswith("_q8") else None
    out = run(*ops, silu_mul=True, out_scale=out_scale)
    assert out.shape == (m, inter)
    check(out, ops, f"silu {scheme} M={m}", silu=True, out_scale=out_scale)


SPLIT_CONFIGS = [dict(block_n=16, block_k=32, split_k=1), dict(block_n=32, block_k=64, split_k=3),
                 dict(block_n=64, block_k=128, split_k=2, num_warps=8, num_stages=2), dict(block_n=16, block_k=32,
                                                                                          split_k=5)]


@pytest.mark.usefixtures("kernels", "poisoned_out")
@pytest.mark.parametrize("cfg", SPLIT_CONFIGS, ids=lambda c: smc.GemmConfig(**c).short())
def test_split_k_and_tiles(cfg, gen, kernels, monkeypatch):
    """Every tiling / split gives the oracle's result and repeats bit for bit; a split reduces in the GEMM kernel's
    last program of each N tile (serial split-K: one launch, counters re-armed to 0) or, with ``SERIAL`` off, in
    the reduce kernel over the same N tiles; both give the same bits."""
    sm = kernels.small_m_gemm
    launches = []
    for name in ("_small_m_gemm_kernel", "_split_k_reduce_kernel", "_small_m_gemm_serial_kernel"):
        record_launches(monkeypatch, sm, name, launches)
    c = smc.GemmConfig(**cfg)
    for scheme, silu in (("bf16", False), ("fp8_row", True)):
        n = 96 if silu else 112  # I = 48
        ops = operands(gen, scheme, 3, n, 336, bias=True)
        outs = {}
        for serial in (True, False):
            monkeypatch.setattr(sm, "SERIAL", serial)
            launches.clear()
            with smc.forced(c):
                out, again = run(*ops, silu_mul=silu), run(*ops, silu_mul=silu)
            check(out, ops, f"{scheme} silu={silu} {c.short()} serial={serial}", silu=silu)
            assert torch.equal(out.view(torch.uint8), again.view(torch.uint8))
            outs[serial] = out
            n_out = n // 2 if silu else n
            grid, kw = launches[0]
            assert grid == (-(-n_out // c.block_n), c.split_k)
            assert (kw["BLOCK_N"], kw["BLOCK_K"], kw["BLOCK_M"]) == (c.block_n, c.block_k, 16)
            assert kw.get("PARTIAL", True) == (c.split_k > 1)  # the serial kernel has no PARTIAL: it always splits
            assert (kw["num_warps"], kw["num_stages"]) == (c.num_warps, c.num_stages)
            # two calls; with split-K and SERIAL off each adds the reduce kernel
            assert len(launches) == (4 if c.split_k > 1 and not serial else 2)
            assert ("PARTIAL" not in kw) == (c.split_k > 1 and serial)
        assert torch.equal(outs[True].view(torch.uint8), outs[False].view(torch.uint8))
        if c.split_k > 1:
            assert not sm.serial_counters(ops[0].device, 1).any()  # every tile's last program re-armed its counter


TMA_CASES = [("bf16", False, dict(block_n=16, block_k=64, split_k=1)),
             ("w8", False, dict(block_n=32, block_k=64, split_k=3)),
             ("fp8_row", True, dict(block_n=64, block_k=128, split_k=2, num_stages=2)),
             ("fp8_tensor_q8", True, dict(block_n=16, block_k=32, split_k=1)),
             ("fp16", False, dict(block_n=32, block_k=32, split_k=5))]


@pytest.mark.usefixtures("kernels", "poisoned_out")
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("scheme,silu,cfg", TMA_CASES, ids=[c[0] for c in TMA_CASES])
def test_tma_weight_tiles_give_the_pointer_loads_bits(scheme, silu, cfg, m, gen, kernels, monkeypatch):
    """``GemmConfig.tma``: the weight tiles through a TMA descriptor (zero past the weight's N and K edges: masked
    N tiles, a K tail, the gate tile that runs into the up rows) give the pointer loads' bits and the oracle's
    result, split-K serial and through the reduce kernel, bias, SiLU*mul, static FP8 out; the launch took the
    descriptor and no L2 prefetch."""
    sm = kernels.small_m_gemm
    launches = []
    for name in ("_small_m_gemm_kernel", "_small_m_gemm_serial_kernel"):
        record_launches(monkeypatch, sm, name, launches)
    n, k = (2 * 48, 336) if silu else (112, 336)  # I = 48 / N = 112: masked N tiles at most BLOCK_N; 336: a K tail
    ops = operands(gen, scheme.replace("_q8", ""), m, n, k, bias=True)
    out_scale = torch.tensor(0.02, device=DEVICE) if scheme.endswith("_q8") else None
    for serial in (True, False):
        monkeypatch.setattr(sm, "SERIAL", serial)
        outs = []
        for tma in (0, 1):
            launches.clear()
            with smc.forced(smc.GemmConfig(**cfg, tma=tma)):
                outs.append(run(*ops, silu_mul=silu, out_scale=out_scale))
            kw = launches[0][1]
            assert kw["W_DESC"] is bool(tma) and (kw["PF_LINES"] == 0 or not tma)
        check(outs[1], ops, f"tma {scheme} M={m} serial={serial}", silu=silu, out_scale=out_scale)
        assert torch.equal(outs[0].view(torch.uint8), outs[1].view(torch.uint8)), (scheme, m, serial)


@pytest.mark.usefixtures("kernels")
def test_tma_falls_back_where_a_descriptor_cannot_read_the_weight(gen, kernels, monkeypatch):
    """A weight TMA cannot address (a base off 16-byte alignment; boxes past 256 elements are clamped by sanitize)
    runs the pointer loads under a TMA config, with the same result."""
    sm = kernels.small_m_gemm
    launches = []
    record_launches(monkeypatch, sm, "_small_m_gemm_kernel", launches)
    x, w, xs, ws, b = operands(gen, "bf16", 3, 48, 208)
    w_odd = torch.empty(48 * 208 + 1, dtype=w.dtype, device=w.device)[1:].view(48, 208)  # 2 bytes off alignment
    w_odd.copy_(w)
    assert not sm.tma_ok(w_odd, 16, 64) and sm.tma_ok(w, 16, 64) and not sm.tma_ok(w, 16, 512)
    with smc.forced(smc.GemmConfig(block_n=16, block_k=64, tma=1)):
        out = small_gemm.small_m_gemm(x, w_odd)
    assert launches[-1][1]["W_DESC"] is False
    assert torch.equal(out, small_gemm.small_m_gemm(x, w))
    assert smc.sanitize(smc.GemmConfig(block_k=512, tma=1), 64, 4096).block_k == 256


@pytest.mark.usefixtures("kernels", "poisoned_out")
@pytest.mark.parametrize("scheme", ["bf16", "fp8_row", "fp8_tensor"])
def test_outliers(scheme, gen):
    ops = operands(gen, scheme, 5, 64, 96, outliers=True)
    check(run(*ops), ops, f"outliers {scheme}")


@pytest.mark.usefixtures("kernels", "poisoned_out")
def test_nan_stays_in_its_row(gen):
    for scheme in ("bf16", "fp8_row"):
        x, w, xs, ws, b = operands(gen, scheme, 3, 32, 64)
        x = x.clone()
        x[1, 7] = float("nan")
        out = run(x, w, xs, ws, b).float().cpu()
        assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any(), scheme


@pytest.mark.usefixtures("kernels", "poisoned_out")
def test_strided_x_read_in_place_other_layouts_copied(gen, kernels, monkeypatch):
    seen = []
    launch = kernels.small_m_gemm.launch_small_m_gemm
    monkeypatch.setattr(kernels.small_m_gemm, "launch_small_m_gemm",
                        lambda x, *a, **k: (seen.append(x), launch(x, *a, **k))[1])
    x, w, xs, ws, b = operands(gen, "bf16", 5, 48, 64)
    wide = torch.zeros(5, 96, dtype=x.dtype, device=DEVICE)
    wide[:, 16:80] = x
    view = wide[:, 16:80]  # row stride 96: read in place (the kernel's stride_xm)
    check(run(view, w, None, None, None), (x, w, None, None, None), "row-strided x")
    assert seen[-1].data_ptr() == view.data_ptr() and seen[-1].stride() == (96, 1)
    col_major = x.t().contiguous().t()  # unit stride along M: copied first
    check(run(col_major, w, None, None, None), (x, w, None, None, None), "column-major x")
    assert seen[-1].is_contiguous() and seen[-1].data_ptr() != col_major.data_ptr()


@pytest.mark.usefixtures("kernels")
def test_empty_batch():
    x = torch.zeros(0, 32, dtype=torch.bfloat16, device=DEVICE)
    w = torch.zeros(48, 32, dtype=torch.bfloat16, device=DEVICE)
    assert small_gemm.small_m_gemm(x, w).shape == (0, 48)


def _bad_calls():
    bf, dev = torch.bfloat16, DEVICE
    x, w = torch.zeros(4, 64, dtype=bf, device=dev), torch.zeros(48, 64, dtype=bf, device=dev)
    x8, w8 = x.to(FP8), w.to(FP8)
    s1, sn = torch.ones((), device=dev), torch.ones(48, 1, device=dev)
    return [
        ("at most 64 rows", (torch.zeros(65, 64, dtype=bf, device=dev), w), {}),
        ("multiples of 16", (torch.zeros(4, 72, dtype=bf, device=dev), torch.zeros(48, 72, dtype=bf, device=dev)), {}),
        ("multiples of 16", (x, torch.zeros(40, 64, dtype=bf, device=dev)), {}),
        ("multiple of 16 for silu_mul", (x, w), dict(silu_mul=True)),  # I = 24
        ("has K=64", (x, torch.zeros(48, 80, dtype=bf, device=dev)), {}),
        ("contiguous", (x, torch.zeros(64, 48, dtype=bf, device=dev).t()), {}),
        ("or x e4m3", (x8, w), dict(x_scale=s1)),  # e4m3 x with a bf16 weight
        ("or x e4m3", (x8, w8), dict(w_scale=sn)),  # no x_scale
        ("or x e4m3", (x, w8), {}),  # no w_scale
        ("or x e4m3", (x, w), dict(w_scale=sn)),  # a scale on a bf16 weight
        ("or x e4m3", (x, torch.zeros(48, 64, dtype=torch.float16, device=dev)), {}),  # mixed 16-bit dtypes
        ("or x e4m3", (x.float(), w.float()), {}),
        ("w_scale has shape", (x8, w8), dict(x_scale=s1, w_scale=torch.ones(47, device=dev))),
        ("x_scale has shape", (x8, w8), dict(x_scale=torch.ones(3, 1, device=dev), w_scale=sn)),
        ("fp32 tensor", (x8, w8), dict(x_scale=s1.double(), w_scale=sn)),
        ("bias must be", (x, w), dict(bias=torch.zeros(47, dtype=bf, device=dev))),
        ("out_scale must be", (x, w), dict(out_scale=sn)),
        ("out_dtype must be", (x, w), dict(out_dtype=torch.float32)),
    ]


@pytest.mark.parametrize("match,args,kw", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_rejects_what_the_kernel_cannot_take(match, args, kw):
    with pytest.raises(TPFuseInputError, match=match):
        small_gemm.small_m_gemm(*args, **kw)


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x8, w8 = torch.empty(5, 64, dtype=FP8), torch.empty(96, 64, dtype=FP8)
        out = torch.ops.tpfuse.small_m_gemm(x8, w8, torch.empty(5, 1), torch.empty(96, 1), None, None, True, None)
        q8 = torch.ops.tpfuse.small_m_gemm(x8, w8, torch.empty(()), torch.empty(()), None, torch.empty(()), True,
                                           None)
        h = torch.ops.tpfuse.small_m_gemm(torch.empty(5, 64, dtype=torch.float16), torch.empty(96, 64,
                                          dtype=torch.float16), None, None, None, None, False, None)
    assert (out.shape, out.dtype) == ((5, 48), torch.bfloat16)
    assert (q8.shape, q8.dtype) == ((5, 48), FP8)
    assert (h.shape, h.dtype) == ((5, 96), torch.float16)


# --------------------------------------------------------------------------------------------------------------
# the launch / routing table


def _table(rows):
    return {"schema": 1, "source": None, "rows": rows}


def test_buckets_schemes_and_default_rule():
    assert [smc.m_bucket(m) for m in (1, 2, 8, 9, 16, 17, 32, 33, 64)] == [1, 8, 8, 16, 16, 32, 32, 64, 64]
    bf, f8 = torch.bfloat16, FP8
    assert smc.scheme_name(bf, bf, None, None) == "bf16"
    assert smc.scheme_name(bf, f8, None, True) == "w8_bf16"
    assert smc.scheme_name(f8, f8, True, True) == "fp8_row"
    assert smc.scheme_name(f8, f8, False, False, silu=True, out_fp8=True) == "fp8_tensor_silu_q8"
    assert smc.scheme_name(f8, f8, True, False) == "fp8_mixed"
    assert smc.scheme_name(f8, bf, True, None) is None and smc.scheme_name(torch.float32, torch.float32, None,
                                                                            None) is None
    # default: 256 weight bytes of K per step, split-K until ~2 waves of 132 SMs (>= 4 K steps per split)
    assert smc.default_config("bf16", 1280, 8192, 1) == smc.GemmConfig(64, 128, 14, 4, 4)
    assert smc.default_config("fp8_row", 28672, 4096, 64) == smc.GemmConfig(64, 256, 1, 4, 4)
    assert smc.default_config("bf16_silu", 28672, 4096, 8).num_stages == 3
    assert smc.sanitize(smc.GemmConfig(100, 1000, 99, 3, 9), 48, 64) == smc.GemmConfig(128, 512, 1, 4, 6)


def test_lookup_and_route_follow_the_table():
    cfg = smc.GemmConfig(block_n=32, block_k=64, split_k=2, num_warps=4, num_stages=3)
    rows = [smc.table_row("sm90", "bf16", 4096, 4096, 1, cfg, True),
            smc.table_row("sm90", "bf16", 4096, 4096, 64, cfg, False),
            smc.table_row("sm90", "fp8_tensor_silu_q8", 28672, 4096, 8, cfg, True)]
    with smc.install(_table(rows)):
        assert smc.lookup("sm90", "bf16", 4096, 4096, 1) == cfg
        assert smc.lookup("sm90", "bf16", 4096, 4096, 40) == cfg  # the launcher takes a losing row's config too
        assert smc.lookup("sm90", "bf16", 4096, 4096, 8) == smc.default_config("bf16", 4096, 4096, 8)
        assert smc.route("sm90", "bf16", 4096, 4096, 1) == cfg
        for args in (("sm90", "bf16", 4096, 4096, 40), ("sm90", "bf16", 4096, 4096, 2), ("sm90", "fp16", 4096,
                     4096, 1), ("sm80", "bf16", 4096, 4096, 1), ("sm90", "bf16", 4096, 4096, 65),
                     ("sm90", None, 4096, 4096, 1)):
            assert smc.route(*args) is None, args
        assert smc.route("sm90", "fp8_tensor_silu_q8", 28672, 4096, 5) == cfg
    with smc.install(None):
        assert smc.route("sm90", "bf16", 4096, 4096, 1) is None
    with pytest.raises(ValueError, match="m_bucket"):
        smc.parse(_table([dict(rows[0], m_bucket=4)]))
    with pytest.raises(ValueError, match="schema"):
        smc.parse({"rows": []})


def test_shipped_tables_parse():
    import tpfuse.thresholds

    # found through the package, so an installed (non-editable) tpfuse finds its own tables too
    assert os.path.samefile(smc.TABLE_DIR, os.path.dirname(tpfuse.thresholds.__file__))
    names = [f for f in os.listdir(smc.TABLE_DIR) if f.startswith("small_m_gemm_")]
    assert "small_m_gemm_sm90.json" in names
    for name in names:
        with open(os.path.join(smc.TABLE_DIR, name)) as fh:
            table = json.load(fh)
        rows = smc.parse(table)
        arch = name[len("small_m_gemm_"):-len(".json")]
        assert all(k[0] == arch for k in rows), name
        assert not rows or table["source"]["device"], f"{name}: rows need their sweep's source"


def test_shipped_table_is_its_sweep_retabled(tmp_path, monkeypatch):
    """The shipped sm90 table is exactly what ``tune_small_gemm.py --retable`` derives from the committed sweeps it
    names (``merged``, then ``source``: their times decide each row under WIN_MARGIN; nothing hand-edited), and a
    near tie routes to the kernel."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import tune_small_gemm as tsg

    with open(os.path.join(smc.TABLE_DIR, "small_m_gemm_sm90.json")) as fh:
        shipped = json.load(fh)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = tmp_path / "t.json"
    sweeps = [s["file"] for s in shipped.get("merged", [])] + [shipped["source"]["file"]]
    tsg.main(["--retable", *(os.path.join(root, f) for f in sweeps), str(out)])
    assert json.loads(out.read_text()) == shipped
    assert shipped["win_margin"] == tsg.WIN_MARGIN
    tie = [r for r in shipped["rows"] if (r["scheme"], r["n"], r["k"], r["m_bucket"]) == ("bf16_silu", 28672, 4096, 1)]
    assert len(tie) == 1 and tie[0]["beats_library"] and tie[0]["kernel_us"] > 0.98 * tie[0]["library_us"]


@pytest.mark.usefixtures("kernels", "poisoned_out")
def test_launcher_takes_the_table_config_and_route_the_op(gen, kernels, monkeypatch):
    launches = []
    record_launches(monkeypatch, kernels.small_m_gemm, "_small_m_gemm_kernel", launches)
    record_launches(monkeypatch, kernels.small_m_gemm, "_small_m_gemm_serial_kernel", launches)  # split-K
    cfg = smc.GemmConfig(block_n=16, block_k=32, split_k=2, num_warps=2, num_stages=2)
    outer = smc.GemmConfig(block_n=32, block_k=64, split_k=1, num_warps=4, num_stages=2)
    ops = operands(gen, "fp8_tensor", 6, 48, 96)
    with smc.install(_table([smc.table_row(ARCH, "fp8_tensor", 48, 96, 8, outer, True)])):
        with smc.install(_table([smc.table_row(ARCH, "fp8_tensor", 48, 96, 8, cfg, True)])):
            assert small_gemm.route(ops[0], ops[1], x_row=False, w_row=False) == cfg
            assert small_gemm.route(ops[0], ops[1], x_row=True, w_row=True) is None
            out = run(*ops)
        # leaving a table restores the one it replaced
        assert small_gemm.route(ops[0], ops[1], x_row=False, w_row=False) == outer
    check(out, ops, "table config")
    grid, kw = launches[-1]
    assert grid == (3, 2) and (kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"]) == (16, 32, 2)
    assert small_gemm.route(ops[0], ops[1], x_row=False, w_row=False) is None  # no table installed here


@pytest.mark.skipif(ON_GPU, reason="CPU plumbing test (the GPU runs the real sweep)")
@pytest.mark.parametrize("schemes", ["bf16,fp8_tensor", "w8_bf16", "w8_bf16 fma", "bf16,fp8_row tma"])
def test_sweep_end_to_end_interpreted(tmp_path, monkeypatch, kernels, schemes):
    """bench/tune_small_gemm.py on a tiny model through the interpreter with a fake clock (the kernel wins with
    32-column tiles only): every point gets a checked winner, the table file routes exactly the winning points
    (the weight-only scheme: its winners' table rows route the bf16-activation e4m3-weight calls); with ``--tma``
    every tile also runs as its TMA twin, which the fake clock makes the winner: the table routes those configs."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import tune_small_gemm as tsg

    monkeypatch.setitem(tsg.MODELS, "tiny", (64, 4, 2, 16, 96, (1,)))  # qkv 128x64, o 64x64, gate_up 192x64, down
    monkeypatch.setattr(tsg, "TILES", {2: [(32, 64, 4, 2)], 1: [(32, 128, 4, 2)]})
    monkeypatch.setattr(tsg, "MAX_COPIES", 2)
    monkeypatch.setattr(tsg, "COPY_BYTES", 1 << 12)

    def fake_time(fns):
        cfg = smc.forced_config()
        return 12.0 if cfg is None else 10.0 + cfg.block_n / 32 + cfg.split_k / 100 - cfg.tma / 4

    monkeypatch.setattr(tsg, "time_fns", fake_time)
    fma = schemes.endswith(" fma")  # --fma-max-m: the weight-only points time the CUDA-core loop
    tma = schemes.endswith(" tma")  # --tma: every tile also with TMA weight tiles
    schemes = schemes.replace(" fma", "").replace(" tma", "")
    monkeypatch.setattr(kernels.small_m_gemm, "FMA_MAX_M", 0)  # restored after the sweep sets it
    launches = []
    record_launches(monkeypatch, kernels.small_m_gemm, "_small_m_gemm_kernel", launches)
    tsg.main(["--device", "cpu", "--models", "tiny", "--m", "1", "--schemes", schemes, "--out-dir",
              str(tmp_path), "--budget-s", "1e9"] + (["--fma-max-m", "4"] if fma else []) + (["--tma"] if tma else []))
    assert launches and all(bool(kw.get("FMA")) == fma for _, kw in launches if kw["W_FP8"] and not kw["X_FP8"])
    assert any(kw["W_DESC"] for _, kw in launches) == tma
    with open(tmp_path / "small_gemm_cpu.json") as fh:
        res = json.load(fh)
    assert res["header"]["fma_max_m"] == (4 if fma else None)
    assert not res["errors"] and not res["skipped"] and not res["header"]["partial"]
    n_schemes = len(schemes.split(","))
    # 4 linears a scheme + gate-up's fused SiLU*mul scheme where the scheme has one
    assert len(res["best"]) == 4 * n_schemes + sum(s in tsg.SILU for s in schemes.split(","))
    assert {b["scheme"] for b in res["best"]} >= set(schemes.split(","))
    assert res["header"]["tma_twins"] == tma
    for b in res["best"]:
        assert b["beats_library"] == (b["config"]["block_n"] == 32
                                      and b["kernel_us"] < tsg.WIN_MARGIN * b["library_us"]), b
        assert b["config"].get("tma", 0) == int(tma), b
    with open(tmp_path / "small_m_gemm_cpu.json") as fh:
        table = json.load(fh)
    assert table["source"]["file"] == os.path.join("bench", "results", "small_gemm_cpu.json")
    with smc.install(table):
        for b in res["best"]:
            got = smc.route("cpu", b["scheme"], b["n"], b["k"], 1)
            assert (got == smc.config_from_dict(b["config"])) if b["beats_library"] else got is None, b


@pytest.mark.skipif(ON_GPU, reason="CPU plumbing test (the GPU runs the real sweep)")
def test_partial_sweep_overrides_its_base_sweep(tmp_path, monkeypatch, kernels):
    """A re-sweep at M = 32 (the wide candidates: split-K 1 / 2 beside the rule's, the 8-warp tiles) over a sweep at
    M = 1 (``--base-sweep``): its table keeps the base's M = 1 rows and takes the new M = 32 rows, names both sweeps,
    and ``--retable BASE NEW OUT`` derives the same table from the two files."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import tune_small_gemm as tsg

    monkeypatch.setitem(tsg.MODELS, "tiny", (64, 4, 2, 16, 96, (1,)))
    monkeypatch.setattr(tsg, "TILES", {2: [(32, 64, 4, 2)], 1: [(32, 128, 4, 2)]})
    monkeypatch.setattr(tsg, "EXTRA_TILES", {2: [(64, 32, 8, 2)], 1: [(64, 32, 8, 2)]})
    monkeypatch.setattr(tsg, "MAX_COPIES", 2)
    monkeypatch.setattr(tsg, "COPY_BYTES", 1 << 12)
    wide = smc.GemmConfig(block_n=64, block_k=32, split_k=1, num_warps=8, num_stages=2)
    assert wide in tsg.candidates("bf16", 64, 64, 132, 32) and wide not in tsg.candidates("bf16", 64, 64, 132, 1)

    def fake_time(fns):  # the library always; at M = 32 the wide 8-warp tile wins
        cfg = smc.forced_config()
        return 12.0 if cfg is None else (5.0 if cfg.num_warps == 8 and cfg.split_k == 1 else 11.0)

    monkeypatch.setattr(tsg, "time_fns", fake_time)
    common = ["--device", "cpu", "--models", "tiny", "--schemes", "bf16", "--budget-s", "1e9"]
    tsg.main(common + ["--m", "1", "--out-dir", str(tmp_path / "base")])
    base = str(tmp_path / "base" / "small_gemm_cpu.json")
    tsg.main(common + ["--m", "32", "--out-dir", str(tmp_path / "new"), "--base-sweep", base])
    table = json.loads((tmp_path / "new" / "small_m_gemm_cpu.json").read_text())
    rows = {(r["scheme"], r["n"], r["k"], r["m_bucket"]): r for r in table["rows"]}
    assert {k[3] for k in rows} == {1, 32} and len(rows) == 2 * (4 + 1)  # 4 linears + the fused SiLU*mul
    assert all(smc.config_from_dict(r["config"]) == wide for k, r in rows.items() if k[3] == 32 and
               "_silu" not in k[0])
    assert all(smc.config_from_dict(r["config"]).num_warps == 4 for k, r in rows.items() if k[3] == 1)
    assert table["merged"][0]["file"] == os.path.join("bench", "results", "small_gemm_cpu.json")
    out = tmp_path / "re.json"
    tsg.main(["--retable", base, str(tmp_path / "new" / "small_gemm_cpu.json"), str(out)])
    assert json.loads(out.read_text()) == table


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    @pytest.mark.parametrize("scheme", SCHEMES)
    @pytest.mark.parametrize("m", [1, 8, 64])
    def test_decode_shapes(self, scheme, m, gen):
        """A Llama-3.1-8B TP=2 gate-up shard and o-proj shard (default configs: split-K on the latter)."""
        for n, k in ((7168, 4096), (4096, 2048)):
            ops = operands(gen, scheme, m, n, k, bias=True)
            check(run(*ops), ops, f"{scheme} M={m} {n}x{k}")

    def test_cuda_graph_replay(self, gen):
        from kernel_env import capture

        x, w, xs, ws, b = operands(gen, "fp8_row", 4, 1280, 8192)
        graph, out = capture(lambda: run(x, w, xs, ws, b))
        x.copy_(operands(gen, "fp8_row", 4, 1280, 8192)[0])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, run(x, w, xs, ws, b))

    @pytest.mark.parametrize("m", [1, 16, 64])
    def test_tma_decode_shapes_same_bits_and_graph_replays(self, gen, m):
        """TMA weight tiles (``GemmConfig.tma``) on the 8B's TP 2 shapes (qkv, o, gate-up with SiLU*mul, down) in
        bf16 and per-channel FP8, split-K 1 and 2 (serial): the pointer loads' bits, eager and replayed in a CUDA
        graph with new x."""
        from kernel_env import capture

        from tpfuse.kernels import small_m_gemm as smg

        calls = []
        for (n, k), silu in (((3072, 4096), False), ((4096, 2048), False), ((14336, 4096), True),
                             ((4096, 7168), False)):
            for scheme in ("bf16", "fp8_row"):
                ops = operands(gen, scheme, m, n, k)
                bk = 128 if scheme == "bf16" else 256
                for split in (1, 2):
                    calls.append((ops, silu, smc.GemmConfig(block_n=64, block_k=bk, split_k=split, num_stages=4,
                                                            tma=1)))

        def step(tma=True):
            outs = []
            for ops, silu, cfg in calls:
                with smc.forced(cfg if tma else dataclasses.replace(cfg, tma=0)):
                    outs.append(run(*ops, silu_mul=silu))
            return outs

        smg._DESCS.clear()
        graph, outs = capture(step)
        assert smg._DESCS, "the TMA launches built descriptors"
        for i in range(3):
            for ops, _, _ in calls:
                ops[0].copy_(torch.randn(ops[0].shape, device="cuda").to(ops[0].dtype))
            graph.replay()
            want = step(tma=False)
            torch.cuda.synchronize()
            for j, (got, exp) in enumerate(zip(outs, want)):
                assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8)), (i, j)
        for got, (ops, silu, cfg) in zip(step(), calls):  # and the oracle's result (the last x)
            check(got, ops, f"tma M={m} {cfg.short()}", silu=silu)

    @pytest.mark.parametrize("m", [1, 8, 64])
    def test_serial_split_k_graph_replays(self, gen, m, monkeypatch):
        """Serial split-K (the tile's last program reduces; ``SERIAL``) in a CUDA graph of three back-to-back GEMMs
        (the 8B's qkv / o / down shapes, per-channel FP8 and bf16, 2-4 splits) replayed 200 times with new x each
        time: every replay equals the reduce kernel's bits, and the counters are all zero after."""
        from kernel_env import capture

        from tpfuse.kernels import small_m_gemm as smg

        calls = []
        for (n, k), scheme, split in (((6144, 4096), "fp8_row", 3), ((4096, 4096), "bf16", 2),
                                      ((4096, 14336), "fp8_row", 4)):
            ops = operands(gen, scheme, m, n, k)
            cfg = smc.GemmConfig(block_n=64, block_k=128 if scheme == "bf16" else 256, split_k=split, num_stages=4)
            calls.append((ops, cfg))

        def step():
            outs = []
            for ops, cfg in calls:
                with smc.forced(cfg):
                    outs.append(run(*ops))
            return outs

        monkeypatch.setattr(smg, "SERIAL", True)
        graph, outs = capture(step)
        for i in range(200):
            for ops, _ in calls:  # new activations in place (e4m3: N(0, 1) values, the scales kept)
                ops[0].copy_(torch.randn(ops[0].shape, device="cuda").to(ops[0].dtype))
            graph.replay()
            if i % 40 == 0 or i == 199:
                monkeypatch.setattr(smg, "SERIAL", False)
                want = step()
                monkeypatch.setattr(smg, "SERIAL", True)
                torch.cuda.synchronize()
                for got, exp in zip(outs, want):
                    assert torch.equal(got.view(torch.uint8), exp.view(torch.uint8)), i
        torch.cuda.synchronize()
        assert not smg.serial_counters(torch.device("cuda", torch.cuda.current_device()), 1).any()


def test_sweep_cli_tiles_join_every_candidate_list(monkeypatch):
    """``--tiles`` adds its tiles to phase 1 at every M and weight width (16-row tiles: the launcher's smallest),
    and a malformed item stops the sweep before any GPU work."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import tune_small_gemm as tsg

    assert tsg.parse_tiles("16x256x4x6, 32x512x4x4,64x128x4x4t") == [(16, 256, 4, 6), (32, 512, 4, 4),
                                                                       (64, 128, 4, 4, 1)]
    with pytest.raises(SystemExit, match="block_n x block_k"):
        tsg.parse_tiles("16x256x4")
    monkeypatch.setattr(tsg, "CLI_TILES", [(16, 256, 4, 6)])
    for scheme in ("bf16", "fp8_row"):
        for m in (1, 64):
            got = tsg.candidates(scheme, 4096, 4096, 132, m)
            assert any((c.block_n, c.block_k, c.num_warps, c.num_stages) == (16, 256, 4, 6) for c in got), got


def test_sweep_tma_twins_every_tile_it_can_box(monkeypatch):
    """``--tma``: each phase-1 tile of at most 256 K elements also runs with TMA weight tiles at the same split (the
    e4m3 tiles of 512 do not: a TMA box holds at most 256 elements a dimension); ``--tiles ...t`` adds one."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import tune_small_gemm as tsg

    monkeypatch.setattr(tsg, "CLI_TILES", [(16, 128, 4, 6, 1)])
    monkeypatch.setattr(tsg, "TMA_TWINS", [False])
    plain = tsg.candidates("bf16", 4096, 4096, 132, 1)
    assert [c for c in plain if c.tma] == [smc.GemmConfig(16, 128, tsg.rule_split(smc.GemmConfig(16, 128), "bf16",
                                                                                  4096, 4096, 132), 4, 6, 1)]
    monkeypatch.setattr(tsg, "TMA_TWINS", [True])
    for scheme in ("bf16", "fp8_row"):
        got = tsg.candidates(scheme, 4096, 4096, 132, 16)
        for c in got:
            twin = smc.GemmConfig(c.block_n, c.block_k, c.split_k, c.num_warps, c.num_stages, 1)
            assert (twin in got) == (c.block_k <= 256), (scheme, c)
        assert len(set(got)) == len(got)
