"""Quantize-and-store epilogue shared by tpfuse's Triton kernels (add+RMSNorm, SiLU*mul, the standalone quantizer,
and the fused all-reduce+norm kernel).

It reproduces :mod:`tpfuse.quant` bit-exactly on the same fp32 input values: reciprocals are computed once with IEEE
round-to-nearest division (``tl.math.div_rn``, not Triton's approximate ``/``), then multiplied, as written there;
NaN is propagated through every max / clamp (``propagate_nan=ALL``), never masked.

Format ids (``FMT``, a ``tl.constexpr``; also the ``fmt`` int of the ``tpfuse::*`` custom ops)
============================================================================================
=====  ============================  ===================================================================
id     format                         ``out_ptr`` / ``scale_ptr`` / ``in_scale_ptr``
=====  ============================  ===================================================================
0      none (round to out dtype)      out: ``[T, H]`` any float dtype; scale, in_scale unused
1      ``FP8Static``                  out: e4m3 ``[T, H]``; in_scale: fp32 scalar (the static scale)
2      ``FP8PerToken``                out: e4m3 ``[T, H]``; scale: fp32 ``[T, 1]`` (row stride ``scale_stride``)
3      ``FP8PerGroup(GROUP)``         out: e4m3 ``[T, H]``; scale: fp32 ``[T, H/GROUP]``
4      ``NVFP4`` linear scales        out: uint8 ``[T, H/2]`` (``out_stride`` in bytes); scale: e4m3
                                      ``[T, H/16]``; in_scale: fp32 global scale
5      ``NVFP4`` swizzled128x4        as 4, scale: e4m3 padded swizzled buffer (``sf_cols_padded`` =
                                      ``round_up(H/16, 4)``); pad must be zeroed: :func:`nvfp4_swizzled_pad`
=====  ============================  ===================================================================

Signatures (stable; every argument positional in this order)
=============================================================

``quant_store(vals, cols, mask, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded,
FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr)``

* ``vals``: fp32 ``[BLOCK]`` tile of one row; masked-off lanes are forced to 0 here (so they never reach a
  reduction) and never stored;
* ``cols``: int ``[BLOCK]`` column index of each lane inside the row, ``cols = col_start + tl.arange(0, BLOCK)``;
  ``col_start`` must be a multiple of ``GROUP`` (FMT 3) / 16 (FMT 4, 5); for FMT 2 the tile must cover the whole
  row (``col_start == 0`` and ``BLOCK >= H``) because the scale is the row's amax;
* ``mask``: bool ``[BLOCK]``, ``cols < H``;
* ``row``: the row (token) index (scalar int);
* ``out_stride``: row stride of ``out_ptr`` in elements (bytes for NVFP4, i.e. ``H/2`` when contiguous);
* ``scale_stride``: row stride of the output scale in elements (FMT 2: 1, FMT 3: ``H/GROUP``, FMT 4: ``H/16``;
  ignored by 0, 1, 5);
* ``in_scale_ptr``: pointer to the fp32 scalar static scale (FMT 1) or NVFP4 global scale (FMT 4, 5);
  pass any pointer otherwise;
* ``sf_cols_padded``: ``round_up(H/16, 4)`` for FMT 5, anything otherwise;
* ``BLOCK``: power of two, a multiple of ``GROUP`` (FMT 3) or of 16 (FMT 4, 5); ``GROUP``: the FP8 group size
  (64 or 128) for FMT 3, anything (e.g. 16) otherwise.

``nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK: tl.constexpr)``

Writes the zero padding of a swizzled NVFP4 scale buffer for one padded row ``row`` (``0 <= row <
round_up(n_rows, 128)``): columns ``[n_sf_cols, sf_cols_padded)`` when ``row < n_rows``, every column when
``row >= n_rows``. ``n_sf_cols = H/16``; ``PAD_BLOCK`` = ``next_power_of_2(sf_cols_padded)``. A kernel that emits
FMT 5 launches ``round_up(T, 128)`` row programs (or loops) so that every padded row gets this call once.

``rmsnorm_quant_store(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, res_out_stride, out_ptr, out_stride,
scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, GEMMA, FMT, BLOCK, GROUP)``: the residual-out + RMSNorm +
quant_store tail shared by the add+RMSNorm kernels (local, SP reduce, fused all-reduce).

``fp8_dynamic_scale(amax)``, ``max_nan(a, b)``, ``row_amax(x)``: small helpers (NaN-propagating max reduction).
"""

import os

import triton
import triton.language as tl

# Under the Triton CPU interpreter (TRITON_INTERPRET=1 when this module is imported) casts to e4m3 / bf16 are done
# by explicit integer rounding, because the interpreter's own casts are not round-to-nearest-even.
SOFT_CAST: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

FMT_NONE = 0
FMT_FP8_STATIC = 1
FMT_FP8_PER_TOKEN = 2
FMT_FP8_PER_GROUP = 3
FMT_NVFP4_LINEAR = 4
FMT_NVFP4_SWIZZLED = 5

FP8_MAX = 448.0
FP8_MIN_SCALE = 1.0 / (448.0 * 512.0)


@triton.jit
def max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_amax(x, axis: tl.constexpr):
    """``max(|x|)`` along ``axis``, NaN if any element is NaN (Triton's tl.max would drop it)."""
    return tl.reduce(tl.abs(x), axis, max_nan)


@triton.jit
def fp8_dynamic_scale(amax):
    # max(amax / 448, 1 / (448 * 512)); NaN amax -> NaN scale
    return tl.maximum(tl.math.div_rn(amax, 448.0), 1.0 / (448.0 * 512.0), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def fp8_round(v):
    """Round fp32 ``v`` (``|v| <= 448`` or NaN) to the nearest-even e4m3 value, still in fp32 (interpreter path)."""
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # keep 3 mantissa bits, RNE
    a = tl.abs(v)
    sub = (a + 16384.0) - 16384.0  # ulp(16384) = 2^-9 = e4m3 subnormal step: RNE onto the subnormal grid
    sub = (sub.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)  # keep the sign (-0)
    return tl.where(a < 0.015625, sub, tl.where(v != v, v, normal))


@triton.jit
def fp8_encode_exact(r):
    """e4m3 bits of an fp32 ``r`` already on the e4m3 grid (``|r| <= 448`` or NaN), by integer ops."""
    bits = r.to(tl.int32, bitcast=True)
    a = tl.abs(r)
    sign = (bits >> 24) & 0x80
    sub = (tl.where(a < 0.015625, a, 0.0) * 512.0).to(tl.int32)  # exact: a multiple of 2^-9 below 2^-6
    nrm = ((((bits >> 23) & 0xFF) - 120) << 3) | ((bits >> 20) & 7)
    code = tl.where(a < 0.015625, sub, nrm)
    code = tl.where(r != r, 0x7F, code | sign)
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def to_fp8(c):
    """fp32 ``c`` (already clamped to +-448, or NaN) -> e4m3, round to nearest even. Compiled: the hardware cast
    (cvt.rn). Interpreter: explicit rounding + integer encoding, because the Triton 3.6 CPU interpreter's cast
    mis-rounds at binade edges (31.4 -> 16), drops the sign of -0 and turns NaN into 384."""
    if SOFT_CAST:
        return fp8_encode_exact(fp8_round(c))
    else:
        return c.to(tl.float8e4nv)


@triton.jit
def fp8_cast(v):
    # clamp keeps NaN, saturates +-Inf; then round to nearest even
    c = tl.minimum(tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    return to_fp8(c)


@triton.jit
def cast_for_store(v, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even (interpreter: bf16 rounding done explicitly, its cast
    truncates)."""
    if SOFT_CAST and dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return tl.where(v != v, v, r).to(dtype)
    else:
        return v.to(dtype)


@triton.jit
def e2m1_encode(v):
    """fp32 -> e2m1 code (uint8 0..15) by the comparisons of :func:`tpfuse.quant.e2m1_encode`; NaN -> 7."""
    mag = tl.abs(v)
    code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
            + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
            + (mag > 5.0).to(tl.int32))
    isnan = v != v
    code = tl.where(isnan, 7, code)
    neg = (v.to(tl.int32, bitcast=True) < 0) & (~isnan)
    code = code | tl.where(neg, 8, 0)
    return code.to(tl.uint8)


@triton.jit
def quant_store(vals, cols, mask, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded,
                FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    row64 = row.to(tl.int64)
    vals = tl.where(mask, vals, 0.0)
    if FMT == 0:
        tl.store(out_ptr + row64 * out_stride + cols, cast_for_store(vals, out_ptr.dtype.element_ty), mask=mask)
    elif FMT == 1:
        inv = tl.math.div_rn(1.0, tl.load(in_scale_ptr))
        tl.store(out_ptr + row64 * out_stride + cols, fp8_cast(vals * inv), mask=mask)
    elif FMT == 2:
        scale = fp8_dynamic_scale(row_amax(vals, 0))
        inv = tl.math.div_rn(1.0, scale)
        tl.store(out_ptr + row64 * out_stride + cols, fp8_cast(vals * inv), mask=mask)
        tl.store(scale_ptr + row64 * scale_stride, scale)
    elif FMT == 3:
        NG: tl.constexpr = BLOCK // GROUP
        v2 = tl.reshape(vals, (NG, GROUP))
        scale = fp8_dynamic_scale(row_amax(v2, 1))  # [NG]
        inv = tl.math.div_rn(tl.full((NG,), 1.0, tl.float32), scale)
        q = tl.reshape(fp8_cast(v2 * inv[:, None]), (BLOCK,))
        tl.store(out_ptr + row64 * out_stride + cols, q, mask=mask)
        c2 = tl.reshape(cols, (NG, GROUP))
        gcol = tl.min(c2, 1) // GROUP
        gmask = tl.max(tl.reshape(mask.to(tl.int32), (NG, GROUP)), 1) > 0
        tl.store(scale_ptr + row64 * scale_stride + gcol, scale, mask=gmask)
    else:
        NB: tl.constexpr = BLOCK // 16
        gs = tl.load(in_scale_ptr)
        v2 = tl.reshape(vals, (NB, 16))
        amax = row_amax(v2, 1)  # [NB]
        sf_f32 = gs * (amax * (1.0 / 6.0))
        sf_c = tl.minimum(sf_f32, 448.0, propagate_nan=tl.PropagateNan.ALL)
        if SOFT_CAST:  # the interpreter's e4m3 -> fp32 decode is not trusted either (see to_fp8)
            sf_f = fp8_round(sf_c)
            sf = fp8_encode_exact(sf_f)
        else:
            sf = sf_c.to(tl.float8e4nv)
            sf_f = sf.to(tl.float32)
        inv_gs = tl.math.div_rn(1.0, gs)
        out_scale = tl.where(sf_f != 0, tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), sf_f * inv_gs), 0.0)
        codes = e2m1_encode(v2 * out_scale[:, None])  # [NB, 16] uint8
        pairs = tl.reshape(codes, (BLOCK // 2, 2))
        lo, hi = tl.split(pairs)
        packed = lo | (hi << 4)
        c_pairs = tl.reshape(cols, (BLOCK // 2, 2))
        c_even, c_odd = tl.split(c_pairs)
        m_pairs = tl.reshape(mask.to(tl.int32), (BLOCK // 2, 2))
        m_even, m_odd = tl.split(m_pairs)
        tl.store(out_ptr + row64 * out_stride + c_even // 2, packed, mask=m_even > 0)
        c2 = tl.reshape(cols, (NB, 16))
        k = tl.min(c2, 1) // 16
        kmask = tl.max(tl.reshape(mask.to(tl.int32), (NB, 16)), 1) > 0
        if FMT == 4:
            tl.store(scale_ptr + row64 * scale_stride + k, sf, mask=kmask)
        else:
            m = row64
            k_tiles = sf_cols_padded // 4
            off = ((m // 128) * (k_tiles * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4))
            tl.store(scale_ptr + off, sf, mask=kmask)


@triton.jit
def rmsnorm_quant_store(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, res_out_stride, out_ptr, out_stride,
                        scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, GEMMA: tl.constexpr, FMT: tl.constexpr,
                        BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """The tail every add+RMSNorm kernel shares (:mod:`tpfuse.reference` contract): store ``residual_out = s``
    rounded to its dtype; ``out = s * rsqrt(mean(s^2) + eps) * w`` (``w + 1`` when ``GEMMA``; the weight upcast from
    its own dtype) through :func:`quant_store`. ``s``: the fp32 row (masked lanes 0), ``n_cols``: H."""
    row64 = row.to(tl.int64)
    tl.store(res_out_ptr + row64 * res_out_stride + cols, cast_for_store(s, res_out_ptr.dtype.element_ty), mask=mask)
    var = tl.sum(s * s, 0) / n_cols
    rstd = tl.math.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    quant_store((s * rstd) * w, cols, mask, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                sf_cols_padded, FMT, BLOCK, GROUP)


@triton.jit
def nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK: tl.constexpr):
    m = row.to(tl.int64)
    k = tl.arange(0, PAD_BLOCK)
    start = tl.where(row < n_rows, n_sf_cols, 0)
    kmask = (k >= start) & (k < sf_cols_padded)
    k_tiles = sf_cols_padded // 4
    off = ((m // 128) * (k_tiles * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4))
    zero = tl.zeros((PAD_BLOCK,), tl.float32).to(tl.float8e4nv)
    tl.store(scale_ptr + off, zero, mask=kmask)


# --------------------------------------------------------------------------------------------------------------
# host-side helpers for launchers (plain Python)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def epilogue_args(fmt: int, hidden: int, data, scale, in_scale):
    """``(out_stride, scale, scale_stride, in_scale, n_sf_cols, sf_cols_padded)`` for a launcher writing
    ``data``/``scale`` (tensors allocated by :func:`tpfuse.quant.empty_like_quantized` or a plain output for FMT 0).
    ``in_scale`` (static FP8 scale / NVFP4 global scale) may be None for formats that do not read it; ``data`` is
    then passed as the dummy pointer."""
    out_stride = data.stride(0)
    n_sf_cols = hidden // 16
    sf_cols_padded = (n_sf_cols + 3) // 4 * 4
    if fmt in (FMT_FP8_PER_TOKEN, FMT_FP8_PER_GROUP, FMT_NVFP4_LINEAR):
        scale_stride = scale.stride(0)
    else:
        scale_stride = 0
    if fmt in (FMT_NONE, FMT_FP8_STATIC):
        scale = data
    if in_scale is None:
        in_scale = data
    return out_stride, scale, scale_stride, in_scale, n_sf_cols, sf_cols_padded


def padded_rows(fmt: int, rows: int) -> int:
    """Row programs a launcher needs: ``round_up(rows, 128)`` for swizzled NVFP4 (pad rows), else ``rows``."""
    return (rows + 127) // 128 * 128 if fmt == FMT_NVFP4_SWIZZLED else rows
