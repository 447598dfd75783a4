"""The local-stage Triton kernels (add+RMSNorm(+quant), SiLU*mul(+quant), standalone quantizer) against the reference.

Where they run: with CUDA, on the GPU (compiled Triton); without, through the Triton interpreter on CPU. Nothing is
skipped silently: the module sets ``TRITON_INTERPRET=1`` only while it (re)imports the kernel modules (so other test
modules and the GPU path keep the real compiler), and an autouse fixture sets ``TPFUSE_TRITON_CPU=1`` so the public
ops take the Triton path on CPU tensors. Every output buffer the ops allocate is poisoned (0xFF bytes: NaN for
fp32/e4m3/bf16, code 15 for packed e2m1) so an element the kernel forgets to write is caught.

Bit-exactness: the standalone quantizer runs the same fp32 math as :mod:`tpfuse.quant` on the same input, so it is
compared byte for byte (data, scales, swizzle padding). The fused ops' fp32 norm/SiLU values differ from the
reference's by a few ulp (rsqrt / exp approximations and summation order), so their quantized outputs are checked
within one quantization step (``assert_quant_close``) against the fp64 oracle, and their bytes against the
reference quantizer for all but a tiny fraction of elements.
"""

import importlib
import os
import sys

import pytest
import torch

from tpfuse import ops, reference
from tpfuse import quant as q
from tpfuse.tolerance import assert_close, assert_quant_close

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_MODULES = ("quant_epilogue", "quantize", "add_rmsnorm", "silu_mul")


def _load_kernels_interpreted():
    """(Re)import the kernel modules with ``TRITON_INTERPRET=1`` (Triton decides interpreted vs compiled when a
    ``@triton.jit`` function is defined). The variable stays set while this module's tests run (Triton consults it
    again at launch) and is restored afterwards by :func:`_interpreter_env`."""
    os.environ["TRITON_INTERPRET"] = "1"
    for name in KERNEL_MODULES:
        full = f"tpfuse.kernels.{name}"
        if full in sys.modules:
            importlib.reload(sys.modules[full])
        else:
            importlib.import_module(full)


_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not ON_GPU:
    _load_kernels_interpreted()


@pytest.fixture(scope="module", autouse=True)
def _interpreter_env():
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """Route the public ops through the Triton kernels (interpreted on CPU) and poison every output they allocate."""
    if not ON_GPU:
        monkeypatch.setenv("TPFUSE_TRITON_CPU", "1")
    alloc, alloc_res = ops.alloc_outputs, ops.alloc_residual_out

    def poisoned_alloc(*a, **k):
        data, scale = alloc(*a, **k)
        data.view(torch.uint8).fill_(0xFF)
        scale.view(torch.uint8).fill_(0xFF)
        return data, scale

    def poisoned_res(x):
        r = alloc_res(x)
        r.view(torch.uint8).fill_(0xFF)
        return r

    monkeypatch.setattr(ops, "alloc_outputs", poisoned_alloc)
    monkeypatch.setattr(ops, "alloc_residual_out", poisoned_res)


def _randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _specs(oracle_amax, group_sizes=(64, 128)):
    gs = q.nvfp4_global_scale(oracle_amax.float()).to(DEVICE)
    specs = [q.FP8Static(torch.tensor(0.05, device=DEVICE)), q.FP8PerToken()]
    specs += [q.FP8PerGroup(g) for g in group_sizes]
    specs += [q.NVFP4(gs, "swizzled128x4"), q.NVFP4(gs, "linear")]
    return specs


def _spec_id(spec):
    name = type(spec).__name__
    if isinstance(spec, q.FP8PerGroup):
        return f"{name}{spec.group_size}"
    if isinstance(spec, q.NVFP4):
        return f"{name}-{spec.layout}"
    return name


def _cpu_spec(spec):
    """The same spec with its scale tensors on the CPU: every oracle here is the CPU reference. (On CUDA, torch
    divides by a Python scalar as a multiply by its fp32 reciprocal, so ``tpfuse.quant``'s dynamic FP8 scale
    ``amax / 448`` can differ by one ulp between CPU and GPU torch; the kernels do the IEEE division the CPU does.)"""
    if isinstance(spec, q.FP8Static):
        return q.FP8Static(spec.scale.cpu())
    if isinstance(spec, q.NVFP4):
        return q.NVFP4(spec.global_scale.cpu(), spec.layout)
    return spec


def _cpu_qa(qa):
    return q.QuantizedActivation(data=qa.data.cpu(), scale=qa.scale.cpu(), spec=_cpu_spec(qa.spec),
                                 orig_dtype=qa.orig_dtype, shape=qa.shape)


def ref_quantize(x, spec):
    return q.quantize(x.cpu(), _cpu_spec(spec))


def ref_add_rmsnorm(x, r, w, eps, quant=None, gemma=False):
    return reference.add_rmsnorm(x.cpu(), None if r is None else r.cpu(), w.cpu(), eps,
                                 quant=None if quant is None else _cpu_spec(quant), gemma=gemma)


def ref_silu_mul(x, quant=None):
    return reference.silu_mul(x.cpu(), quant=None if quant is None else _cpu_spec(quant))


def check_quant_close(qa, oracle, what):
    assert_quant_close(_cpu_qa(qa), oracle.cpu(), what)


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def _assert_bytes_equal(out, ref, what, allow_nan_payload=False):
    """Byte equality; NaN encodings (fp32 / e4m3) may differ in payload/sign when ``allow_nan_payload``."""
    if allow_nan_payload and out.dtype in (torch.float32, q.FP8_DTYPE):
        o, r = out.float().cpu(), ref.float().cpu()
        assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{what}: NaN positions differ"
        keep = ~torch.isnan(r)
        out, ref = out.cpu()[keep], ref.cpu()[keep]
    if out.dim() == 0:
        out, ref = out.reshape(1), ref.reshape(1)
    ob, rb = _bytes(out), _bytes(ref)
    assert ob.shape == rb.shape, f"{what}: shape {tuple(ob.shape)} != {tuple(rb.shape)}"
    bad = int((ob != rb).sum())
    assert bad == 0, f"{what}: {bad} of {ob.numel()} bytes differ from the reference quantizer"


def _assert_quant_bitexact(qa, ref_qa, what, allow_nan_payload=False):
    assert qa.data.dtype == ref_qa.data.dtype and qa.scale.dtype == ref_qa.scale.dtype, what
    _assert_bytes_equal(qa.data, ref_qa.data, what + " data", allow_nan_payload)
    _assert_bytes_equal(qa.scale, ref_qa.scale, what + " scale", allow_nan_payload)


def _hard_input(gen, t, h, dtype=torch.float32):
    """Random data with outliers, tiny (e4m3-subnormal after scaling) values, zeros and negative zeros."""
    x = torch.randn(t, h, generator=gen) * 2
    x[:, ::7] *= 1e-3
    x[0, 3] = 90.0
    x[-1, h // 2] = -57.0
    x[:, 5] = 0.0
    x[:, 6] = -0.0
    return x.to(dtype).to(DEVICE)


# --------------------------------------------------------------------------------------------------------------
# standalone quantizer: bit-exact


QUANT_CASES = [  # (tokens, hidden): 1 token, hidden not a multiple of the tile, several tiles, > 128 rows
    (1, 256), (3, 192), (5, 1088),
]


@pytest.mark.parametrize("t,h", QUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_bitexact_all_formats(t, h, dtype, gen):
    x = _hard_input(gen, t, h, dtype)
    for spec in _specs(x.abs().amax()):
        if isinstance(spec, q.FP8PerGroup) and h % spec.group_size:
            continue
        qa = ops.quantize(x, spec)
        assert qa.orig_dtype == dtype and qa.shape == (t, h)
        _assert_quant_bitexact(qa, ref_quantize(x, spec), f"quantize {_spec_id(spec)} {t}x{h} {dtype}")


def test_quantize_swizzled_many_rows_and_padding(gen):
    # 130 rows: two 128-row tiles, 126 padding rows; H/16 = 10 scale columns, padded to 12
    x = _hard_input(gen, 130, 160)
    spec = q.NVFP4(torch.tensor(3.0, device=DEVICE), "swizzled128x4")
    qa = ops.quantize(x, spec)
    assert qa.scale.shape == (256, 12)
    _assert_quant_bitexact(qa, ref_quantize(x, spec), "nvfp4 swizzled 130x160")


def test_quantize_nan_inf(gen):
    x = _hard_input(gen, 4, 128)
    x[1, 17] = float("nan")
    x[2, 40] = float("inf")
    x[3, 41] = float("-inf")
    for spec in _specs(torch.tensor(100.0)):
        qa, ref_qa = ops.quantize(x, spec), ref_quantize(x, spec)
        _assert_quant_bitexact(qa, ref_qa, f"nan/inf {_spec_id(spec)}", allow_nan_payload=True)
        if isinstance(spec, q.FP8Static):  # NaN stays NaN, +-Inf saturates
            assert torch.isnan(qa.data[1, 17].float()) and qa.data[2, 40].float() == 448
        if isinstance(spec, q.FP8PerToken):  # a bad row never looks clean
            assert not torch.isfinite(qa.scale[1:].float()).all(dim=1).any()


def test_quantize_kernel_actually_differs_when_wrong(gen):
    """Guard against a vacuous comparison: a 7% change of the input must change some output byte."""
    x = _hard_input(gen, 2, 256)
    spec = q.FP8Static(torch.tensor(0.05, device=DEVICE))
    a = ops.quantize(x, spec)
    b = ops.quantize(x * 1.07, spec)
    assert not torch.equal(_bytes(a.data), _bytes(b.data))


# --------------------------------------------------------------------------------------------------------------
# add + RMSNorm


def _oracle_norm(x, r, w, eps, gemma):
    s = x.double().cpu() if r is None else x.double().cpu() + r.double().cpu()
    return s, reference.rmsnorm_math(s, w.double().cpu(), eps, gemma)


@pytest.mark.parametrize("t,h", [(1, 33), (3, 257), (2, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rmsnorm_dense(t, h, dtype, gemma, gen):
    x, r, w = _randn(gen, t, h, dtype=dtype), _randn(gen, t, h, dtype=dtype), _randn(gen, h, dtype=dtype)
    out, res = ops.add_rmsnorm(x, r, w, 1e-6, gemma=gemma)
    ref_out, ref_res = ref_add_rmsnorm(x, r, w, 1e-6, gemma=gemma)
    assert out.dtype == dtype and res.dtype == dtype and out.shape == x.shape
    assert torch.equal(res.cpu(), ref_res.cpu()), "residual_out = fp32 add rounded once: must be bit-exact"
    s, oracle = _oracle_norm(x, r, w, 1e-6, gemma)
    assert_close(out.cpu(), oracle, dtype, "out")
    assert_close(out.cpu(), ref_out.cpu(), dtype, "out vs reference", factor=0.5)


def test_add_rmsnorm_no_residual_fp32_weight(gen):
    x = _randn(gen, 3, 320, dtype=torch.bfloat16)
    w32 = (1 + torch.rand(320, generator=gen) * 1e-2).to(DEVICE)  # differences bf16 cannot hold
    out, res = ops.add_rmsnorm(x, None, w32, 1e-6)
    assert torch.equal(res.cpu(), x.cpu())
    _, oracle = _oracle_norm(x, None, w32, 1e-6, False)
    _, oracle_bf16w = _oracle_norm(x, None, w32.to(torch.bfloat16), 1e-6, False)
    want = oracle.to(torch.bfloat16)
    # the check is sensitive: reading the weight as bf16 would change many rounded outputs
    assert (oracle_bf16w.to(torch.bfloat16) != want).float().mean() > 0.1
    assert (out.cpu() == want).float().mean() > 0.98
    assert_close(out.cpu(), oracle, torch.bfloat16, "fp32 weight")


def test_add_rmsnorm_residual_inplace(gen):
    x, r, w = (_randn(gen, 4, 96, dtype=torch.bfloat16), _randn(gen, 4, 96, dtype=torch.bfloat16),
               _randn(gen, 96, dtype=torch.bfloat16))
    r_before = r.clone()
    ref_out, ref_res = ref_add_rmsnorm(x, r_before, w, 1e-6)
    out, res = ops.add_rmsnorm(x, r, w, 1e-6, residual_inplace=True)
    assert res.data_ptr() == r.data_ptr()
    assert torch.equal(r.cpu(), ref_res.cpu())
    assert_close(out.cpu(), ref_out.cpu(), torch.bfloat16, "in-place out", factor=0.5)
    # quantized output with in-place residual
    r2 = r_before.clone()
    qa, res2 = ops.add_rmsnorm(x, r2, w, 1e-6, quant=q.FP8PerToken(), residual_inplace=True)
    assert torch.equal(r2.cpu(), ref_res.cpu()) and res2.data_ptr() == r2.data_ptr()
    _, oracle = _oracle_norm(x, r_before, w, 1e-6, False)
    check_quant_close(qa, oracle, "in-place + per-token")


@pytest.mark.parametrize("t,h", [(1, 256), (3, 384), (130, 128)])
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rmsnorm_quantized(t, h, gemma, gen):
    x = _hard_input(gen, t, h, torch.bfloat16)
    r = _randn(gen, t, h, dtype=torch.bfloat16)
    w = _randn(gen, h, dtype=torch.bfloat16)
    s, oracle = _oracle_norm(x, r, w, 1e-5, gemma)
    for spec in _specs(oracle.abs().amax()):
        if isinstance(spec, q.FP8PerGroup) and h % spec.group_size:
            continue
        what = f"add_rmsnorm {_spec_id(spec)} {t}x{h} gemma={gemma}"
        qa, res = ops.add_rmsnorm(x, r, w, 1e-5, quant=spec, gemma=gemma)
        assert qa.orig_dtype == torch.bfloat16 and qa.shape == (t, h)
        check_quant_close(qa, oracle, what)
        ref_qa, ref_res = ref_add_rmsnorm(x, r, w, 1e-5, quant=spec, gemma=gemma)
        assert torch.equal(res.cpu(), ref_res.cpu())
        # few-ulp differences of the fp32 norm may flip a rounding: allow <= 1% of the bytes to differ
        diff = (_bytes(qa.data) != _bytes(ref_qa.data)).float().mean().item()
        assert diff <= 0.01, f"{what}: {diff:.2%} of data bytes differ from the reference"
        if isinstance(spec, q.NVFP4) and spec.layout == "swizzled128x4":
            pad = q.unswizzle_128x4(qa.scale, qa.scale.shape[0], qa.scale.shape[1] * 16)  # whole padded buffer
            assert torch.equal(_bytes(pad[t:]), torch.zeros_like(_bytes(pad[t:]))), "swizzle pad rows not zero"


def test_add_rmsnorm_nan_inf_propagate():
    x = torch.ones(4, 64, device=DEVICE)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    x[3, 9] = float("-inf")
    w = torch.ones(64, device=DEVICE)
    r = torch.zeros(4, 64, device=DEVICE)
    out, res = ops.add_rmsnorm(x, r, w, 1e-6)
    ref_out, ref_res = ref_add_rmsnorm(x, r, w, 1e-6)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref_out.cpu()))
    assert torch.isnan(out[1]).all() and torch.isnan(out[2, 0]) and not torch.isnan(out[0]).any()
    assert torch.equal(torch.isnan(res.cpu()), torch.isnan(ref_res.cpu())) and torch.equal(res.cpu().nan_to_num(), ref_res.cpu().nan_to_num())
    for spec in (q.FP8Static(torch.tensor(0.1, device=DEVICE)), q.FP8PerToken(), q.FP8PerGroup(64),
                 q.NVFP4(torch.tensor(100.0, device=DEVICE)), q.NVFP4(torch.tensor(100.0, device=DEVICE), "linear")):
        qa, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
        ref_qa, _ = ref_add_rmsnorm(x, r, w, 1e-6, quant=spec)
        what = f"nan/inf {_spec_id(spec)}"
        # rows 1..3 hold only NaN / 0 after the norm on both sides: bit-exact up to NaN payloads. Row 0 is
        # rsqrt(1 + eps), which the GPU's approximate rsqrt may round one ulp away: it is left to the other tests.
        _assert_bytes_equal(qa.data[1:], ref_qa.data[1:], what + " data", allow_nan_payload=True)
        if isinstance(spec, q.NVFP4) and spec.layout == "swizzled128x4":
            sf, sf_ref = q.unswizzle_128x4(qa.scale.cpu(), 4, 64), q.unswizzle_128x4(ref_qa.scale, 4, 64)
            _assert_bytes_equal(sf[1:], sf_ref[1:], what + " scale", allow_nan_payload=True)
        elif not isinstance(spec, q.FP8Static):
            _assert_bytes_equal(qa.scale[1:], ref_qa.scale[1:], what + " scale", allow_nan_payload=True)
        deq = _cpu_qa(qa).dequantize(torch.float32)
        assert torch.equal(torch.isnan(deq), torch.isnan(ref_qa.dequantize(torch.float32))), what
        assert torch.isnan(deq[1]).all() and not torch.isnan(deq[0]).any(), what


# --------------------------------------------------------------------------------------------------------------
# SiLU * mul


@pytest.mark.parametrize("t,inter", [(1, 48), (3, 160), (2, 2176)])
def test_silu_mul(t, inter, gen):
    x = _randn(gen, t, 2 * inter, dtype=torch.bfloat16, scale=2.0)
    x[0, 1] = 30.0
    x[-1, 0] = -30.0
    g, u = x.double().cpu().chunk(2, -1)
    oracle = torch.nn.functional.silu(g) * u
    out = ops.silu_mul(x)
    assert out.shape == (t, inter) and out.dtype == torch.bfloat16
    assert_close(out.cpu(), oracle, torch.bfloat16, "silu_mul")
    for spec in _specs(oracle.abs().amax(), group_sizes=(128,)):
        if (isinstance(spec, q.FP8PerGroup) and inter % spec.group_size) or \
                (isinstance(spec, q.NVFP4) and inter % 16):
            continue
        what = f"silu_mul {_spec_id(spec)} {t}x{inter}"
        qa = ops.silu_mul(x, quant=spec)
        assert qa.shape == (t, inter)
        check_quant_close(qa, oracle, what)
        ref_qa = ref_silu_mul(x, quant=spec)
        diff = (_bytes(qa.data) != _bytes(ref_qa.data)).float().mean().item()
        assert diff <= 0.01, f"{what}: {diff:.2%} of data bytes differ from the reference"


def test_silu_mul_nan_propagates():
    x = torch.ones(2, 64, device=DEVICE)
    x[0, 3] = float("nan")   # gate
    x[1, 40] = float("nan")  # up
    out = ops.silu_mul(x)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref_silu_mul(x)))
    assert torch.isnan(out[0, 3]) and torch.isnan(out[1, 8]) and int(torch.isnan(out).sum()) == 2


# --------------------------------------------------------------------------------------------------------------
# epilogue building blocks: e2m1 bit tricks, the older quant_store form


def _e2m1_probe_values():
    """Every sign x a spread of exponents around the e2m1 range x mantissas incl. the tie points, the exact e2m1
    values and their fp32 neighbours, zeros, subnormals, Inf, NaN with both signs and several payloads."""
    bits = []
    for sign in (0, 0x80000000):
        for exp in list(range(0, 8)) + list(range(100, 140)) + list(range(248, 256)):
            for mant in (0, 1, 0x1FFFFF, 0x200000, 0x200001, 0x3FFFFF, 0x400000, 0x400001, 0x5FFFFF, 0x600000,
                         0x600001, 0x7FFFFF, 0x123456, 0x654321):
                bits.append(sign | (exp << 23) | mant)
    edges = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0, 448.0])
    e = edges.view(torch.int32)
    near = torch.cat([e - 1, e, e + 1]).to(torch.int64) & 0xFFFFFFFF
    allb = torch.tensor(bits, dtype=torch.int64)
    allb = torch.cat([allb, near, near | 0x80000000, torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF])])
    allb = torch.where(allb >= 2**31, allb - 2**32, allb).to(torch.int32)
    return allb.view(torch.float32)


# test kernels over the epilogue's pieces (defined after the interpreted (re)import above, so on CPU they are
# interpreted too and call the interpreted functions; Triton itself is first imported there, under the variable)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from tpfuse.kernels.quant_epilogue import e2m1_encode as _e2m1_encode  # noqa: E402
from tpfuse.kernels.quant_epilogue import quant_store as _quant_store  # noqa: E402
from tpfuse.kernels.quant_epilogue import quant_store_tile as _quant_store_tile  # noqa: E402


@triton.jit
def _e2m1_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(o_ptr + offs, _e2m1_encode(tl.load(x_ptr + offs, mask=m, other=0.0)), mask=m)


@triton.jit
def _both_forms_kernel(x_ptr, o1, s1, o2, s2, gs_ptr, n_cols, out_stride, scale_stride, FMT: tl.constexpr,
                       BLOCK: tl.constexpr, GROUP: tl.constexpr):
    c0 = tl.program_id(0) * BLOCK
    cols = c0 + tl.arange(0, BLOCK)
    mask = cols < n_cols
    v = tl.load(x_ptr + cols, mask=mask, other=0.0)
    row = tl.program_id(0) * 0
    _quant_store(v, cols, mask, row, o1, out_stride, s1, scale_stride, gs_ptr, 0, FMT, BLOCK, GROUP)
    _quant_store_tile(v, c0, n_cols, row, o2, out_stride, s2, scale_stride, gs_ptr, 0, FMT, BLOCK, GROUP)


def test_e2m1_encode_matches_reference_on_edges():
    v = _e2m1_probe_values()
    x = v.to(DEVICE)
    out = torch.empty(v.numel(), dtype=torch.uint8, device=DEVICE)
    _e2m1_kernel[(triton.cdiv(v.numel(), 1024),)](x, out, v.numel(), BLOCK=1024)
    want = q.e2m1_encode(v)
    bad = (out.cpu() != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. {v[bad[:4]].tolist()} -> " \
                             f"{out.cpu()[bad[:4]].tolist()} != {want[bad[:4]].tolist()}"
    assert set(want.tolist()) == set(range(16)) and torch.isnan(v).sum() >= 4  # every code, NaN of both signs


def test_quant_store_cols_form_matches_tile_form(gen):
    """The older ``quant_store(vals, cols, mask, ...)`` (kept for outside callers) writes what the tile form writes,
    for a tile that does not start at column 0 and runs past the row's end."""

    h = 384  # tiles of 256: the second one is half outside the row
    x = _hard_input(gen, 1, h)
    gs = torch.tensor(3.0, device=DEVICE)
    for fmt, group, spec in ((3, 128, q.FP8PerGroup(128)), (4, 16, q.NVFP4(gs, "linear"))):
        a_d, a_s = ops.alloc_outputs(1, h, fmt, group, DEVICE, torch.float32)
        b_d, b_s = ops.alloc_outputs(1, h, fmt, group, DEVICE, torch.float32)
        _both_forms_kernel[(2,)](x, a_d, a_s, b_d, b_s, gs, h, a_d.stride(0), a_s.stride(0), FMT=fmt, BLOCK=256,
                                 GROUP=group)
        assert torch.equal(_bytes(a_d), _bytes(b_d)) and torch.equal(_bytes(a_s), _bytes(b_s))
        ref_qa = ref_quantize(x, spec)
        _assert_bytes_equal(b_d, ref_qa.data, f"fmt {fmt} data")
        _assert_bytes_equal(b_s, ref_qa.scale, f"fmt {fmt} scale")


# --------------------------------------------------------------------------------------------------------------
# launch configurations (tpfuse.kernels.local_configs): every knob keeps the results


class _LaunchRecorder:
    """Stands in for a kernel object: records (grid, constexpr / launch keyword args) and launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.launches.append((tuple(grid), dict(kw)))
            return self.kernel[grid](*args, **kw)
        return run


@pytest.fixture
def record(monkeypatch):
    def _record(module_name, kernel_name):
        mod = sys.modules[f"tpfuse.kernels.{module_name}"]
        rec = _LaunchRecorder(getattr(mod, kernel_name))
        monkeypatch.setattr(mod, kernel_name, rec)
        return rec
    return _record


def _lc():
    from tpfuse.kernels import local_configs
    return local_configs


NORM_CONFIGS = [dict(num_warps=4, rows=2), dict(num_warps=2, rows=4), dict(num_warps=4, split=2),
                dict(num_warps=2, split=4)]


NORM_CASES = [(3, 512, c) for c in NORM_CONFIGS] + [(130, 256, dict(num_warps=2, rows=4)),
                                                     (130, 256, dict(num_warps=4, split=2))]


@pytest.mark.parametrize("t,h,cfg", NORM_CASES,
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) if isinstance(c, dict) else str(c))
def test_add_rmsnorm_launch_configs(t, h, cfg, gen, record):
    """Multi-row programs and split rows: the launch really uses them (grid, ROWS, SPLIT) and the results stay
    those of the default launch (bit-identical residual; outputs bit-identical under the interpreter, within the
    usual few-ulp tolerance compiled) and of the reference."""
    lc = _lc()
    x = _hard_input(gen, t, h, torch.bfloat16)
    r = _randn(gen, t, h, dtype=torch.bfloat16)
    w = _randn(gen, h, dtype=torch.bfloat16)
    s, oracle = _oracle_norm(x, r, w, 1e-5, False)
    rec = record("add_rmsnorm", "_add_rmsnorm_kernel")
    conf = lc.LaunchConfig(**cfg)
    specs = [None] + _specs(oracle.abs().amax(), group_sizes=(128,))
    if t == 130:  # the interesting case at 130 rows: the swizzle's pad rows
        specs = [sp for sp in specs if isinstance(sp, q.NVFP4) and sp.layout == "swizzled128x4"]
    for spec in specs:
        what = f"add_rmsnorm {cfg} {t}x{h} {None if spec is None else _spec_id(spec)}"
        base, base_res = ops.add_rmsnorm(x, r, w, 1e-5, quant=spec)
        n0 = len(rec.launches)
        with lc.forced(conf):
            got, res = ops.add_rmsnorm(x, r, w, 1e-5, quant=spec)
        (grid, kw), = rec.launches[n0:]
        split = 1 if isinstance(spec, q.FP8PerToken) else cfg.get("split", 1)
        assert (kw["ROWS"], kw["SPLIT"], kw["num_warps"]) == (cfg.get("rows", 1), split, cfg["num_warps"]), what
        assert grid == (-(-t // cfg.get("rows", 1)), split), what  # real rows only (swizzle pad rows shared out)
        assert torch.equal(res.cpu(), base_res.cpu()), what
        if spec is None:
            assert_close(got.cpu(), oracle, torch.bfloat16, what)
            same = torch.equal(_bytes(got), _bytes(base))
        else:
            check_quant_close(got, oracle, what)
            same = torch.equal(_bytes(got.data), _bytes(base.data)) and torch.equal(_bytes(got.scale),
                                                                                     _bytes(base.scale))
            ref_qa, _ = ref_add_rmsnorm(x, r, w, 1e-5, quant=spec)
            diff = (_bytes(got.data) != _bytes(ref_qa.data)).float().mean().item()
            assert diff <= 0.01, f"{what}: {diff:.2%} of data bytes differ from the reference"
            if isinstance(spec, q.NVFP4) and spec.layout == "swizzled128x4":
                pad = q.unswizzle_128x4(got.scale, got.scale.shape[0], got.scale.shape[1] * 16)
                assert torch.equal(_bytes(pad[t:]), torch.zeros_like(_bytes(pad[t:]))), what + ": pad rows"
        if not ON_GPU and "split" not in cfg:
            assert same, f"{what}: a multi-row program changed the math"


@pytest.mark.parametrize("cfg", [None, dict(num_warps=2, split=2), dict(num_warps=2, rows=2)], ids=str)
def test_nvfp4_swizzled_pad_columns_and_rows(cfg, gen):
    """H/16 = 10 scale columns (padded to 12) and 3 of 128 rows: both paddings zero under every launch shape."""
    lc = _lc()
    t, h = 3, 160
    x = _hard_input(gen, t, h, torch.bfloat16)
    r = _randn(gen, t, h, dtype=torch.bfloat16)
    w = _randn(gen, h, dtype=torch.bfloat16)
    _, oracle = _oracle_norm(x, r, w, 1e-6, False)
    spec = q.NVFP4(q.nvfp4_global_scale(oracle.abs().amax().float()).to(DEVICE))
    with lc.forced(None if cfg is None else lc.LaunchConfig(**cfg)):
        qa, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
        sq = ops.silu_mul(torch.cat([x, r], 1), quant=spec)
    for got, what in ((qa, "add_rmsnorm"), (sq, "silu_mul")):
        assert got.scale.shape == (128, 12)
        full = q.unswizzle_128x4(got.scale, 128, 12 * 16)
        assert torch.equal(_bytes(full[t:]), torch.zeros_like(_bytes(full[t:]))), what + ": pad rows"
        assert torch.equal(_bytes(full[:t, 10:]), torch.zeros_like(_bytes(full[:t, 10:]))), what + ": pad columns"
        assert int((_bytes(full[:t, :10]) == 0).sum()) < 5, what + ": the real scales were written"
    check_quant_close(qa, oracle, "add_rmsnorm nvfp4 160")


def test_add_rmsnorm_inplace_never_splits(gen, record):
    lc = _lc()
    x, r, w = (_randn(gen, 2, 256, dtype=torch.bfloat16), _randn(gen, 2, 256, dtype=torch.bfloat16),
               _randn(gen, 256, dtype=torch.bfloat16))
    ref_out, ref_res = ref_add_rmsnorm(x, r, w, 1e-6)
    rec = record("add_rmsnorm", "_add_rmsnorm_kernel")
    with lc.forced(lc.LaunchConfig(num_warps=2, split=2)):
        out, res = ops.add_rmsnorm(x, r, w, 1e-6, residual_inplace=True)
        ops.add_rmsnorm(x, r.clone(), w, 1e-6)  # not in place: splits
    assert [(g, kw["SPLIT"]) for g, kw in rec.launches] == [((2, 1), 1), ((2, 2), 2)]
    assert torch.equal(r.cpu(), ref_res.cpu())
    assert_close(out.cpu(), ref_out.cpu(), torch.bfloat16, "in place", factor=0.5)


TILE_CONFIGS = [dict(num_warps=4, block=128), dict(num_warps=2, block=256, rows=2),
                dict(num_warps=4, block=512, rows=4)]


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_quantize_launch_configs_bitexact(cfg, gen, record):
    """The standalone quantizer stays byte-identical to the reference under every tiling / rows-per-program."""
    lc = _lc()
    t, h = 5, 640  # 640 = 5 x 128: the last tile of 256 / 512 is partly outside the row
    x = _hard_input(gen, t, h, torch.bfloat16)
    rec = record("quantize", "_quantize_kernel")
    for spec in _specs(x.abs().amax(), group_sizes=(64, 128)):
        with lc.forced(lc.LaunchConfig(**cfg)):
            qa = ops.quantize(x, spec)
        grid, kw = rec.launches[-1]
        block = 1024 if isinstance(spec, q.FP8PerToken) else cfg["block"]  # per-token: one whole-row tile
        assert (kw["BLOCK"], kw["ROWS"]) == (block, cfg.get("rows", 1))
        assert grid == (-(-h // block) * -(-t // cfg.get("rows", 1)),)
        _assert_quant_bitexact(qa, ref_quantize(x, spec), f"quantize {cfg} {_spec_id(spec)}")


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_silu_mul_launch_configs(cfg, gen, record):
    """SiLU*mul is elementwise (+ order-free amax): every tiling gives the default launch's bytes."""
    lc = _lc()
    t, inter = 3, 640
    x = _randn(gen, t, 2 * inter, dtype=torch.bfloat16, scale=2.0)
    rec = record("silu_mul", "_silu_mul_kernel")
    gs = torch.tensor(2.0, device=DEVICE)
    for spec in (None, q.FP8Static(torch.tensor(0.05, device=DEVICE)), q.FP8PerGroup(128), q.NVFP4(gs)):
        base = ops.silu_mul(x, quant=spec)
        with lc.forced(lc.LaunchConfig(**cfg)):
            got = ops.silu_mul(x, quant=spec)
        grid, kw = rec.launches[-1]
        assert (kw["BLOCK"], kw["ROWS"], kw["num_warps"]) == (cfg["block"], cfg.get("rows", 1), cfg["num_warps"])
        if spec is None:
            assert torch.equal(_bytes(got), _bytes(base))
        else:
            assert torch.equal(_bytes(got.data), _bytes(base.data)) and torch.equal(_bytes(got.scale),
                                                                                     _bytes(base.scale))


# --------------------------------------------------------------------------------------------------------------
# GPU only: large shapes, CUDA graphs, torch.compile


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    @pytest.mark.parametrize("h", [4096, 8192])
    @pytest.mark.parametrize("t", [1, 7, 1024, 4096])
    def test_add_rmsnorm_large(self, t, h, gen):
        x = _randn(gen, t, h, dtype=torch.bfloat16)
        r = _randn(gen, t, h, dtype=torch.bfloat16)
        w = _randn(gen, h, dtype=torch.bfloat16)
        out, res = ops.add_rmsnorm(x, r, w, 1e-6)
        ref_out, ref_res = ref_add_rmsnorm(x, r, w, 1e-6)
        assert torch.equal(res.cpu(), ref_res)
        assert_close(out.cpu(), ref_out.float(), torch.bfloat16, "large out", factor=0.5)
        ref32 = reference.rmsnorm_math(x.cpu().float() + r.cpu().float(), w.cpu(), 1e-6)
        for spec in _specs(ref32.abs().amax(), group_sizes=(128,)):
            qa, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
            check_quant_close(qa, ref32, f"large {_spec_id(spec)} {t}x{h}")

    @pytest.mark.parametrize("t,h", [(1, 4096), (333, 8192), (4096, 4096)])
    def test_quantize_bitexact_large(self, t, h, gen):
        x = _hard_input(gen, t, h, torch.bfloat16)
        for spec in _specs(x.abs().amax()):
            _assert_quant_bitexact(ops.quantize(x, spec), ref_quantize(x, spec), f"gpu quantize {_spec_id(spec)}")

    @pytest.mark.parametrize("t", [1, 64, 2048])
    def test_silu_mul_large(self, t, gen):
        x = _randn(gen, t, 2 * 14336, dtype=torch.bfloat16)
        ref32 = reference.silu_mul(x.cpu().float())
        assert_close(ops.silu_mul(x).cpu(), ref32, torch.bfloat16, "silu large")
        for spec in _specs(ref32.abs().amax(), group_sizes=(128,)):
            check_quant_close(ops.silu_mul(x, quant=spec), ref32, f"silu large {_spec_id(spec)}")

    def test_cuda_graph_capture_replay(self, gen):
        t, h, inter = 64, 4096, 1024
        x, r, w = (_randn(gen, t, h, dtype=torch.bfloat16), _randn(gen, t, h, dtype=torch.bfloat16),
                   _randn(gen, h, dtype=torch.bfloat16))
        gu = _randn(gen, t, 2 * inter, dtype=torch.bfloat16)
        scale = torch.tensor(0.05, device=DEVICE)
        gs = torch.tensor(100.0, device=DEVICE)

        def step():
            out, res = ops.add_rmsnorm(x, r, w, 1e-6, quant=q.FP8Static(scale))
            out2, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=q.NVFP4(gs))
            a = ops.silu_mul(gu, quant=q.FP8PerGroup(128))
            return out.data, res, out2.data, out2.scale, a.data, a.scale

        step()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = step()
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            gu.copy_(torch.randn_like(gu))
            scale.fill_(0.07)  # read on device: replay must see it
            g.replay()
            torch.cuda.synchronize()
            expect = step()
            for a, b in zip(outs, expect):
                assert torch.equal(_bytes(a), _bytes(b))

    def test_torch_compile_fullgraph(self, gen):
        t, h, inter = 16, 4096, 512
        x, r, w = (_randn(gen, t, h, dtype=torch.bfloat16), _randn(gen, t, h, dtype=torch.bfloat16),
                   _randn(gen, h, dtype=torch.bfloat16))
        w_up = _randn(gen, 2 * inter, h, dtype=torch.bfloat16, scale=0.02)
        scale = torch.tensor(0.02, device=DEVICE)

        def block(x, r):
            y, r2 = ops.add_rmsnorm(x, r, w, 1e-6)
            a = ops.silu_mul(y @ w_up.t(), quant=q.FP8Static(scale))
            return a.data, r2

        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)
        got, expect = compiled(x, r), block(x, r)
        assert torch.equal(_bytes(got[1]), _bytes(expect[1]))
        diff = (_bytes(got[0]) != _bytes(expect[0])).float().mean().item()
        assert diff <= 0.01
        # in-place residual under compile
        def block_inplace(x, r):
            y, _ = ops.add_rmsnorm(x, r, w, 1e-6, residual_inplace=True)
            return y
        r_a, r_b = r.clone(), r.clone()
        ya = torch.compile(block_inplace, fullgraph=True)(x, r_a)
        yb = block_inplace(x, r_b)
        assert torch.equal(r_a, r_b) and torch.equal(ya, yb)
