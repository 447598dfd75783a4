"""Quantize-and-store epilogue shared by tpfuse's Triton kernels (add+RMSNorm, SiLU*mul, the standalone quantizer,
and the fused all-reduce+norm kernel).

It reproduces :mod:`tpfuse.quant` bit-exactly on the same fp32 input values: reciprocals are computed once with IEEE
round-to-nearest division (``tl.math.div_rn``, not Triton's approximate ``/``), then multiplied, as written there;
NaN is propagated through every max / clamp (``propagate_nan=ALL``), never masked.

Format ids (``FMT``, a ``tl.constexpr``: a :class:`tpfuse.quant.QuantFormat`, here also as constexprs ``FMT_*``)
============================================================================================================
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

``quant_store_tile(vals, col0, n_cols, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
sf_cols_padded, FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr)`` (what the kernels call)

* ``vals``: fp32 ``[BLOCK]`` tile of one row, lane ``i`` = column ``col0 + i``; lanes at or past ``n_cols`` are
  never stored, and for FMT 0-3 forced to 0 here (so they never reach a reduction); NVFP4 needs no mask there:
  its 16-blocks lie wholly before or wholly past ``n_cols``, so a masked lane only reaches unstored results;
* ``col0``: the tile's first column (scalar), a multiple of ``GROUP`` (FMT 3) / 16 (FMT 4, 5); for FMT 2 the tile
  must cover the whole row (``col0 == 0`` and ``BLOCK >= H``) because the scale is the row's amax;
* ``n_cols``: H (scalar);
* ``row``: the row (token) index (scalar int);
* ``out_stride``: row stride of ``out_ptr`` in elements (bytes for NVFP4, i.e. ``H/2`` when contiguous);
* ``scale_stride``: row stride of the output scale in elements (FMT 2: 1, FMT 3: ``H/GROUP``, FMT 4: ``H/16``;
  ignored by 0, 1, 5);
* ``in_scale_ptr``: pointer to the fp32 scalar static scale (FMT 1) or NVFP4 global scale (FMT 4, 5);
  pass any pointer otherwise;
* ``sf_cols_padded``: ``round_up(H/16, 4)`` for FMT 5, anything otherwise;
* ``BLOCK``: power of two, a multiple of ``GROUP`` (FMT 3) or of 16 (FMT 4, 5); ``GROUP``: the FP8 group size
  (64 or 128) for FMT 3, anything (e.g. 16) otherwise.

``quant_store(vals, cols, mask, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded,
FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr)``: the older form (``cols = col0 + tl.arange(0,
BLOCK)``, ``mask = cols < H``); it recovers ``col0`` / ``H`` with two block reductions and calls
:func:`quant_store_tile`. Kept for callers outside this package; the kernels here use the tile form.

``nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK: tl.constexpr)``

Writes the zero padding of a swizzled NVFP4 scale buffer for one padded row ``row`` (``0 <= row <
round_up(n_rows, 128)``): columns ``[n_sf_cols, sf_cols_padded)`` when ``row < n_rows``, every column when
``row >= n_rows``. ``n_sf_cols = H/16``; ``PAD_BLOCK`` = ``next_power_of_2(sf_cols_padded)``. A kernel that emits
FMT 5 launches ``round_up(T, 128)`` row programs (or loops) so that every padded row gets this call once, or calls
it for its real rows and shares the pad rows out with ``nvfp4_pad_rows(prog, n_progs, n_rows, scale_ptr,
sf_cols_padded)`` (the local kernels).

``rmsnorm_quant_store(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, res_out_stride, out_ptr, out_stride,
scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, GEMMA, FMT, BLOCK, GROUP)``: the residual-out + RMSNorm +
quant tail shared by the add+RMSNorm kernels (local, SP reduce, fused all-reduce); ``s`` is the whole row, so
``cols`` must be ``tl.arange(0, BLOCK)`` (``BLOCK >= H``) and ``mask = cols < H``. Built from
``load_norm_weight(w_ptr, cols, mask, GEMMA)`` (the fp32 weight, ``+1`` for Gemma: a kernel handling several rows
loads it once), ``rms_rstd(s, n_cols, eps)`` (= ``rstd_from_sumsq(sum(s^2), n_cols, eps)``) and
``norm_quant_store(s, w, rstd, col0, n_cols, row, ...)`` (store ``residual_out`` and the quantized ``s * rstd * w``
of one tile), which the split-row kernel uses directly.

Performance notes (Hopper; checked on the SASS of the sm_90 compile, see bench/bench_local.py ``--sweep-configs``)
---------------------------------------------------------------------------------------------------------------
* Per-group / per-block indices come from ``col0 + tl.arange`` in the reduced shape, never from reducing the
  ``cols`` tensor: that reduction ran in a layout of its own, through shared memory and barriers (it was most of
  the FP8 group and NVFP4 epilogue cost).
* Byte-wide stores (e4m3, packed e2m1) cap the offsets' provable contiguity (:func:`cap_contiguity`) so they keep
  the 8-values-per-thread register layout of the 16-byte bf16 loads (8-byte / 4-byte stores) instead of a
  shared-memory layout conversion to 16 values per thread.
* e2m1 encoding (:func:`e2m1_pack`), bit-identical to the comparison chain of :func:`tpfuse.quant.e2m1_encode`
  over all 2^32 fp32 inputs: the interpreter keeps :func:`e2m1_code32` (explicit NaN test: numpy keeps NaN
  signs); compiled code rounds with one FFMA per element and takes the sign from the input's sign bit (GPU fp32
  arithmetic only makes the positive canonical NaN), 8 values at a time in inline PTX (:func:`_nvfp4_pack8_ptx`:
  FMNMX, VIMNMX, LOP3, FFMA, LEA.HI per element, then LEA / PRMT byte gathers for the packing and the signs,
  about 7 instructions per element against about 17 for the bit tricks of :func:`e2m1_code32`), or per element
  (:func:`e2m1_code_hw`) where a thread holds fewer than 8 values.

``fp8_dynamic_scale(amax)``, ``max_nan(a, b)``, ``row_amax(x)``: small helpers (NaN-propagating max reduction).
``swizzled_offset(m, k, sf_cols_padded, K_SUM_I32)``: the SWIZZLED_128x4 offset (every kernel's one formula).

Host side (launchers): :func:`epilogue_args` -> :class:`EpilogueArgs` (the pointer / stride / size arguments of
one output), :func:`padded_rows`, :func:`launch_row_tiles` (the tiled SiLU*mul and quantize kernels).
"""

import os
from typing import NamedTuple

import triton
import triton.language as tl

from .. import quant as _quant
from ..quant import QuantFormat, next_pow2

# Under the Triton CPU interpreter (TRITON_INTERPRET=1 when this module is imported) casts to e4m3 / bf16 are done
# by explicit integer rounding, because the interpreter's own casts are not round-to-nearest-even.
SOFT_CAST: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# the format ids (tpfuse.quant.QuantFormat) and FP8 constants (tpfuse.quant) as constexprs for the kernels
FMT_NONE: tl.constexpr = tl.constexpr(int(QuantFormat.NONE))
FMT_FP8_STATIC: tl.constexpr = tl.constexpr(int(QuantFormat.FP8_STATIC))
FMT_FP8_PER_TOKEN: tl.constexpr = tl.constexpr(int(QuantFormat.FP8_PER_TOKEN))
FMT_FP8_PER_GROUP: tl.constexpr = tl.constexpr(int(QuantFormat.FP8_PER_GROUP))
FMT_NVFP4_LINEAR: tl.constexpr = tl.constexpr(int(QuantFormat.NVFP4_LINEAR))
FMT_NVFP4_SWIZZLED: tl.constexpr = tl.constexpr(int(QuantFormat.NVFP4_SWIZZLED))
FP8_MAX: tl.constexpr = tl.constexpr(_quant.FP8_MAX)
FP8_MIN_SCALE: tl.constexpr = tl.constexpr(_quant.FP8_MIN_SCALE)


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
    return tl.maximum(tl.math.div_rn(amax, FP8_MAX), FP8_MIN_SCALE, propagate_nan=tl.PropagateNan.ALL)


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
    c = tl.minimum(tl.maximum(v, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL), FP8_MAX,
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
def e2m1_code32(v):
    """fp32 -> e2m1 code (0..15) as uint32, bit-identical to :func:`tpfuse.quant.e2m1_encode` (round to nearest
    even, saturate at 6, NaN -> 7, sign bit 3 from the sign of ``v`` incl. -0 but not for NaN), checked
    exhaustively over all 2^32 fp32 bit patterns. Below 1 the e2m1 grid is 0, 0.5, 1: ``2|v| + 2^23`` rounds (RNE)
    to the integer code in its low bits. From 1 up the grid is a float with one mantissa bit: round the fp32 bits
    to one mantissa bit (RNE, bit 22); ``(bits >> 22) - 252`` is then the code, capped at 7, which also catches
    Inf and NaN. The ``- 252`` is folded in as ``+ 4`` (mod 8) ahead of the shift; the sign is set for every
    ``v`` whose bits, as unsigned, lie in ``[0x80000000, 0xFF800000]`` (negative, -0 and -Inf included, NaN not)."""
    a = tl.abs(v)
    bits = a.to(tl.uint32, bitcast=True)
    sub = (a * 2.0 + 8388608.0).to(tl.uint32, bitcast=True) & 3
    nrm = tl.minimum((bits + (0x1FFFFF + (4 << 22)) + ((bits >> 22) & 1)) >> 22, 263) & 7
    code = tl.where(a < 1.0, sub, nrm)
    vb = v.to(tl.uint32, bitcast=True)
    return code | tl.where(vb - 0x80000000 <= 0x7F800000, 8, 0).to(tl.uint32)


@triton.jit
def e2m1_code_hw(q):
    """fp32 -> e2m1 code nibble in bits 0..3 of the uint32 result (bits 4..7 are 0, higher bits garbage): the
    compiled twin of :func:`e2m1_code32`, for ``q`` made by a GPU float operation (the epilogue's ``x *
    out_scale``), whose NaN is the canonical 0x7FFFFFFF: the sign bit of ``q`` is then the reference sign (set for
    negatives, -0 and -Inf, never for NaN) without a NaN test.

    ``a = min(|q|, 6)`` (``min.f32`` returns 6 for NaN: code 7, as for Inf). With ``e' = max(exponent(a), 0)``
    (0, 1 or 2) the e2m1 step at ``a`` is ``2^(e'-1)``, so ``n = rne(a * 2^(1-e'))`` (0..4) is one FFMA against
    ``2^23`` (a single rounding of the exact product, ties to even) and the code is ``n + 2e'``. The scale
    ``sc = 2^(1-e')`` has bits ``~max(bits(a), bits(1.0)) & 0x7F800000`` and ``sc >> 22 = 256 - 2e'``, so the low
    byte of ``bits(fma) - (sc >> 22)`` is the code. Checked against :func:`tpfuse.quant.e2m1_encode` over all
    2^32 fp32 inputs (NaN taken as the canonical, positive NaN)."""
    a = tl.minimum(tl.abs(q), 6.0)
    sc = ~tl.maximum(a.to(tl.uint32, bitcast=True), 0x3F800000) & 0x7F800000
    f = tl.fma(a, sc.to(tl.float32, bitcast=True), 8388608.0).to(tl.uint32, bitcast=True)
    return (f - (sc >> 22)) | ((q.to(tl.uint32, bitcast=True) >> 28) & 8)


def _nvfp4_pack8_ptx():
    """PTX of :func:`e2m1_pack` for 8 values (``$1..$4``: elements 0, 2, 4, 6, ``$5..$8``: elements 1, 3, 5, 7)
    -> one 32-bit word of 4 bytes (``$0``). The magnitude is :func:`e2m1_code_hw`'s, with the FFMA negated: ``f =
    fma(-a, sc, 2^23 + K)`` has bits ``0x4B000000 + K - n`` (``K`` even: ``rne(K - x) = K - rne(x)``), so ``f +
    (sc >> 22)`` (one LEA.HI) has low byte ``K - code``. With ``K = 30`` for the even and ``14`` for the odd
    element, ``u + 16 v`` has low byte ``254 - byte`` (``byte = code_even + 16 code_odd``, at most 119: no carry
    out of the byte), so after gathering the 4 low bytes (PRMT) one ``0xFEFEFEFE - word`` (no borrows) gives the
    4 magnitude bytes. Signs (bit 3 and bit 7 of each byte) come from the sign bits of the inputs gathered by
    PRMT (sign-replicating selectors for bit 3), as in :func:`e2m1_code_hw`: the inputs must not be negative
    NaNs (GPU arithmetic never makes one)."""
    lines = ["{", ".reg .b32 a, s, f, u, v, w0, w1, w2, w3, x, y, z;"]

    def code(src, k, dst):
        lines.extend([
            f"abs.f32 a, {src};", "min.f32 a, a, 0f40C00000;", "max.u32 s, a, 0x3F800000;",
            "and.b32 s, s, 0x7F800000;", "xor.b32 s, s, 0x7F800000;", "neg.f32 a, a;",
            f"fma.rn.f32 f, a, s, 0f{0x4B000000 + k:08X};", "shr.u32 s, s, 22;", f"add.u32 {dst}, f, s;"])

    for i in range(4):
        code(f"${1 + i}", 30, "u")
        code(f"${5 + i}", 14, "v")
        lines.extend(["shl.b32 v, v, 4;", f"add.u32 w{i}, u, v;"])
    lines.extend([
        "prmt.b32 x, w0, w1, 0x0040;", "prmt.b32 y, w2, w3, 0x4000;", "prmt.b32 x, x, y, 0x7610;",
        "mov.b32 y, 0xFEFEFEFE;", "sub.u32 x, y, x;",
        "prmt.b32 y, $1, $2, 0x00FB;", "prmt.b32 z, $3, $4, 0xFB00;", "prmt.b32 y, y, z, 0x7610;",
        "and.b32 y, y, 0x08080808;", "or.b32 x, x, y;",
        "prmt.b32 y, $5, $6, 0x0073;", "prmt.b32 z, $7, $8, 0x7300;", "prmt.b32 y, y, z, 0x7610;",
        "and.b32 y, y, 0x80808080;", "or.b32 $0, x, y;", "}"])
    return "\n".join(lines)


NVFP4_PACK8_PTX: tl.constexpr = tl.constexpr(_nvfp4_pack8_ptx())


@triton.jit
def e2m1_pack(q, BLOCK: tl.constexpr):
    """fp32 ``[BLOCK // 16, 16]`` (or any shape of ``BLOCK`` elements, row-major) -> ``BLOCK // 2`` bytes of packed
    e2m1 codes, element ``2i`` in the low nibble of byte ``i``. Interpreter: :func:`e2m1_code32` (exact for any
    input). Compiled: for ``q`` made by GPU arithmetic (no negative NaN, see :func:`e2m1_code_hw`); the PTX of
    :func:`_nvfp4_pack8_ptx` 8 values at a time when every thread holds at least 8 (else Triton would convert
    the layout through shared memory to give each thread 4 pairs), :func:`e2m1_code_hw` per element otherwise."""
    lo, hi = tl.split(tl.reshape(q, (BLOCK // 2, 2)))
    if SOFT_CAST:
        return (e2m1_code32(lo) | (e2m1_code32(hi) << 4)).to(tl.uint8)
    elif BLOCK >= 256 * tl.extra.cuda.num_warps():
        return tl.inline_asm_elementwise(NVFP4_PACK8_PTX, "=r,r,r,r,r,r,r,r,r", [lo, hi], dtype=tl.uint8,
                                         is_pure=True, pack=4)
    else:
        return (e2m1_code_hw(lo) + (e2m1_code_hw(hi) << 4)).to(tl.uint8)


@triton.jit
def e2m1_encode(v):
    """:func:`e2m1_code32` as uint8."""
    return e2m1_code32(v).to(tl.uint8)


@triton.jit
def cap_contiguity(offs, V: tl.constexpr):
    """``offs`` unchanged in value, but Triton's axis analysis proves only ``V``-long contiguous runs, so a store
    through it is vectorized ``V`` wide. Used on byte-wide outputs: without it the coalescing pass gives their
    store 16 values per thread while the 16-byte bf16 loads give 8, and the kernel converts between the two
    register layouts through shared memory (with barriers)."""
    return (offs // V) * V + offs % V


@triton.jit
def swizzled_offset(m, k, sf_cols_padded, K_SUM_I32: tl.constexpr):
    """Flat offset of scale ``(m, k)`` (row ``m``: int64; scale column ``k``: int32) in the SWIZZLED_128x4 layout,
    the formula of :func:`tpfuse.quant.swizzled_offset` (``sf_cols_padded = round_up(H/16, 4)``).

    ``K_SUM_I32`` picks the evaluation order, which changes the generated code (not the value, for any real
    size): True sums the two column terms in int32 and widens once (the quantizing epilogue), False widens each
    term (the pad writer and the two-shot gather). Both orders are kept so that every kernel's PTX stays the
    one run on GPUs (tests/sm90_ptx_fingerprints.txt); settle on one when those kernels are next re-run there."""
    tile_base = (m // 128) * ((sf_cols_padded // 4) * 512)
    if K_SUM_I32:
        return tile_base + (m % 32) * 16 + ((m % 128) // 32) * 4 + ((k // 4) * 512 + (k % 4))
    else:
        return tile_base + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)


@triton.jit
def quant_store_tile(vals, col0, n_cols, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                     sf_cols_padded, FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    row64 = row.to(tl.int64)
    lane = tl.arange(0, BLOCK)
    cols = col0 + lane
    mask = cols < n_cols
    if FMT < FMT_NVFP4_LINEAR:  # NVFP4 blocks lie wholly inside or past the row: masked lanes reach no stored reduction
        vals = tl.where(mask, vals, 0.0)
    out_row = out_ptr + row64 * out_stride
    if FMT == FMT_NONE:
        tl.store(out_row + cols, cast_for_store(vals, out_ptr.dtype.element_ty), mask=mask)
    elif FMT == FMT_FP8_STATIC:
        inv = tl.math.div_rn(1.0, tl.load(in_scale_ptr))
        tl.store(out_row + col0 + cap_contiguity(lane, 8), fp8_cast(vals * inv), mask=mask)
    elif FMT == FMT_FP8_PER_TOKEN:
        scale = fp8_dynamic_scale(row_amax(vals, 0))
        inv = tl.math.div_rn(1.0, scale)
        tl.store(out_row + col0 + cap_contiguity(lane, 8), fp8_cast(vals * inv), mask=mask)
        tl.store(scale_ptr + row64 * scale_stride, scale)
    elif FMT == FMT_FP8_PER_GROUP:
        NG: tl.constexpr = BLOCK // GROUP
        v2 = tl.reshape(vals, (NG, GROUP))
        scale = fp8_dynamic_scale(row_amax(v2, 1))  # [NG]
        inv = tl.math.div_rn(tl.full((NG,), 1.0, tl.float32), scale)
        q = tl.reshape(fp8_cast(v2 * inv[:, None]), (BLOCK,))
        tl.store(out_row + col0 + cap_contiguity(lane, 8), q, mask=mask)
        g = col0 // GROUP + tl.arange(0, NG)
        tl.store(scale_ptr + row64 * scale_stride + g, scale, mask=g * GROUP < n_cols)
    else:
        NB: tl.constexpr = BLOCK // 16
        gs = tl.load(in_scale_ptr)
        v2 = tl.reshape(vals, (NB, 16))
        amax = row_amax(v2, 1)  # [NB]
        sf_f32 = gs * (amax * (1.0 / 6.0))
        sf_c = tl.minimum(sf_f32, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        if SOFT_CAST:  # the interpreter's e4m3 -> fp32 decode is not trusted either (see to_fp8)
            sf_f = fp8_round(sf_c)
            sf = fp8_encode_exact(sf_f)
        else:
            sf = sf_c.to(tl.float8e4nv)
            sf_f = sf.to(tl.float32)
        inv_gs = tl.math.div_rn(1.0, gs)
        out_scale = tl.where(sf_f != 0, tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), sf_f * inv_gs), 0.0)
        packed = e2m1_pack(v2 * out_scale[:, None], BLOCK)  # element 2i in the low nibble
        pcol = col0 // 2 + cap_contiguity(tl.arange(0, BLOCK // 2), 4)
        tl.store(out_row + pcol, packed, mask=pcol < n_cols // 2)
        k = col0 // 16 + tl.arange(0, NB)
        kmask = k * 16 < n_cols
        if FMT == FMT_NVFP4_LINEAR:
            tl.store(scale_ptr + row64 * scale_stride + k, sf, mask=kmask)
        else:
            tl.store(scale_ptr + swizzled_offset(row64, k, sf_cols_padded, True), sf, mask=kmask)


@triton.jit
def quant_store(vals, cols, mask, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded,
                FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    col0 = tl.min(cols, 0)
    n_cols = tl.max(tl.where(mask, cols + 1, 0), 0)  # H, or past the tile's end: masks agree inside the tile
    quant_store_tile(vals, col0, n_cols, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                     sf_cols_padded, FMT, BLOCK, GROUP)


@triton.jit
def row_tile(n_tiles, n_cols, BLOCK: tl.constexpr):
    """``(pid, tile, col0, cols, mask)`` of a program of the tiled row kernels (:func:`launch_row_tiles`: tile
    index fastest)."""
    pid = tl.program_id(0)
    tile = pid % n_tiles
    c0 = tile * BLOCK
    cols = c0 + tl.arange(0, BLOCK)
    return pid, tile, c0, cols, cols < n_cols


@triton.jit
def quant_store_row_tile(vals, col0, tile, n_cols, row, n_rows, out_ptr, out_stride, scale_ptr, scale_stride,
                         in_scale_ptr, n_sf_cols, sf_cols_padded, FMT: tl.constexpr, BLOCK: tl.constexpr,
                         GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr):
    """:func:`quant_store_tile` of one tile of a row; for swizzled NVFP4 the tile-0 program also zeroes the row's
    scale pad columns (H/16 not a multiple of 4)."""
    quant_store_tile(vals, col0, n_cols, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                     sf_cols_padded, FMT, BLOCK, GROUP)
    if FMT == FMT_NVFP4_SWIZZLED:
        if (tile == 0) & (n_sf_cols < sf_cols_padded):
            nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)


@triton.jit
def load_norm_weight(w_ptr, cols, mask, GEMMA: tl.constexpr):
    """The RMSNorm weight as fp32 (read in its own dtype), ``+ 1`` for Gemma."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    return w


@triton.jit
def rstd_from_sumsq(sumsq, n_cols, eps):
    return tl.math.rsqrt(sumsq / n_cols + eps)


@triton.jit
def rms_rstd(s, n_cols, eps):
    """``rsqrt(mean(s^2) + eps)`` of a whole fp32 row ``s`` (masked lanes 0)."""
    return rstd_from_sumsq(tl.sum(s * s, 0), n_cols, eps)


@triton.jit
def norm_quant_store(s, w, rstd, col0, n_cols, row, res_out_ptr, res_out_stride, out_ptr, out_stride, scale_ptr,
                     scale_stride, in_scale_ptr, sf_cols_padded, FMT: tl.constexpr, BLOCK: tl.constexpr,
                     GROUP: tl.constexpr):
    """One tile (columns ``col0 + [0, BLOCK)``) of the norm tail: ``residual_out = s`` rounded, then
    ``(s * rstd) * w`` through :func:`quant_store_tile`."""
    cols = col0 + tl.arange(0, BLOCK)
    mask = cols < n_cols
    row64 = row.to(tl.int64)
    tl.store(res_out_ptr + row64 * res_out_stride + cols, cast_for_store(s, res_out_ptr.dtype.element_ty), mask=mask)
    quant_store_tile((s * rstd) * w, col0, n_cols, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                     sf_cols_padded, FMT, BLOCK, GROUP)


@triton.jit
def rmsnorm_quant_store(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, res_out_stride, out_ptr, out_stride,
                        scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, GEMMA: tl.constexpr, FMT: tl.constexpr,
                        BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """The tail every add+RMSNorm kernel shares (:mod:`tpfuse.reference` contract): store ``residual_out = s``
    rounded to its dtype; ``out = s * rsqrt(mean(s^2) + eps) * w`` (``w + 1`` when ``GEMMA``; the weight upcast from
    its own dtype) through :func:`quant_store_tile`. ``s``: the fp32 row (masked lanes 0), ``cols``:
    ``tl.arange(0, BLOCK)``, ``n_cols``: H. The weight is loaded first so that its latency overlaps the row's
    loads and the reduction instead of following them."""
    w = load_norm_weight(w_ptr, cols, mask, GEMMA)
    rstd = rms_rstd(s, n_cols, eps)
    norm_quant_store(s, w, rstd, 0, n_cols, row, res_out_ptr, res_out_stride, out_ptr, out_stride, scale_ptr,
                     scale_stride, in_scale_ptr, sf_cols_padded, FMT, BLOCK, GROUP)


@triton.jit
def nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK: tl.constexpr):
    k = tl.arange(0, PAD_BLOCK)
    start = tl.where(row < n_rows, n_sf_cols, 0)
    kmask = (k >= start) & (k < sf_cols_padded)
    zero = tl.zeros((PAD_BLOCK,), tl.float32).to(tl.float8e4nv)
    tl.store(scale_ptr + swizzled_offset(row.to(tl.int64), k, sf_cols_padded, False), zero, mask=kmask)


@triton.jit
def nvfp4_pad_rows(prog, n_progs, n_rows, scale_ptr, sf_cols_padded):
    """Zero the pad rows ``[n_rows, round_up(n_rows, 128))`` of a swizzled NVFP4 scale buffer, the work shared out
    over ``n_progs`` programs (this one is ``prog``), so a kernel launches programs for its real rows only (a few
    tokens would otherwise launch 128 row programs, nearly all of them pad-only). The pad rows all lie in the last
    128-row tile; in each 512-byte k-chunk of that tile, 4-byte word ``w`` holds row ``(w % 4) * 32 + w // 4``
    (its 4 consecutive k), so the pad is a masked store of zero words over ``[k_chunks, 128]``, 8 chunks per step.
    Columns past ``H/16`` of the real rows are :func:`nvfp4_swizzled_pad`'s job."""
    r0 = n_rows % 128
    if r0 != 0:
        KC: tl.constexpr = 8
        k_tiles = sf_cols_padded // 4
        w = tl.arange(0, 128)
        wmask = ((w % 4) * 32 + w // 4) >= r0
        kk = tl.arange(0, KC)
        words = scale_ptr.to(tl.pointer_type(tl.int32)) + (n_rows // 128).to(tl.int64) * (k_tiles * 128)
        zero = tl.zeros((KC, 128), tl.int32)
        kb = prog.to(tl.int64)  # loop-carried: one type whatever int width n_progs has
        while kb * KC < k_tiles:  # (a while loop: the interpreter cannot take a program id as a range bound)
            kt = kb * KC + kk
            tl.store(words + kt[:, None] * 128 + w[None, :], zero, mask=(kt[:, None] < k_tiles) & wmask[None, :])
            kb += n_progs


# --------------------------------------------------------------------------------------------------------------
# host-side helpers for launchers (plain Python)


class EpilogueArgs(NamedTuple):
    """The epilogue's launch arguments for one output (:func:`epilogue_args`). A NamedTuple, not a dataclass: it is
    built on every eager launch (the decode hot path)."""

    out_stride: int  # row stride of ``data`` (elements; bytes for NVFP4)
    scale: object  # the kernel's ``scale_ptr``: the output scale tensor, or ``data`` where the format writes none
    scale_stride: int  # row stride of the output scale (0 where the kernel does not read it)
    in_scale: object  # the kernel's ``in_scale_ptr``: the static FP8 / NVFP4 global scale, or ``data`` as a dummy
    n_sf_cols: int  # H / 16 (NVFP4 scale columns)
    sf_cols_padded: int  # round_up(H / 16, 4) (swizzled NVFP4 scale row length)
    pad_block: int  # next_pow2(sf_cols_padded): the kernels' PAD_BLOCK


def epilogue_args(fmt: int, hidden: int, data, scale, in_scale) -> EpilogueArgs:
    """:class:`EpilogueArgs` for a launcher writing ``data``/``scale`` (:func:`tpfuse.quant.alloc_outputs`).
    ``in_scale`` (static FP8 scale / NVFP4 global scale) may be None for formats that do not read it."""
    n_sf_cols = hidden // 16
    sf_cols_padded = (n_sf_cols + 3) // 4 * 4
    has_stride = fmt in (QuantFormat.FP8_PER_TOKEN, QuantFormat.FP8_PER_GROUP, QuantFormat.NVFP4_LINEAR)
    return EpilogueArgs(out_stride=data.stride(0),
                        scale=data if fmt in (QuantFormat.NONE, QuantFormat.FP8_STATIC) else scale,
                        scale_stride=scale.stride(0) if has_stride else 0,
                        in_scale=data if in_scale is None else in_scale,
                        n_sf_cols=n_sf_cols, sf_cols_padded=sf_cols_padded, pad_block=next_pow2(sf_cols_padded))


def launch_row_tiles(kernel, op: str, x, width: int, data, scale, in_scale, fmt: int, group_size: int,
                     config=None) -> None:
    """Launch a tiled row kernel (``_silu_mul_kernel``, ``_quantize_kernel``: the same parameters) over
    ``x [T, *]`` with output rows of ``width`` (the config of ``op`` from :mod:`.local_configs`, or ``config``
    sanitized): a 1-D grid of ``n_tiles * cdiv(T, ROWS)`` programs, tile index fastest; with PDL inside
    :func:`.pdl.launches` (both kernels take it)."""
    from . import fast_launch, local_configs, pdl

    t = x.shape[0]
    if t == 0:
        return
    cfg = local_configs.lookup(op, fmt, width, t, group_size) if config is None else \
        local_configs.sanitize(op, fmt, width, group_size, config)
    ep = epilogue_args(fmt, width, data, scale, in_scale)
    block, rows = cfg.block, cfg.rows
    n_tiles = (width + block - 1) // block
    n_progs = n_tiles * ((t + rows - 1) // rows)
    on = pdl.wanted(data)
    fast_launch.launch(
        kernel, (n_progs,),
        (x, x.stride(0), data, ep.out_stride, ep.scale, ep.scale_stride, ep.in_scale, t, width, ep.n_sf_cols,
         ep.sf_cols_padded, n_tiles, n_progs),
        {"FMT": fmt, "BLOCK": block, "GROUP": group_size, "PAD_BLOCK": ep.pad_block, "ROWS": rows, "PDL": on},
        cfg.num_warps, cfg.num_stages, on)


def padded_rows(fmt: int, rows: int) -> int:
    """Row programs a launcher needs: ``round_up(rows, 128)`` for swizzled NVFP4 (pad rows), else ``rows``."""
    return (rows + 127) // 128 * 128 if fmt == QuantFormat.NVFP4_SWIZZLED else rows
