"""Paged-KV-cache decode attention (one query token per sequence, GQA), flash-decoding split-K, in Triton.

Contract (plain-torch reference in :mod:`tpfuse.attention`): for each sequence ``b`` and query head ``h`` (kv head
``h // (Hq // Hkv)``), ``out[b, h] = softmax(scale * q[b, h] . K[b, :n]) @ V[b, :n]`` with
``n = clamp(seq_lens[b], 0, max_seq_len)``; key ``i`` of sequence ``b`` lives in cache slot
``(block_tables[b, i // block_size], i % block_size)``. fp32 scores, softmax and accumulation; ``n == 0`` gives 0.

Work follows the lengths, not the capacity
------------------------------------------
The launch (grid, ``NUM_SPLITS``, tile, warps, workspace) is chosen on the host from ``B``, ``Hq``, ``Hkv``, ``D``,
the dtypes and the GPU's SM count only (:func:`pick_config`); ``max_seq_len`` only clamps ``n`` on the device. Each
sequence is cut into partitions on the device from its own length: with ``n = clamp(seq_lens[b], 0, max_seq_len)``
and ``part(n) = max(MIN_PARTITION, round_up(cdiv(n, NUM_SPLITS), BLOCK_N))``, split ``s`` covers keys
``[s * part, (s + 1) * part) & [0, n)``. ``part`` is a multiple of ``BLOCK_N`` (no tile straddles two partitions)
and ``NUM_SPLITS * part >= n`` (the partitions cover the sequence), so ``cdiv(n, part) <= NUM_SPLITS`` partitions
hold keys; the programs of the others exit at once. A decode step at context ``n`` thus does the same work whatever
the cache's ``max_seq_len`` (and ``max_batch``, which the kernels never see), and CUDA-graph replays with new
``seq_lens`` re-partition each sequence without a new launch.

Kernels
-------
``_split_kernel``, grid ``(B, Hkv, NUM_SPLITS)``: one program owns *all* query heads of one kv head (padded to
``GROUP_PAD >= 16`` rows so both products run on tensor cores: ``[GROUP_PAD, D] x [D, BLOCK_N]`` and
``[GROUP_PAD, BLOCK_N] x [BLOCK_N, D]``), so each K/V tile is read once for the whole group. It covers its
partition of the sequence in ``BLOCK_N`` tiles (the loop bounds are runtime values: the grid never depends on
``seq_lens``), gathering each key's block id from the block table; keys at or past ``n`` are masked out of every
load, so unused cache slots and block-table entries are never read. Online softmax in the exp2 domain
(``log2(e)`` folded into the score scale). With one split (``NUM_SPLITS == 1``) it normalizes and writes ``out``
directly (an empty sequence writes 0); otherwise it writes the unnormalized partial ``o`` (fp32
``[B, Hq, NUM_SPLITS, D]``) and its running max ``m`` / sum ``l`` (fp32 ``[B, Hq, NUM_SPLITS]``), and a program
whose partition starts at or past ``n`` returns before loading anything. ``_combine_kernel`` (grid ``(B, Hq)``)
recomputes ``part(n)``, reads only the ``cdiv(n, part)`` partials that exist, rescales them to the common max and
writes ``out = sum(o_i 2^(m_i - M)) / sum(l_i 2^(m_i - M))``, or 0 for an empty sequence (never NaN). With
``PARTS`` (the rope-split kernels, :func:`launch_rope_decode_attention`'s ``parts``; ``KVCacheConfig.
fold_attn_combine``) there is no combine kernel: each partition's output divided by its own ``l`` goes to ``out``
(``[B, NUM_SPLITS, Hq, D]``, q's dtype) and o_proj combines the partials (:mod:`.attn_o_gemm`).

``_split_combine_kernel`` (:data:`FUSE_COMBINE`, off by default): the split kernel without the combine kernel. A
sequence in one partition is written directly by its one program; otherwise each program stores its partial, then
(a CTA barrier, one acq_rel GPU-scope atomic) takes a ticket from an int32 counter per (sequence, kv head), and the
program that draws the last ticket (``cdiv(n, part) - 1``) combines the partials of its group's query heads (read
through L2) and re-arms the counter to 0 for the next launch; split 0 of an empty sequence writes its zeros. The
counters live in one zeroed buffer per device (:func:`_combine_counters`), allocated outside CUDA graphs; a capture
that would have to allocate them captures the split + combine kernels instead.

``_rope_split_kernel`` (same grid, same partitions, then the same combine; ``_rope_split_combine_kernel`` with the
combine fused as above) is the split kernel of a decode step
whose RoPE and cache write it does itself (:func:`launch_rope_decode_attention`): every program ropes its q rows
(after the per-head RMSNorm with ``QK_NORM``) in registers, rounded to q's dtype as the RoPE kernel stores them;
the one program whose partition holds key ``n - 1`` (the new token) ropes the new k, writes k and v into the
cache (e4m3-quantized for an FP8 cache) and takes that key from registers after its loop, whose tiles stop before
it: no program reads a slot written in the same launch (the other programs' partitions end before ``n - 1``;
other sequences must not read the new key's slot: :func:`tpfuse.attention.rope_decode_attention`'s precondition).
``_rope_split_hoist_kernel`` is the same kernel with the reads that do not depend on the kernel before it (the
lengths, the position's cos / sin, the new key's block id; at level 2 also the first K / V tile) issued before
its PDL wait: the model's decode graphs launch it at batch 1 (:data:`HOIST_MAX_BATCH`), the same bits.

Precision: q.K runs on tensor cores with exact products (K/V in q's dtype; e4m3 -> bf16/fp16/fp32 is exact) and fp32
accumulation. P (fp32, in [0, 1]) is split ``P = P_hi + P_lo`` into two 16-bit values for the P.V product
(``PV_HILO``), so P keeps ~16 significant bits instead of 8 (bf16) at the cost of a second, cheap MMA: the op
stays within one final rounding of the fp32 reference. fp32 inputs use IEEE fp32 products (no TF32).

FP8 (e4m3) caches: ``K = Kq * kv_scale``, ``V = Vq * kv_scale`` with one device scalar. The scale is folded into
the score scale (``(q . Kq) * (scale * kv_scale)``) and into the final output (``(P . Vq) * kv_scale``), never
applied per element.

CUDA graphs: the grid, the constexprs and the workspace size (``B * Hq * NUM_SPLITS * (D + 2)`` fp32) come from
host-side values that do not depend on ``seq_lens`` or ``max_seq_len``; ``seq_lens`` is only read on the device.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..quant import next_pow2
from . import pdl
from .quant_epilogue import SOFT_CAST, cast_for_store, fp8_cast

LOG2E = 1.4426950408889634


@triton.jit
def _e4m3x4_to_16bit(w, DT: tl.constexpr):
    """The four e4m3 values packed in each int32 of ``w`` (little-endian: byte ``i`` is element ``i``) as four
    tensors of ``DT`` (bf16 or fp16) shaped like ``w``: the hardware's ``cvt.rn.f16x2.e4m3x2`` (exact, NaN kept),
    then for bf16 ``cvt.bf16.f16`` (exact: an e4m3 value has 3 mantissa bits), as Triton converts a single e4m3."""
    # adjacent literals: the JIT takes one string constant, not an expression of strings
    if DT == tl.bfloat16:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .b32 h01, h23; .reg .f16 a0, a1, a2, a3;\n"
            "mov.b32 {lo, hi}, $4;\ncvt.rn.f16x2.e4m3x2 h01, lo;\ncvt.rn.f16x2.e4m3x2 h23, hi;\n"
            "mov.b32 {a0, a1}, h01;\nmov.b32 {a2, a3}, h23;\n"
            "cvt.bf16.f16 $0, a0;\ncvt.bf16.f16 $1, a1;\ncvt.bf16.f16 $2, a2;\ncvt.bf16.f16 $3, a3;\n}",
            "=h,=h,=h,=h,r", [w], dtype=(tl.int16, tl.int16, tl.int16, tl.int16), is_pure=True, pack=1)
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .b32 h01, h23;\n"
            "mov.b32 {lo, hi}, $4;\ncvt.rn.f16x2.e4m3x2 h01, lo;\ncvt.rn.f16x2.e4m3x2 h23, hi;\n"
            "mov.b32 {$0, $1}, h01;\nmov.b32 {$2, $3}, h23;\n}",
            "=h,=h,=h,=h,r", [w], dtype=(tl.int16, tl.int16, tl.int16, tl.int16), is_pure=True, pack=1)
    return (c0.to(DT, bitcast=True), c1.to(DT, bitcast=True), c2.to(DT, bitcast=True),
            c3.to(DT, bitcast=True))


@triton.jit
def _load_kv_tile(c_ptr, c_sb, c_so, c_sh, blk, off, kvh, valid, DT: tl.constexpr, D: tl.constexpr,
                  CACHE_FP8: tl.constexpr, FP8_WORDS: tl.constexpr = False):
    """``[BLOCK_N, D]`` tile of one kv head in ``DT`` (rows at invalid keys are 0 and never loaded).

    ``FP8_WORDS`` (an e4m3 cache, 16-bit ``DT``, rows 4-byte aligned; compiled code only): the tile is loaded as
    int32 words of four e4m3 each and converted to ``DT`` in the load's own layout, before Triton moves it into
    the MMA operand layout: a tile loaded as e4m3 is moved into that layout at 8 bits, which for the P.V operand
    (a transposed read) is one byte-wide shared-memory load per element."""
    if FP8_WORDS and not SOFT_CAST:
        D4: tl.constexpr = D // 4
        rows = c_ptr + blk * c_sb + off * c_so + kvh * c_sh  # [BLOCK_N] e4m3 pointers, 4-byte aligned
        w = tl.load(rows.to(tl.pointer_type(tl.int32))[:, None] + tl.arange(0, D4)[None, :], mask=valid[:, None],
                    other=0)
        c0, c1, c2, c3 = _e4m3x4_to_16bit(w, DT)
        # join(join(c0, c2), join(c1, c3))[r, j, a, b] = c_(2a + b), which flattened is element 4j + 2a + b
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (blk.shape[0], D))
    d = tl.arange(0, D)
    ptrs = c_ptr + blk[:, None] * c_sb + off[:, None] * c_so + kvh * c_sh + d[None, :]
    x = tl.load(ptrs, mask=valid[:, None], other=0.0)
    y = x.to(DT)
    if CACHE_FP8 and SOFT_CAST:
        # the Triton 3.6 interpreter decodes e4m3fn's NaN (0x7F / 0xFF) as +-480: restore NaN, so a read of a
        # NaN-poisoned slot shows in the interpreter tests as it does on the GPU
        bits = x.to(tl.uint8, bitcast=True)
        y = tl.where((bits & 0x7F) == 0x7F, float("nan"), y.to(tl.float32)).to(DT)
    return y


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. The Triton 3.6 interpreter multiplies bf16 operands as their raw
    uint16 bits: there the (exact) fp32 values of the same operands are multiplied instead."""
    if SOFT_CAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _tile_rows(start, n, bt_row, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """``(valid, blk, off)`` of keys ``[start, start + BLOCK_N)`` masked to ``< n``: per-key block ids (any BLOCK_N
    / block_size ratio works; masked lanes never touch the block table) and offsets in the block."""
    pos = start + tl.arange(0, BLOCK_N)
    valid = pos < n
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    return valid, blk, off


@triton.jit
def _scores_step(q, k, valid, acc, m_i, l_i, qk_scale, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr):
    """The online softmax's update for one K tile: ``(p, acc, m, l)``, ``acc`` rescaled to the new maxima."""
    s = _mma(q, tl.trans(k), tl.zeros([GROUP_PAD, BLOCK_N], tl.float32), PREC) * qk_scale  # log2 domain
    s = tl.where(valid[None, :], s, float("-inf"))
    # every tile holds >= 1 valid key, so m_new is finite and alpha = 2^(-inf) = 0 on the first tile
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    return p, acc, m_new, l_i


@triton.jit
def _pv_step(p, v, acc, DT: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr):
    """``acc + P.V`` (P split into high and low ``DT`` parts with ``PV_HILO``)."""
    if PV_HILO:
        p_hi = p.to(DT)
        p_lo = (p - p_hi.to(tl.float32)).to(DT)
        acc = _mma(p_hi, v, acc, PREC)
        acc = _mma(p_lo, v, acc, PREC)
    else:
        acc = _mma(p.to(DT), v, acc, PREC)
    return acc


@triton.jit
def _attend_tile(q, acc, m_i, l_i, start, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, kvh,
                 qk_scale, DT: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr,
                 FP8_WORDS: tl.constexpr):
    """One online-softmax step over keys ``[start, start + BLOCK_N)`` (masked to ``< n``)."""
    valid, blk, off = _tile_rows(start, n, bt_row, BLOCK_N, BLOCK_SIZE)
    k = _load_kv_tile(kc_ptr, kc_sb, kc_so, kc_sh, blk, off, kvh, valid, DT, D, CACHE_FP8, FP8_WORDS)
    p, acc, m_new, l_i = _scores_step(q, k, valid, acc, m_i, l_i, qk_scale, GROUP_PAD, BLOCK_N, PREC)
    v = _load_kv_tile(vc_ptr, vc_sb, vc_so, vc_sh, blk, off, kvh, valid, DT, D, CACHE_FP8, FP8_WORDS)
    return _pv_step(p, v, acc, DT, PV_HILO, PREC), m_new, l_i


@triton.jit
def _partition_len(n, NUM_SPLITS: tl.constexpr, MIN_PARTITION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per partition of a sequence of ``n`` keys: ``max(MIN_PARTITION, round_up(cdiv(n, NUM_SPLITS),
    BLOCK_N))``. The split and combine kernels both compute it, so they agree on which partials exist."""
    per_split = (n + NUM_SPLITS - 1) // NUM_SPLITS
    return tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N, MIN_PARTITION)


@triton.jit
def _program_partition(sl_ptr, max_len, NUM_SPLITS: tl.constexpr, MIN_PARTITION: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """``(b, kvh, split, n, part, lo)`` of a split-kernel program: its sequence, kv head and split, the sequence's
    clamped length, its partition length and this split's first key."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n = tl.minimum(tl.maximum(tl.load(sl_ptr + b).to(tl.int32), 0), max_len)
    part = _partition_len(n, NUM_SPLITS, MIN_PARTITION, BLOCK_N)
    return b, kvh, split, n, part, split * part


@triton.jit
def _prefetch_kv_lines(c_ptr, c_sb, c_so, c_sh, blk, off, kvh, valid, D: tl.constexpr):
    """L2 prefetch of the ``D``-element rows of one kv head at the given keys (one instruction per 128-byte line)."""
    LINE: tl.constexpr = 1024 // c_ptr.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
    LINES: tl.constexpr = D // LINE if D > LINE else 1
    j = tl.arange(0, LINES) * LINE
    pdl.prefetch_l2(c_ptr + blk[:, None] * c_sb + off[:, None] * c_so + kvh * c_sh + j[None, :], valid[:, None])


@triton.jit
def _prefetch_partition(sl_ptr, bt_ptr, bt_stride, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh,
                        max_len, D: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, PF_KEYS: tl.constexpr):
    """Before the PDL wait: L2 prefetch of the K and V rows of the first ``PF_KEYS`` keys of this program's
    partition. The lengths and block tables it reads were written before the step's first kernel (two or more
    kernels back: complete, kernels/pdl.py), and a prefetch only fills L2, so the new token's K / V, which the
    kernel before this one may still be writing, is read fresh by the main loop."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(sl_ptr + b).to(tl.int32), 0), max_len)
    lo = tl.program_id(2) * _partition_len(n, NUM_SPLITS, MIN_PARTITION, BLOCK_N)
    pos = lo + tl.arange(0, PF_KEYS)
    valid = pos < n
    blk = tl.load(bt_ptr + b * bt_stride + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    _prefetch_kv_lines(kc_ptr, kc_sb, kc_so, kc_sh, blk, off, kvh, valid, D)
    _prefetch_kv_lines(vc_ptr, vc_sb, vc_so, vc_sh, blk, off, kvh, valid, D)


@triton.jit
def _attend_range(q, lo, hi, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, kvh, qk,
                  DT: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr,
                  FP8_WORDS: tl.constexpr):
    """``(acc, m, l)``: the online softmax of the group's rows over keys ``[lo, hi)`` (tiles masked to ``< n``)."""
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    return _attend_from(q, acc, m_i, l_i, lo, hi, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so,
                        vc_sh, kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8, PV_HILO, PREC, FP8_WORDS)


@triton.jit
def _attend_from(q, acc, m_i, l_i, lo, hi, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, kvh,
                 qk, DT: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr,
                 FP8_WORDS: tl.constexpr):
    """:func:`_attend_range` from the running state ``(acc, m, l)`` (no tile when ``lo >= hi``)."""
    if SOFT_CAST:
        # the Triton 3.6 interpreter cannot take a tensor as a range() bound (its scalars are 1-element arrays);
        # the same loop as a while. Compiled code keeps the for loop, which Triton software-pipelines.
        start = lo
        while start < hi:
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr,
                                         vc_sb, vc_so, vc_sh, kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE,
                                         CACHE_FP8, PV_HILO, PREC, FP8_WORDS)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr,
                                         vc_sb, vc_so, vc_sh, kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE,
                                         CACHE_FP8, PV_HILO, PREC, FP8_WORDS)
    return acc, m_i, l_i


@triton.jit
def _attend_range_q(q, lo, hi, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, kvh, qk,
                    DT: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr,
                    FP8_WORDS: tl.constexpr, F16_MMA: tl.constexpr):
    """:func:`_attend_range` of q (``DT``); with ``F16_MMA`` (an e4m3 cache under a bf16 q, :data:`FP8_F16`) the
    loop runs on q in fp16 (exact for ``6.1e-5 <= |q| <= 65504``, saturated above) with fp16 tiles: e4m3 converts
    to fp16 in one instruction, where bf16 tiles take a second conversion an element."""
    if F16_MMA:
        q16 = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        acc, m_i, l_i = _attend_range(q16, lo, hi, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so,
                                      vc_sh, kvh, qk, tl.float16, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8, PV_HILO,
                                      PREC, FP8_WORDS)
    else:
        acc, m_i, l_i = _attend_range(q, lo, hi, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh,
                                      kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8, PV_HILO, PREC,
                                      FP8_WORDS)
    return acc, m_i, l_i


@triton.jit
def _write_result(acc, m_i, l_i, kv_scale, n, b, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                  ws_l_ptr, n_heads, D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One split: ``out`` (0 for an empty sequence); several: the unnormalized partial and its ``m`` / ``l``."""
    d = tl.arange(0, D)
    acc = acc * kv_scale  # V's dequantization scale, once
    if NUM_SPLITS == 1:
        # n == 0: the loop never ran (l = 0); write zeros, not 0/0
        res = tl.where(n > 0, tl.math.div_rn(acc, tl.where(n > 0, l_i, 1.0)[:, None]), 0.0)
        optrs = out_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :]
        tl.store(optrs, cast_for_store(res, out_ptr.dtype.element_ty), mask=rmask[:, None])
    else:
        row = (b * n_heads + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(ws_o_ptr + row[:, None] * D + d[None, :], acc, mask=rmask[:, None])
        tl.store(ws_m_ptr + row, m_i, mask=rmask)
        tl.store(ws_l_ptr + row, l_i, mask=rmask)


@triton.jit
def _write_parts(acc, m_i, l_i, kv_scale, b, heads, rmask, split, p_ptr, ws_m_ptr, ws_l_ptr, n_heads,
                 D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """PARTS (a partition with keys, so ``l >= 1``): the partial normalized by its own sum, rounded to ``p``'s dtype,
    into ``p [B, NUM_SPLITS, Hq, D]``, and ``m`` / ``l`` into the workspace (:mod:`.attn_o_gemm` combines them)."""
    d = tl.arange(0, D)
    res = tl.math.div_rn(acc * kv_scale, tl.where(rmask, l_i, 1.0)[:, None])
    prow = (b * NUM_SPLITS + split) * n_heads + heads
    tl.store(p_ptr + prow[:, None] * D + d[None, :], cast_for_store(res, p_ptr.dtype.element_ty), mask=rmask[:, None])
    row = (b * n_heads + heads) * NUM_SPLITS + split
    tl.store(ws_m_ptr + row, m_i, mask=rmask)
    tl.store(ws_l_ptr + row, l_i, mask=rmask)


@triton.jit
def _write_split(acc, m_i, l_i, kv_scale, n, b, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                 ws_l_ptr, n_heads, D: tl.constexpr, NUM_SPLITS: tl.constexpr, PARTS: tl.constexpr):
    """A split program's result: :func:`_write_parts` with ``PARTS``, else :func:`_write_result`."""
    if PARTS:
        _write_parts(acc, m_i, l_i, kv_scale, b, heads, rmask, split, out_ptr, ws_m_ptr, ws_l_ptr, n_heads, D,
                     NUM_SPLITS)
    else:
        _write_result(acc, m_i, l_i, kv_scale, n, b, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                      ws_l_ptr, n_heads, D, NUM_SPLITS)


@triton.jit
def _write_empty(out_ptr, o_sb, o_sh, b, kvh, group, n, split, D: tl.constexpr, GROUP_PAD: tl.constexpr):
    """Fused combine: split 0 of an empty sequence (``n == 0``) writes its group's zeros (no program attends)."""
    r = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    wmask = ((r < group) & (n == 0) & (split == 0))[:, None] & (d < D)[None, :]
    optrs = out_ptr + b * o_sb + (kvh * group + r)[:, None] * o_sh + d[None, :]
    tl.store(optrs, tl.zeros([GROUP_PAD, D], tl.float32).to(out_ptr.dtype.element_ty), mask=wmask)


@triton.jit
def _combine_group(ws_o_ptr, ws_m_ptr, ws_l_ptr, out_ptr, o_sb, o_sh, b, heads, rmask, n_used, n_heads,
                   D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, GROUP_PAD: tl.constexpr):
    """The combine of one kv head's query heads (``heads``, ``rmask``) over the ``n_used >= 1`` partials of their
    sequence: ``out = sum(o_i 2^(m_i - M)) / sum(l_i 2^(m_i - M))``, the combine kernel's math, all rows at once.
    The partials are read through L2 (``.cg``): other programs wrote them in this launch."""
    d = tl.arange(0, D)
    s = tl.arange(0, SPLITS_PAD)
    row0 = (b * n_heads + heads) * NUM_SPLITS  # [GROUP_PAD]
    pmask = rmask[:, None] & (s < n_used)[None, :]
    m_all = tl.load(ws_m_ptr + row0[:, None] + s[None, :], mask=pmask, other=float("-inf"), cache_modifier=".cg")
    big_m = tl.where(rmask, tl.max(m_all, axis=1), 0.0)  # padding rows: 0, no -inf - -inf
    l_all = tl.load(ws_l_ptr + row0[:, None] + s[None, :], mask=pmask, other=0.0, cache_modifier=".cg")
    big_l = tl.sum(l_all * tl.math.exp2(m_all - big_m[:, None]), axis=1)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for c in range(0, NUM_SPLITS):  # a fixed trip count: splits past n_used are masked and load nothing
        cm = rmask & (c < n_used)
        w = tl.math.exp2(tl.load(ws_m_ptr + row0 + c, mask=cm, other=float("-inf"), cache_modifier=".cg") - big_m)
        o = tl.load(ws_o_ptr + (row0 + c)[:, None] * D + d[None, :], mask=cm[:, None], other=0.0,
                    cache_modifier=".cg")
        acc += o * w[:, None]
    res = tl.math.div_rn(acc, tl.where(rmask, big_l, 1.0)[:, None])
    optrs = out_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :]
    tl.store(optrs, cast_for_store(res, out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _finish_fused(acc, m_i, l_i, kv_scale, n, part, b, kvh, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr,
                  ws_m_ptr, ws_l_ptr, cnt_ptr, n_heads, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  SPLITS_PAD: tl.constexpr, GROUP_PAD: tl.constexpr):
    """End of a fused-combine split program that attended keys. A sequence in one partition: this program holds the
    whole result and writes ``out`` as one split does. Else it stores its partial, and the last of the sequence's
    ``n_used`` programs to arrive combines them and re-arms the counter for the next launch: every thread's stores,
    then a CTA barrier, then one acq_rel atomic at GPU scope from one thread (the release of the CTA's partial);
    the ticket's acquire, broadcast to the CTA through shared memory behind a barrier, orders the last program's
    partial loads after every other program's release (the "last block" pattern of CUDA's threadFenceReduction
    sample; nothing spins)."""
    n_used = (n + part - 1) // part
    if n_used == 1:
        _write_result(acc, m_i, l_i, kv_scale, n, b, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                      ws_l_ptr, n_heads, D, 1)
    else:
        _write_result(acc, m_i, l_i, kv_scale, n, b, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                      ws_l_ptr, n_heads, D, NUM_SPLITS)
        tl.debug_barrier()  # every thread's partial stores before the one thread's release
        cnt = cnt_ptr + b * tl.num_programs(1) + kvh
        ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if ticket == n_used - 1:
            tl.store(cnt, 0)  # every program of this launch has counted: re-armed for the next one
            _combine_group(ws_o_ptr, ws_m_ptr, ws_l_ptr, out_ptr, o_sb, o_sh, b, heads, rmask, n_used, n_heads, D,
                           NUM_SPLITS, SPLITS_PAD, GROUP_PAD)


@triton.jit
def _split_attend(q_ptr, q_sb, q_sh, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride,
                  kvs_ptr, qk_scale, group, b, kvh, n, lo, part, D: tl.constexpr, GROUP_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr,
                  PREC: tl.constexpr, PDL: tl.constexpr, FP8_WORDS: tl.constexpr, F16_MMA: tl.constexpr):
    """A split program's attention over its partition ``[lo, min(lo + part, n))``: ``(acc, m, l, kv_scale, heads,
    rmask)``, the PDL trigger given once its K / V tiles are read."""
    hi = tl.minimum(lo + part, n)  # one split: lo = 0, part >= n, so [0, n) (the loop never runs when n == 0)
    DT: tl.constexpr = q_ptr.dtype.element_ty
    r = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * group + r  # query heads of this kv head
    rmask = r < group
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :], mask=rmask[:, None], other=0.0)
    kv_scale = 1.0
    if CACHE_FP8:
        kv_scale = tl.load(kvs_ptr).to(tl.float32)
    qk = qk_scale * kv_scale
    acc, m_i, l_i = _attend_range_q(q, lo, hi, n, bt_ptr + b * bt_stride, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr,
                                    vc_sb, vc_so, vc_sh, kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8,
                                    PV_HILO, PREC, FP8_WORDS, F16_MMA)
    pdl.trigger(PDL)  # the K / V tiles are read (a program that exited early counts as triggered)
    return acc, m_i, l_i, kv_scale, heads, rmask


@triton.jit
def _prefetch_next(pf_ptr, PF_NEXT: tl.constexpr):
    """``prefetch.global.L2`` of ``PF_NEXT`` 128-byte lines of the byte range at ``pf_ptr`` (read-only during the
    step: the next GEMM's weight), program ``p`` (row-major over the grid) taking lines ``[p * PF_NEXT, (p + 1) *
    PF_NEXT)``; the launcher keeps ``programs * PF_NEXT`` within the range (:func:`next_prefetch_lines`). Issued
    first, before the PDL wait: no kernel writes those bytes. Nothing when ``PF_NEXT`` is 0."""
    if PF_NEXT > 0:
        p = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        line = p.to(tl.int64) * PF_NEXT + tl.arange(0, PF_NEXT)
        pdl.prefetch_l2(pf_ptr + line * 128, line >= 0)


@triton.jit
def _split_kernel(q_ptr, q_sb, q_sh, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride,
                  sl_ptr, kvs_ptr, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr, ws_l_ptr, qk_scale, max_len, group,
                  n_heads, D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  MIN_PARTITION: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
                  PF_KEYS: tl.constexpr = 0, FP8_WORDS: tl.constexpr = False, F16_MMA: tl.constexpr = False,
                  pf_ptr=None, PF_NEXT: tl.constexpr = 0):
    _prefetch_next(pf_ptr, PF_NEXT)
    if PDL and PF_KEYS > 0:
        _prefetch_partition(sl_ptr, bt_ptr, bt_stride, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh,
                            max_len, D, BLOCK_N, MIN_PARTITION, BLOCK_SIZE, NUM_SPLITS, PF_KEYS)
    pdl.wait(PDL)  # before the lengths' load and the early exit (kernels/pdl.py); the trigger follows the loop
    b, kvh, split, n, part, lo = _program_partition(sl_ptr, max_len, NUM_SPLITS, MIN_PARTITION, BLOCK_N)
    if NUM_SPLITS > 1:
        if lo >= n:  # past this sequence's keys (all splits when n == 0): no partial, the combine skips it
            return
    acc, m_i, l_i, kv_scale, heads, rmask = _split_attend(
        q_ptr, q_sb, q_sh, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride, kvs_ptr,
        qk_scale, group, b, kvh, n, lo, part, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8, PV_HILO, PREC, PDL,
        FP8_WORDS, F16_MMA)
    _write_result(acc, m_i, l_i, kv_scale, n, b, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                  ws_l_ptr, n_heads, D, NUM_SPLITS)


@triton.jit
def _split_combine_kernel(q_ptr, q_sb, q_sh, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr,
                          bt_stride, sl_ptr, kvs_ptr, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr, ws_l_ptr, cnt_ptr,
                          qk_scale, max_len, group, n_heads, D: tl.constexpr, GROUP_PAD: tl.constexpr,
                          BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr,
                          PREC: tl.constexpr, PDL: tl.constexpr, SPLITS_PAD: tl.constexpr,
                          FP8_WORDS: tl.constexpr = False, F16_MMA: tl.constexpr = False):
    """:func:`_split_kernel` (``NUM_SPLITS > 1``) whose last program of each (sequence, kv head) combines the
    partials (:func:`_finish_fused`): no combine kernel."""
    pdl.wait(PDL)
    b, kvh, split, n, part, lo = _program_partition(sl_ptr, max_len, NUM_SPLITS, MIN_PARTITION, BLOCK_N)
    if lo >= n:  # no keys here: split 0 of an empty sequence writes its zeros, the rest exit
        _write_empty(out_ptr, o_sb, o_sh, b, kvh, group, n, split, D, GROUP_PAD)
        return
    acc, m_i, l_i, kv_scale, heads, rmask = _split_attend(
        q_ptr, q_sb, q_sh, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride, kvs_ptr,
        qk_scale, group, b, kvh, n, lo, part, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8, PV_HILO, PREC, PDL,
        FP8_WORDS, F16_MMA)
    _finish_fused(acc, m_i, l_i, kv_scale, n, part, b, kvh, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr,
                  ws_m_ptr, ws_l_ptr, cnt_ptr, n_heads, D, NUM_SPLITS, SPLITS_PAD, GROUP_PAD)


@triton.jit
def _rope_rows(x_ptrs, w_ptr, c, s, mask, eps, D: tl.constexpr, QK_NORM: tl.constexpr, GEMMA: tl.constexpr):
    """fp32 ``rope(rmsnorm(x))`` (QK_NORM) or ``rope(x)`` of the NeoX-style head rows ``x_ptrs [R, 1]`` point at:
    element ``d`` pairs with ``d +- D/2``; ``c`` / ``s`` ``[D]`` are the cos / sin of ``d mod D/2``."""
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, D)
    partner = (d + HALF) % D
    x = tl.load(x_ptrs + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x_ptrs + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.load(w_ptr + d).to(tl.float32)[None, :]
        wp = tl.load(w_ptr + partner).to(tl.float32)[None, :]
        if GEMMA:
            w = w + 1.0
            wp = wp + 1.0
        x = (x * rstd) * w
        xp = (xp * rstd) * wp
    sign = tl.where(d < HALF, -1.0, 1.0)[None, :]  # first half: x c - x' s; second half: x c + x' s
    return x * c[None, :] + (sign * xp) * s[None, :]


@triton.jit
def _new_key_score(q, owner, k_att, qk):
    """The log2-domain scores ``[GROUP_PAD]`` of the group's rows against one key held in registers (``k_att`` fp32
    ``[D]``, as the cache holds it), ``-inf`` where ``owner`` is false. Taken before the tile loop so q's
    row layout does not stay live across it (registers: 2 CTAs / SM at 8 warps)."""
    s_new = tl.sum(q.to(tl.float32) * k_att[None, :], axis=1) * qk  # log2 domain, like the tiles' scores
    return tl.where(owner, s_new, float("-inf"))


@triton.jit
def _new_key(acc, m_i, l_i, s_new, v_att):
    """The online-softmax step of one key of scores ``s_new`` (:func:`_new_key_score`) and value ``v_att`` fp32
    ``[D]``: a no-op where the scores are ``-inf``; an empty running state (``m = -inf``) takes the key alone."""
    m_new = tl.maximum(m_i, s_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen at all: alpha = p = 0, not NaN
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s_new - m_safe)
    return acc * alpha[:, None] + p[:, None] * v_att[None, :], m_new, l_i * alpha + p


@triton.jit
def _rope_table(pos_ptr, cs_ptr, cs_stride, b, d, D: tl.constexpr):
    """fp32 ``(c, s) [D]``: the cos / sin of ``d mod D/2`` (``d = tl.arange(0, D)``) at sequence ``b``'s position."""
    HALF: tl.constexpr = D // 2
    row = cs_ptr + tl.load(pos_ptr + b).to(tl.int64) * cs_stride
    c = tl.load(row + d % HALF).to(tl.float32)
    s = tl.load(row + HALF + d % HALF).to(tl.float32)
    return c, s


@triton.jit
def _rope_new_token(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, qw_ptr, kw_ptr, qk_eps, kvs_ptr, c, s,
                    b, kvh, heads, rmask, d, kc_ptr, vc_ptr, D: tl.constexpr, CACHE_FP8: tl.constexpr,
                    QK_NORM: tl.constexpr, GEMMA: tl.constexpr):
    """``(q, k_st, v_st, kv_scale)``: the group's roped q rows in q's dtype, this step's roped k and its v as the
    cache stores them (e4m3 through ``1 / kv_scale`` for an FP8 cache) and the cache's scale (1 for 16-bit)."""
    DT: tl.constexpr = q_ptr.dtype.element_ty
    q = cast_for_store(_rope_rows(q_ptr + b * q_sb + heads[:, None] * q_sh, qw_ptr, c, s, rmask[:, None], qk_eps,
                                  D, QK_NORM, GEMMA), DT)
    k1 = tl.sum(_rope_rows(k_ptr + b * k_sb + kvh * k_sh + tl.zeros([1, 1], tl.int64), kw_ptr, c, s,
                           tl.full([1, 1], 1, tl.int1), qk_eps, D, QK_NORM, GEMMA), axis=0)  # [D]
    k_new = cast_for_store(k1, DT)  # rounded as the unfused RoPE kernel stores it
    v_new = tl.load(v_ptr + b * v_sb + kvh * v_sh + d)
    kv_scale = 1.0
    if CACHE_FP8:
        kv_scale = tl.load(kvs_ptr).to(tl.float32)
        inv = tl.math.div_rn(1.0, kv_scale)
        k_st = fp8_cast(k_new.to(tl.float32) * inv)
        v_st = fp8_cast(v_new.to(tl.float32) * inv)
    else:
        k_st = k_new.to(kc_ptr.dtype.element_ty)
        v_st = v_new.to(vc_ptr.dtype.element_ty)
    return q, k_st, v_st, kv_scale


@triton.jit
def _new_slot(bt_row, new, owner, BLOCK_SIZE: tl.constexpr):
    """``(blk, off)``: the cache slot of key ``new`` (block id read only by its ``owner`` program)."""
    blk = tl.load(bt_row + tl.maximum(new, 0) // BLOCK_SIZE, mask=owner, other=0).to(tl.int64)
    off = (tl.maximum(new, 0) % BLOCK_SIZE).to(tl.int64)
    return blk, off


@triton.jit
def _store_new_kv(kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, blk, off, kvh, k_st, v_st, owner, d,
                  D: tl.constexpr):
    """The owner program writes this step's k / v into their slot (``d = tl.arange(0, D)``)."""
    wmask = (d < D) & owner
    tl.store(kc_ptr + blk * kc_sb + off * kc_so + kvh * kc_sh + d, k_st, mask=wmask)
    tl.store(vc_ptr + blk * vc_sb + off * vc_so + kvh * vc_sh + d, v_st, mask=wmask)


@triton.jit
def _rope_attend(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, pos_ptr, cs_ptr, cs_stride, qw_ptr, kw_ptr,
                 qk_eps, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride, kvs_ptr,
                 qk_scale, group, b, kvh, n, lo, part, D: tl.constexpr, GROUP_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr,
                 PREC: tl.constexpr, PDL: tl.constexpr, QK_NORM: tl.constexpr, GEMMA: tl.constexpr,
                 FP8_WORDS: tl.constexpr, F16_MMA: tl.constexpr):
    """A rope-split program's work over its partition (:func:`_rope_split_kernel`): ``(acc, m, l, kv_scale, heads,
    rmask)`` with this step's key included where the program owns it."""
    hi = tl.minimum(lo + part, n)
    new = n - 1  # this step's key (-1: an empty sequence, nothing written)
    owner = (lo <= new) & (new < hi)
    DT: tl.constexpr = q_ptr.dtype.element_ty
    r = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * group + r
    rmask = r < group
    c, s = _rope_table(pos_ptr, cs_ptr, cs_stride, b, d, D)
    q, k_st, v_st, kv_scale = _rope_new_token(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, qw_ptr,
                                              kw_ptr, qk_eps, kvs_ptr, c, s, b, kvh, heads, rmask, d, kc_ptr, vc_ptr, D,
                                              CACHE_FP8, QK_NORM, GEMMA)
    bt_row = bt_ptr + b * bt_stride
    blk, off = _new_slot(bt_row, new, owner, BLOCK_SIZE)
    _store_new_kv(kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, blk, off, kvh, k_st, v_st, owner, d, D)
    qk = qk_scale * kv_scale
    s_new = _new_key_score(q, owner, k_st.to(tl.float32), qk)
    acc, m_i, l_i = _attend_range_q(q, lo, tl.minimum(hi, new), new, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr,
                                    vc_sb, vc_so, vc_sh, kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8,
                                    PV_HILO, PREC, FP8_WORDS, F16_MMA)
    pdl.trigger(PDL)
    acc, m_i, l_i = _new_key(acc, m_i, l_i, s_new, v_st.to(tl.float32))
    return acc, m_i, l_i, kv_scale, heads, rmask


@triton.jit
def _rope_split_kernel(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, pos_ptr, cs_ptr, cs_stride, qw_ptr,
                       kw_ptr, qk_eps, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride,
                       sl_ptr, kvs_ptr, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr, ws_l_ptr, qk_scale, max_len, group,
                       n_heads, D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                       MIN_PARTITION: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
                       QK_NORM: tl.constexpr, GEMMA: tl.constexpr, FP8_WORDS: tl.constexpr = False,
                       PF_KEYS: tl.constexpr = 0, F16_MMA: tl.constexpr = False, pf_ptr=None,
                       PF_NEXT: tl.constexpr = 0, PARTS: tl.constexpr = False):
    """:func:`_split_kernel` with this step's token folded in (contract: :func:`launch_rope_decode_attention`):
    q and the new k (per-head RMSNorm first with QK_NORM) are roped in registers; the program whose partition holds
    key ``n - 1`` writes the new k / v there and takes that key from registers, every tile of the loop stops
    before it, so no program reads what another writes in this launch. ``PF_KEYS`` (:data:`PREFETCH`, under PDL):
    the partition's first keys' K / V prefetched into L2 before the wait, as the split kernel's (the new key's slot
    among them at most: a prefetch only fills L2, and this program writes that slot itself after the wait).
    ``PF_NEXT``: :func:`_prefetch_next` (the next GEMM's weight). ``PARTS`` (``NUM_SPLITS > 1``): the normalized
    partials of :func:`_write_parts` into ``out`` (``[B, NUM_SPLITS, Hq, D]``) for :mod:`.attn_o_gemm`."""
    _prefetch_next(pf_ptr, PF_NEXT)
    if PDL and PF_KEYS > 0:  # the cache's old keys do not depend on the kernel before this one
        _prefetch_partition(sl_ptr, bt_ptr, bt_stride, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh,
                            max_len, D, BLOCK_N, MIN_PARTITION, BLOCK_SIZE, NUM_SPLITS, PF_KEYS)
    pdl.wait(PDL)  # q, k, v come from the kernel before this one
    b, kvh, split, n, part, lo = _program_partition(sl_ptr, max_len, NUM_SPLITS, MIN_PARTITION, BLOCK_N)
    if NUM_SPLITS > 1:
        if lo >= n:
            return
    acc, m_i, l_i, kv_scale, heads, rmask = _rope_attend(
        q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, pos_ptr, cs_ptr, cs_stride, qw_ptr, kw_ptr, qk_eps,
        kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride, kvs_ptr, qk_scale, group, b, kvh,
        n, lo, part, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8, PV_HILO, PREC, PDL, QK_NORM, GEMMA, FP8_WORDS,
        F16_MMA)
    _write_split(acc, m_i, l_i, kv_scale, n, b, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                 ws_l_ptr, n_heads, D, NUM_SPLITS, PARTS)


@triton.jit
def _rope_split_hoist_kernel(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, pos_ptr, cs_ptr, cs_stride,
                             qw_ptr, kw_ptr, qk_eps, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr,
                             bt_stride, sl_ptr, kvs_ptr, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr, ws_l_ptr, qk_scale,
                             max_len, group, n_heads, D: tl.constexpr, GROUP_PAD: tl.constexpr,
                             BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             NUM_SPLITS: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr,
                             PREC: tl.constexpr, PDL: tl.constexpr, QK_NORM: tl.constexpr, GEMMA: tl.constexpr,
                             HOIST: tl.constexpr, FP8_WORDS: tl.constexpr = False, F16_MMA: tl.constexpr = False,
                             PARTS: tl.constexpr = False):
    """:func:`_rope_split_kernel` (16-bit caches) with the reads that do not depend on the kernel before it issued
    before its PDL wait (:data:`HOIST_MAX_BATCH`): the sequence's length and partition, its position's cos / sin, the
    new key's block id and (``HOIST >= 2``) the partition's first K / V tile of old keys, held in registers. Only
    data written before the step's first kernel, or by an earlier step, is read before the wait (kernels/pdl.py);
    this step's q / k / v and the new key's slot are read and written after it, and the first tile stops before
    the new key as every tile does. The same math in the same order as :func:`_rope_split_kernel`: the same bits."""
    tl.static_assert(not CACHE_FP8, "16-bit caches only")
    DT: tl.constexpr = q_ptr.dtype.element_ty
    b, kvh, split, n, part, lo = _program_partition(sl_ptr, max_len, NUM_SPLITS, MIN_PARTITION, BLOCK_N)
    hi = tl.minimum(lo + part, n)
    new = n - 1
    owner = (lo <= new) & (new < hi)
    d = tl.arange(0, D)
    c, s = _rope_table(pos_ptr, cs_ptr, cs_stride, b, d, D)
    bt_row = bt_ptr + b * bt_stride
    blk, off = _new_slot(bt_row, new, owner, BLOCK_SIZE)
    if HOIST >= 2:  # old keys only (masked to < new): written by earlier steps
        valid0, blk0, off0 = _tile_rows(lo, new, bt_row, BLOCK_N, BLOCK_SIZE)
        k0 = _load_kv_tile(kc_ptr, kc_sb, kc_so, kc_sh, blk0, off0, kvh, valid0, DT, D, CACHE_FP8, FP8_WORDS)
        v0 = _load_kv_tile(vc_ptr, vc_sb, vc_so, vc_sh, blk0, off0, kvh, valid0, DT, D, CACHE_FP8, FP8_WORDS)
    pdl.wait(PDL)  # q, k, v come from the kernel before this one; no exit before the wait
    if NUM_SPLITS > 1:
        if lo >= n:
            return
    r = tl.arange(0, GROUP_PAD)
    heads = kvh * group + r
    rmask = r < group
    q, k_st, v_st, kv_scale = _rope_new_token(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, qw_ptr,
                                              kw_ptr, qk_eps, kvs_ptr, c, s, b, kvh, heads, rmask, d, kc_ptr, vc_ptr, D,
                                              CACHE_FP8, QK_NORM, GEMMA)
    _store_new_kv(kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, blk, off, kvh, k_st, v_st, owner, d, D)
    qk = qk_scale * kv_scale
    s_new = _new_key_score(q, owner, k_st.to(tl.float32), qk)
    old_hi = tl.minimum(hi, new)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    start = lo
    if HOIST >= 2:
        if lo < old_hi:  # the loop's first tile, from registers
            p, acc, m_i, l_i = _scores_step(q, k0, valid0, acc, m_i, l_i, qk, GROUP_PAD, BLOCK_N, PREC)
            acc = _pv_step(p, v0, acc, DT, PV_HILO, PREC)
        start = lo + BLOCK_N
    acc, m_i, l_i = _attend_from(q, acc, m_i, l_i, start, old_hi, new, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr,
                                 vc_sb, vc_so, vc_sh, kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8,
                                 PV_HILO, PREC, FP8_WORDS)
    pdl.trigger(PDL)
    acc, m_i, l_i = _new_key(acc, m_i, l_i, s_new, v_st.to(tl.float32))
    _write_split(acc, m_i, l_i, kv_scale, n, b, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                 ws_l_ptr, n_heads, D, NUM_SPLITS, PARTS)


@triton.jit
def _rope_split_combine_kernel(q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, pos_ptr, cs_ptr, cs_stride,
                               qw_ptr, kw_ptr, qk_eps, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh,
                               bt_ptr, bt_stride, sl_ptr, kvs_ptr, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr,
                               ws_l_ptr, cnt_ptr, qk_scale, max_len, group, n_heads, D: tl.constexpr,
                               GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr,
                               BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, CACHE_FP8: tl.constexpr,
                               PV_HILO: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr, QK_NORM: tl.constexpr,
                               GEMMA: tl.constexpr, SPLITS_PAD: tl.constexpr, FP8_WORDS: tl.constexpr = False,
                               F16_MMA: tl.constexpr = False):
    """:func:`_rope_split_kernel` (``NUM_SPLITS > 1``) with the combine in its last programs, as
    :func:`_split_combine_kernel`."""
    pdl.wait(PDL)
    b, kvh, split, n, part, lo = _program_partition(sl_ptr, max_len, NUM_SPLITS, MIN_PARTITION, BLOCK_N)
    if lo >= n:
        _write_empty(out_ptr, o_sb, o_sh, b, kvh, group, n, split, D, GROUP_PAD)
        return
    acc, m_i, l_i, kv_scale, heads, rmask = _rope_attend(
        q_ptr, q_sb, q_sh, k_ptr, k_sb, k_sh, v_ptr, v_sb, v_sh, pos_ptr, cs_ptr, cs_stride, qw_ptr, kw_ptr, qk_eps,
        kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride, kvs_ptr, qk_scale, group, b, kvh,
        n, lo, part, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE, CACHE_FP8, PV_HILO, PREC, PDL, QK_NORM, GEMMA, FP8_WORDS,
        F16_MMA)
    _finish_fused(acc, m_i, l_i, kv_scale, n, part, b, kvh, heads, rmask, split, out_ptr, o_sb, o_sh, ws_o_ptr,
                  ws_m_ptr, ws_l_ptr, cnt_ptr, n_heads, D, NUM_SPLITS, SPLITS_PAD, GROUP_PAD)


@triton.jit
def _combine_kernel(ws_o_ptr, ws_m_ptr, ws_l_ptr, sl_ptr, out_ptr, o_sb, o_sh, n_heads, max_len,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PARTITION: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    SPLITS_PAD: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr, HOIST: tl.constexpr = False):
    if not HOIST:
        pdl.enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(sl_ptr + b).to(tl.int32), 0), max_len)
    part = _partition_len(n, NUM_SPLITS, MIN_PARTITION, BLOCK_N)
    n_used = (n + part - 1) // part  # partials the split kernel wrote (<= NUM_SPLITS: NUM_SPLITS * part >= n)
    row0 = (b * n_heads + h) * NUM_SPLITS
    if HOIST:  # the lengths were written before the step's first kernel (kernels/pdl.py): read before the wait
        pdl.enter(PDL)
    idx = tl.arange(0, SPLITS_PAD)
    m_all = tl.load(ws_m_ptr + row0 + idx, mask=idx < n_used, other=float("-inf"))
    big_m = tl.where(n_used > 0, tl.max(m_all, axis=0), 0.0)  # 0 for an empty row: no -inf - -inf
    d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    l_acc = tl.zeros([CHUNK], tl.float32)
    # a fixed trip count (NUM_SPLITS is small): chunks past n_used are fully masked and load nothing
    for c in range(0, NUM_SPLITS, CHUNK):
        ci = c + tl.arange(0, CHUNK)
        cm = ci < n_used
        w = tl.math.exp2(tl.load(ws_m_ptr + row0 + ci, mask=cm, other=float("-inf")) - big_m)
        l_acc += tl.load(ws_l_ptr + row0 + ci, mask=cm, other=0.0) * w
        o = tl.load(ws_o_ptr + (row0 + ci)[:, None] * D + d[None, :], mask=cm[:, None], other=0.0)
        acc += tl.sum(o * w[:, None], axis=0)
    big_l = tl.where(n_used > 0, tl.sum(l_acc, axis=0), 1.0)
    res = tl.where(n_used > 0, tl.math.div_rn(acc, big_l), 0.0)
    tl.store(out_ptr + b * o_sb + h * o_sh + d, cast_for_store(res, out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------------------------
# launcher

ONE_SPLIT_TILES = ((0, (128, 8)), (3, (32, 4)))
"""``(programs per SM from which, (BLOCK_N, num_warps))`` of :func:`pick_config`'s bf16 / fp16 rule where a
sequence is one program (one split: ``B * Hkv >= 2 x SMs``, B >= 33 at Hkv 8 on 132 SMs), D <= 128: the last entry
whose ``programs >= at x SMs`` holds. 128-key tiles with 8 warps, the sweep's best at 4096 keys (contexts that are
multiples of 128), up to 3 programs an SM; 32-key tiles with 4 warps from there on. A decode step's context is not
a multiple of 128 (the 8B's benchmark rows run at 1025-1088 keys: 9 tiles of 128 for 8 tiles' worth of keys). On
one H100 at 2b81c2e (``decode_attention_h100_attntail_2b81c2e.json``, B 64, Hkv 8, one split) 32-key tiles at 4
warps were every point's best: 0.92 / 0.93-0.95 / 0.97x the 128 x 8 tiles' time at 1040 / 1088 / 4112 keys
(0.96-0.97x at 1024, Hq 32 / 64); in the full 8B (``e2e_tp1_h100_tile_ab_2b81c2e.json``, rows ``_tile32``: 32 x 4 at every one-split
launch) the decode step took 0.98x as long at batch 64 (512 programs, 3.9 an SM; 0.97x in per-channel FP8, 0.98x
static) but 1.04x at batch 32 (256 programs, 1.9 an SM; 1.05x in both FP8 schemes), where 4-warp programs leave
the SMs too few loads in flight. Hence the step at 3 programs an SM."""
SM_COUNT_GUESS = 132  # H100 / H200 (the sweep's GPU): the SM count when no CUDA device is at hand (interpreter)
WAVES = 2  # split-kernel programs wanted per SM at small batch (the FP8 rule's target)
SPLIT_WAVES = 2
"""The bf16 / fp16 rule's target: ``NUM_SPLITS = clamp(SPLIT_WAVES x SMs // (B * Hkv), 1, MAX_SPLITS)``, with
:data:`MULTI_SPLIT_TILE` tiles where that makes at least 2 programs an SM. The candidate 4 / 64: on one H100 at
7fdfb52 (``bench/results/decode_attention_h100_b8tail_7fdfb52.json``: the plain split kernel, B 8, Hq 32 / 64, Hkv
8, D 128, 256-token blocks, the decode step's contexts 1040 / 1088 keys) 8 splits of 64-key tiles x 4 warps were
the best of 12 configs, 0.88 / 0.86x (Hq 32) and 0.86 / 0.85x (Hq 64) the time of this rule's 4 splits of 128-key
tiles, whose partitions (``round_up(cdiv(n, 4), 128)`` = 384 keys at 1040) leave one split of four idle. Not
shipped: in the model's step (the rope-split kernel, whose split counts it changes at B 9-33 too; one H100,
0f918e6, ``bench/results/e2e_tp1_h100_ab_trig_0f918e6.json``, rows ``_split4x64``) the full 8B's decode step took
0.991x as long at batch 8 in bf16 but 1.019x at batch 16 (1.026x per-channel FP8, 1.036x static FP8) and 1.00x at
batch 1 / 64; its GPU tests passed there (``test_gpu_split_candidate_model_shapes``, B 3 / 8 / 16 / 32)."""
MULTI_SPLIT_TILE = 128
"""BLOCK_N of the bf16 / fp16 rule with more than one split and at least 2 programs an SM (B * Hkv * NUM_SPLITS
>= 2 x SMs): :data:`SPLIT_WAVES`."""
MAX_SPLITS = 16  # bf16 / fp16 caches: more splits than this cost more in the combine than the extra parallelism wins
MAX_SPLITS_FP8 = 32  # FP8 caches: the most splits the earlier FP8 rule took at the swept points (B=1, 4096 keys)
MIN_SPLITS_FP8 = 2  # FP8 caches: at least 2 splits, the best fixed rule of both H100 FP8 sweeps (pick_config)
MIN_PARTITION = 128  # keys: the shortest partition the sweep timed (its best at B=1 x 1024 keys)
PREFETCH = False
"""Under PDL the split kernels (:func:`_split_kernel`, :func:`_rope_split_kernel`; not the fused-combine ones)
prefetch their partition's first tile of K and V into L2 before the wait (:func:`_prefetch_partition`) when True.
Off: together with the small-M GEMM's weight prefetch, on the split kernel (the RoPE apart), it did not pay on the
full 8B (``tpfuse.kernels.small_m_gemm.PREFETCH_BYTES`` says where it was measured); alone, in the rope kernel
(``bench_e2e.py --pdl-ab --prefetch-kib 0``, one H100 at 9799eb6, ``e2e_tp1_h100_kvpf_ab_9799eb6.json``, rows
``_prefetch``) the step took 1.00 / 1.02 / 1.00x at batch 1 / 8 / 64 in bf16, 1.01 / 1.03 / 1.00x in per-channel FP8
and 1.00 / 1.03 / 1.00x in static FP8; its GPU test (``test_gpu_kv_prefetch_under_pdl``) passed there."""
FP8_WORDS = False
"""e4m3 caches with a bf16 / fp16 q: load K / V tiles as int32 words of four e4m3 and convert them before the MMA
layout change (:func:`_load_kv_tile`; :func:`fp8_words_ok` says where it applies; False: the e4m3 tile loads). Its
sm_90 PTX has no byte-wide shared-memory loads, where the e4m3 tile loads' build has one a P.V operand element (32
a thread per 32-key tile). Off: it gives the e4m3 loads' bits (``test_gpu_fp8_word_loads_match_byte_loads`` passed
on one H100 at 28139fe) but not their speed. In ``decode_attention_h100_fp8words_28139fe.json`` (one H100, B 8 / 64
x 1024 / 4096 keys, Hq 32 / 64) its best swept config takes 0.98-1.06x the e4m3 loads' best at each point, and
at :func:`pick_config`'s configs 1.04-1.08x their time."""

FP8_F16 = True
"""e4m3 caches under a bf16 q: the tile loop multiplies in fp16 (``F16_MMA``: :func:`_attend_range_q`) instead of
bf16. An e4m3 value converts to fp16 exactly in one instruction for two elements (``cvt.rn.f16x2.e4m3x2``), where
bf16 tiles take a second conversion an element (``cvt.bf16.f16``: sm_90's SASS ``F2F.BF16.F16``), so the loop
issues a third of the conversions. q converts to fp16 exactly where ``6.1e-5 <= |q| <= 65504`` (a bf16 value has 8
significant bits, fp16 11; smaller magnitudes round to fp16's subnormal steps of 2^-24, larger ones saturate at
65504), so the scores are the bf16 loop's; P is split into fp16 high and low parts (22 bits, bf16's 16: ``PV_HILO``).
:func:`fp8_f16_ok` says where it applies (False: the bf16 loop). On since its GPU tests passed on one H100 at 4ae6646
(24, ``bench/results/logs/gpu_run_4ae6646_h100_fp8f16_tests.log``: ``test_gpu_fp8_f16_loop_*`` - the oracle's bounds,
within one bf16 step of the bf16 loop, the same cache bytes, the PDL builds bit for bit the non-PDL ones - the
model's graph and eager decode with it against the fp64 oracle, ``test_fp8_f16_decode_matches_eager_and_oracle``,
and the word loads in this loop, ``test_gpu_fp8_word_loads_match_byte_loads``); the kernel took 0.85-0.92x the bf16
loop's time at every point of ``bench/results/decode_attention_h100_fp8f16_9799eb6.json`` (B 1 / 8 / 64, 1k / 4k
keys) and the full 8B's e4m3-cache decode step 1.00 / 1.00 / 0.97x at batch 1 / 8 / 64
(``e2e_tp1_h100_f16_ab_9799eb6.json``)."""


FUSE_COMBINE = False
"""Split launches (``NUM_SPLITS > 1``) combine their partials in the split kernel's last program of each
(sequence, kv head) (:func:`_split_combine_kernel`, :func:`_rope_split_combine_kernel`: an acq_rel ticket counter
per (sequence, kv head) in :func:`_combine_counters`' buffer) instead of a combine kernel: one launch fewer per
decode attention. Off: it ran correctly on one H100 (57948f7: the 47 kernel GPU tests of ``bash bench/gpu_run.sh
fusedcomb``, 300 contended launches and 300 graph replays among them, passed; the model-level test was cut by the
step's time limit) but did not pay: the full 8B's decode step took 1.02 / 0.99 / 1.00x as long at batch 1 / 8 / 64
in bf16 and 1.04 / 1.00 / 1.00x in per-channel FP8 (``bench/results/e2e_tp1_h100_full_57948f7.json``, rows
``_fusedcomb`` after their base rows): at batch 1 the last program's combine after its ticket sits on the step's
critical path, where the combine kernel's launch hides behind PDL. The fused
kernels have no K / V L2 prefetch (:data:`PREFETCH` applies to the split kernels without it). A launch that stops
part-way (a CUDA error) can leave counters non-zero, after which fused launches combine wrongly: after such an
error, :func:`reset_combine_counters` (or a new process)."""
_COUNTERS: dict = {}  # device -> the int32 ticket counters of fused-combine launches, all zero between launches
COUNTERS_MIN = 1 << 16  # counters allocated at once: B * Hkv up to 65536 (e.g. 8192 sequences x 8 kv heads)


def _combine_counters(cfg: "DecodeConfig", out: torch.Tensor, kv_heads: int, fuse_combine):
    """The zeroed ticket counters (int32, one per (sequence, kv head)) a fused-combine launch of ``cfg`` uses, or
    None for the split + combine kernels: one split, fusion off (``fuse_combine`` None: :data:`FUSE_COMBINE`), or a
    CUDA-graph capture that would have to allocate them (they are allocated outside graphs, where an eager call
    first needs them, and each launch leaves them zero). One buffer per device, so fused-combine launches on one
    device must not run concurrently (tpfuse runs decode attention on the compute stream only)."""
    if cfg.num_splits == 1 or not (FUSE_COMBINE if fuse_combine is None else fuse_combine):
        return None
    need = out.shape[0] * kv_heads
    cnt = _COUNTERS.get(out.device)
    if cnt is None or cnt.numel() < need:
        if out.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        cnt = torch.zeros(max(need, COUNTERS_MIN), dtype=torch.int32, device=out.device)
        _KEEP.append(cnt)  # graphs captured with a smaller buffer still point at it
        _COUNTERS[out.device] = cnt
    return cnt


_KEEP: list = []


def reset_combine_counters() -> None:
    """Zero every fused-combine ticket counter (they are zero between launches unless a launch stopped part-way)."""
    for cnt in _KEEP:
        cnt.zero_()


def fp8_f16_ok(q, key_cache) -> bool:
    """Whether :data:`FP8_F16`'s fp16 tile loop applies: an e4m3 cache and a bf16 q (an fp16 q's loop is fp16
    already; an fp32 q keeps fp32)."""
    return key_cache.element_size() == 1 and q.dtype == torch.bfloat16


def fp8_words_ok(q, key_cache, value_cache) -> bool:
    """Whether the word loads of :data:`FP8_WORDS` apply: e4m3 caches, a 16-bit q, D a multiple of 4 and every
    cache row 4-byte aligned (base pointer and strides in bytes), compiled code (not the interpreter)."""
    fp8 = torch.float8_e4m3fn
    if SOFT_CAST or key_cache.dtype != fp8 or value_cache.dtype != fp8 or q.element_size() != 2 or q.shape[-1] % 4:
        return False
    return all(c.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in c.stride()[:3])
               for c in (key_cache, value_cache))


class DecodeConfig(NamedTuple):
    """Launch configuration of :func:`launch_decode_attention` (every field host-side and length-independent)."""

    num_splits: int
    """Programs per (sequence, kv head): the grid's third dimension and the workspace's split count."""
    min_partition: int
    """Shortest partition in keys (a multiple of ``block_n``); the device computes each sequence's own."""
    block_n: int
    """Keys per tile."""
    num_warps: int
    num_stages: int = 3
    """Software-pipeline depth of the split kernel's K / V tile loads (Triton's ``num_stages``; 3 is its default)."""


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """SMs of ``device`` (a CUDA device), :data:`SM_COUNT_GUESS` elsewhere (the interpreter on CPU)."""
    if device.type != "cuda":
        return SM_COUNT_GUESS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _one_split_tile(programs: int, sm_count: int):
    """``(BLOCK_N, num_warps)`` of a one-split bf16 / fp16 launch of ``programs`` programs (:data:`ONE_SPLIT_TILES`)."""
    return [tile for at, tile in ONE_SPLIT_TILES if programs >= at * sm_count][-1]


def pick_config(batch: int, kv_heads: int, head_dim: int, q_elem: int, *, cache_fp8: bool = False,
                sm_count: int = SM_COUNT_GUESS, num_splits=None, min_partition=None, block_n=None,
                num_warps=None, num_stages=None) -> DecodeConfig:
    """The :class:`DecodeConfig` of a launch, from ``(B, Hkv, D, q's element size, cache dtype, SM count)`` only:
    never from ``max_seq_len`` nor the lengths (CUDA-graph safe; the work follows each sequence's length through
    the partition the device computes, module docstring). Arguments given override the rule.

    ``programs = B * Hkv`` (programs per split) and ``target = WAVES * sm_count`` (2 x 132 = 264 on H100 / H200):

    ==============  =========================================  ===========================================
    field           bf16 / fp16 cache                          FP8 cache
    ==============  =========================================  ===========================================
    NUM_SPLITS      ``clamp(SPLIT_WAVES * sm_count //          smallest power of two ``s`` with
                    programs, 1, 16)`` (:data:`SPLIT_WAVES`    ``programs * s >= target``, at most 32, at
                    2: ``target // programs``)                 least 2
    BLOCK_N         128 for D <= 128 with 16-bit q, else 32;   32 where ``programs * NUM_SPLITS > target``
                    one split: :data:`ONE_SPLIT_TILES`; more   or D > 128 or fp32 q, else 64
                    splits and >= 2 programs an SM:
                    :data:`MULTI_SPLIT_TILE` (128)
    num_warps       8 with one split (:data:`ONE_SPLIT_TILES`  4
                    for D <= 128 with 16-bit q), else 4
    MIN_PARTITION   ``max(128, BLOCK_N)``                      ``max(128, BLOCK_N)``
    ==============  =========================================  ===========================================

    At the points of the sweep in ``bench/results/decode_attention_h200_sweep.json`` (``bench_decode_attention.py
    --sweep`` at 3c39d05, which forced fixed partitions - it now forces split counts; one H200; Hq 32/64, Hkv 8,
    D 128, bf16 q and cache, B 1/8/64, every sequence at 1024 or 4096 keys, ``max_seq_len`` = the context) this
    gives (NUM_SPLITS: partition at 1024 / 4096 keys):

    ====  =========================  ============================  ===============================================
    B     bf16 / fp16 cache          FP8 cache                     the sweep
    ====  =========================  ============================  ===============================================
    1     16 x 4 warps: 128 / 256    32 x 64: 128 / 128            best: 128 / 256, 128-key tiles, 4 warps
    8     4 x 4 warps: 256 / 1024    8 x 32: 128 / 512             best: 256 / 1024, 128-key tiles, 4 warps (or
                                                                   8 warps, 0.1% faster at 4096 keys, Hq 32);
                                                                   at 1040 / 1088 keys (the decode step's) 8 x
                                                                   64-key tiles x 4 warps (:data:`SPLIT_WAVES`)
    64    1 x 32-key tiles x 4       2 x 32: 512 / 2048            best: 4096, 128-key tiles, 8 warps at 4096
          warps: 1024 / 4096                                       keys; at 1024 keys 32-key tiles with 4 warps
                                                                   are 2.5-2.9% faster (:data:`ONE_SPLIT_TILES`:
                                                                   32-key tiles from 3 programs an SM on)
    ====  =========================  ============================  ===============================================

    So the sweep still decides the bf16 branch's BLOCK_N, its warps (8 where one program covers a whole sequence,
    ``B * Hkv >= target``, up to 3 programs an SM) and its split counts at these points (the bf16 rule is the best
    swept config or within 4% of it at every point); :data:`ONE_SPLIT_TILES` its one-split tile from 3 programs an
    SM on (contexts past a multiple of 128 keys, the full 8B's decode step).

    The FP8 branch has its own rule (the bf16 rule made FP8 caches 1.3x / 1.5x slower at B=64 on one H200:
    ``decode_attention_h200_989aa3b.json`` vs ``decode_attention_h200.json``): the best fixed rule of two FP8
    sweeps on one H100 at the same points (splits x 32 / 64 / 128-key tiles x 4 / 8 warps, 256-token blocks),
    ``decode_attention_h100_fp8sweep_ad23780.json`` (splits 1-32) and ``decode_attention_h100_fp8words_28139fe.json``
    (splits 1-8, both tile loads). At 28139fe it is the best fixed config at B=8 (within 0.9% of each point's
    best) and within 4% of each point's best at B=64 (1.8% on average); the earlier FP8 rule (64-key tiles, 8 / 1
    splits) took 1.08-1.19x each point's best at B=8 and 1.09-1.14x at B=64. At B=1 both rules agree (within 2-3%
    of the best at 4096 keys, 19% at 1024 in the ad23780 sweep; no fixed config does better at both). With it an
    FP8 cache takes 0.92-0.98x a bf16 cache's time at B=64 and 0.90-0.91x at B=8 x 4096 keys, for half the bytes;
    1.08x at B=8 x 1024 keys, where the work is too small to fill the GPU.

    New and not yet swept on a GPU: the split count no longer grows with the context nor the capacity, and each
    sequence's partition follows its own length. Untimed so far: contexts past 4096 keys (B=1 at 32768 keys: 16
    splits of 2048 for bf16, 32 of 1024 for FP8), lengths that differ across the batch (with one split, one long
    sequence among short ones runs in ``Hkv`` programs while the rest idle: the price of a grid without
    ``max_seq_len``), batch sizes, head counts, D and SM counts other than the swept ones, and the real SM count
    in place of 132 (``bench_decode_attention.py --capacity-sweep`` times the capacity axis).
    """
    target = WAVES * sm_count
    programs = max(1, batch * kv_heads)
    small_tiles = head_dim > 128 or q_elem > 2  # D = 256 or fp32 q: registers, not swept
    if cache_fp8:
        if num_splits is None:
            num_splits = 1
            while programs * num_splits < target and num_splits < MAX_SPLITS_FP8:
                num_splits *= 2
            num_splits = max(MIN_SPLITS_FP8, num_splits)
        if block_n is None:  # 32-key tiles once the programs outnumber the target (B >= 8 at Hkv 8 on 132 SMs)
            block_n = 32 if small_tiles or programs * num_splits > target else 64
        num_warps = 4 if num_warps is None else num_warps
    else:
        if num_splits is None:
            num_splits = max(1, min(MAX_SPLITS, SPLIT_WAVES * sm_count // programs))
        tile = _one_split_tile(programs, sm_count) if num_splits == 1 and not small_tiles else None
        multi = num_splits > 1 and programs * num_splits >= 2 * sm_count
        block_n = (32 if small_tiles else (tile[0] if tile else (MULTI_SPLIT_TILE if multi else 128))
                   if block_n is None else block_n)
        if num_warps is None:
            num_warps = (tile[1] if tile else 8) if num_splits == 1 else 4
    min_partition = max(MIN_PARTITION, block_n) if min_partition is None else min_partition
    if num_splits < 1 or min_partition < block_n or min_partition % block_n:
        raise ValueError(f"need num_splits >= 1 and min_partition a positive multiple of block_n {block_n}, got "
                         f"{num_splits} and {min_partition}")
    return DecodeConfig(num_splits, min_partition, block_n, num_warps, 3 if num_stages is None else num_stages)


def _workspace(bsz: int, hq: int, d: int, splits: int, device):
    """fp32 partials ``(o [B*Hq*splits, D], m, l [B*Hq*splits])`` in one allocation (the caching allocator serves
    it inside CUDA-graph capture too); its size does not depend on ``max_seq_len``."""
    rows = bsz * hq * splits
    ws = torch.empty(rows * (d + 2), dtype=torch.float32, device=device)
    return ws[: rows * d], ws[rows * d: rows * (d + 1)], ws[rows * (d + 1):]


def _launch_setup(q, key_cache, seq_lens, out, kv_scale, parts=None, **overrides):
    """``(config, kv-scale argument, (ws_o, ws_m, ws_l))`` of a split-kernel launch: :func:`pick_config` with the
    caller's overrides, the kv-scale pointer (``seq_lens`` where the kernel never reads it: not an FP8 cache) and
    the split workspace (``out`` three times where there is one split: unused; ``parts = (m, l)``: ``out`` and
    those, the normalized partials' launch)."""
    bsz, hq, d = q.shape
    cache_fp8 = key_cache.element_size() == 1
    cfg = pick_config(bsz, key_cache.shape[2], d, q.element_size(), cache_fp8=cache_fp8,
                      sm_count=device_sm_count(q.device), **overrides)
    if parts is not None:
        if cfg.num_splits == 1:
            raise ValueError("partials need a split launch (one split writes the output itself)")
        ws = (out, *parts)
    else:
        ws = _workspace(bsz, hq, d, cfg.num_splits, q.device) if cfg.num_splits > 1 else (out, out, out)
    return cfg, kv_scale if cache_fp8 else seq_lens, ws


def launch_decode_attention(q, key_cache, value_cache, block_tables, seq_lens, out, scale, kv_scale=None, *,
                            max_seq_len: int, num_splits=None, min_partition=None, block_n=None, num_warps=None,
                            num_stages=None, fp8_words=None, fuse_combine=None, fp8_f16=None, prefetch=None):
    """``out [B, Hq, D]`` <- decode attention of ``q [B, Hq, D]`` over the paged caches
    ``[num_blocks, block_size, Hkv, D]`` (see the module docstring). Inputs are validated by
    :func:`tpfuse.attention.decode_attention`. ``max_seq_len`` only clamps the lengths on the device; the launch
    comes from :func:`pick_config` (``num_splits`` ... ``num_stages`` override its rule); ``fp8_words`` (None:
    :data:`FP8_WORDS`) asks for the word loads of e4m3 caches where :func:`fp8_words_ok`; ``fuse_combine`` (None:
    :data:`FUSE_COMBINE`) for the combine in the split kernel's last programs where :func:`_combine_counters` allows
    it; ``fp8_f16`` (None: :data:`FP8_F16`) for the fp16 tile loop where :func:`fp8_f16_ok`; ``prefetch``: a
    read-only CUDA tensor (the next GEMM's weight) whose bytes the split kernel's programs bring into L2 first
    (:func:`next_prefetch`; not the fused-combine kernels). Returns the :class:`DecodeConfig` used (``None`` for
    an empty batch)."""
    bsz, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    if bsz == 0 or hq == 0:
        return None
    group = hq // hkv
    cache_fp8 = key_cache.element_size() == 1
    cfg, kvs, (ws_o, ws_m, ws_l) = _launch_setup(q, key_cache, seq_lens, out, kv_scale, num_splits=num_splits,
                                                 min_partition=min_partition, block_n=block_n, num_warps=num_warps,
                                                 num_stages=num_stages)
    splits = cfg.num_splits
    on = pdl.wanted(out)
    words = (FP8_WORDS if fp8_words is None else fp8_words) and fp8_words_ok(q, key_cache, value_cache)
    f16 = (FP8_F16 if fp8_f16 is None else fp8_f16) and fp8_f16_ok(q, key_cache)
    cnt = _combine_counters(cfg, out, hkv, fuse_combine)
    head = (q, q.stride(0), q.stride(1), key_cache, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache, value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_tables, block_tables.stride(0), seq_lens, kvs, out, out.stride(0), out.stride(1), ws_o, ws_m, ws_l)
    tail = (float(scale) * LOG2E, int(max_seq_len), group, hq)
    meta = dict(D=d, GROUP_PAD=max(16, next_pow2(group)), BLOCK_N=cfg.block_n, MIN_PARTITION=cfg.min_partition,
                BLOCK_SIZE=block_size, NUM_SPLITS=splits, CACHE_FP8=cache_fp8, PV_HILO=q.element_size() == 2,
                PREC="ieee" if q.dtype.itemsize == 4 else "tf32", PDL=pdl.stream_mode(on), FP8_WORDS=words,
                F16_MMA=f16, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_options(on))
    if cnt is not None:
        _split_combine_kernel[(bsz, hkv, splits)](*head, cnt, *tail, SPLITS_PAD=next_pow2(splits), **meta)
        return cfg
    _split_kernel[(bsz, hkv, splits)](*head, *tail, PF_KEYS=cfg.block_n if on and PREFETCH else 0,
                                      **next_prefetch(prefetch, bsz * hkv * splits), **meta)
    _launch_combine(cfg, ws_o, ws_m, ws_l, seq_lens, out, max_seq_len, on)
    return cfg


def _launch_combine(cfg: DecodeConfig, ws_o, ws_m, ws_l, seq_lens, out, max_seq_len: int, on: bool,
                    hoist: bool = False) -> None:
    """The combine kernel of a split launch (nothing for one split); ``hoist``: its length read before its PDL wait
    (:data:`HOIST_MAX_BATCH`)."""
    bsz, hq, d = out.shape
    if cfg.num_splits > 1:
        splits_pad = next_pow2(cfg.num_splits)
        _combine_kernel[(bsz, hq)](
            ws_o, ws_m, ws_l, seq_lens, out, out.stride(0), out.stride(1), hq, int(max_seq_len),
            D=d, BLOCK_N=cfg.block_n, MIN_PARTITION=cfg.min_partition, NUM_SPLITS=cfg.num_splits,
            SPLITS_PAD=splits_pad, CHUNK=min(splits_pad, 16), PDL=on, num_warps=4 if d >= 128 else 2,
            **(dict(HOIST=True) if hoist else {}), **pdl.launch_options(on))


def launch_rope_decode_attention(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens,
                                 out, scale, kv_scale=None, *, max_seq_len: int, q_norm_weight=None,
                                 k_norm_weight=None, qk_eps: float = 0.0, gemma: bool = False, num_splits=None,
                                 min_partition=None, block_n=None, num_warps=None, num_stages=None, fp8_words=None,
                                 fuse_combine=None, fp8_f16=None, prefetch=None, hoist=None, parts=None):
    """One decode step's attention with its RoPE and cache write folded in (:func:`_rope_split_kernel`, then the
    combine): ``q [B, Hq, D]``, ``k`` / ``v [B, Hkv, D]`` are this step's un-roped projections (read, never
    written); with ``n = clamp(seq_lens[b], 0, max_seq_len)``, sequence ``b``'s roped (after the per-head RMSNorm
    where ``q_norm_weight`` / ``k_norm_weight`` are given) k and its v become key ``n - 1`` of the caches (at
    ``block_tables[b, (n - 1) // block_size]``; nothing is written when ``n == 0``) and ``out [B, Hq, D]`` gets the
    attention of the roped q over keys ``[0, n)``. NeoX rotary, ``positions [B]`` into ``cos_sin_cache [P, D]``
    (``[cos | sin]`` rows). The launch (:func:`pick_config`), the partitions and ``prefetch`` are
    :func:`launch_decode_attention`'s. ``hoist`` (0 / 1 / 2; None: :func:`hoist_level`'s rule): the reads issued
    before the PDL wait (:func:`_rope_split_hoist_kernel`; 16-bit caches with the combine kernel only, where a
    hoisting launch drops ``prefetch``). ``parts = (m, l)`` (fp32 ``[B * Hq * NUM_SPLITS]`` each; a split launch of
    a 16-bit cache): no combine; ``out`` is ``[B, NUM_SPLITS, Hq, D]`` and gets each partition's output divided by
    its own sum (:func:`_write_parts`; :mod:`.attn_o_gemm` combines them inside o_proj).
    Inputs are validated by :func:`tpfuse.attention.rope_decode_attention` (``parts``:
    :func:`tpfuse.attention_o.rope_decode_attention_partials`). Returns the :class:`DecodeConfig`."""
    bsz, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    if bsz == 0 or hq == 0:
        return None
    cache_fp8 = key_cache.element_size() == 1
    if parts is not None and cache_fp8:
        raise ValueError("partials need a 16-bit cache")
    cfg, kvs, (ws_o, ws_m, ws_l) = _launch_setup(q, key_cache, seq_lens, out, kv_scale, parts, num_splits=num_splits,
                                                 min_partition=min_partition, block_n=block_n, num_warps=num_warps,
                                                 num_stages=num_stages)
    splits = cfg.num_splits
    qk_norm = q_norm_weight is not None
    qw, kw = (q_norm_weight, k_norm_weight) if qk_norm else (q, q)  # unread without QK_NORM
    on = pdl.wanted(out)
    words = (FP8_WORDS if fp8_words is None else fp8_words) and fp8_words_ok(q, key_cache, value_cache)
    f16 = (FP8_F16 if fp8_f16 is None else fp8_f16) and fp8_f16_ok(q, key_cache)
    cnt = _combine_counters(cfg, out, hkv, fuse_combine) if parts is None else None
    head = (q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), positions,
            cos_sin_cache, cos_sin_cache.stride(0), qw, kw, float(qk_eps),
            key_cache, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache, value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_tables, block_tables.stride(0), seq_lens, kvs, out, out.stride(0), out.stride(1), ws_o, ws_m, ws_l)
    tail = (float(scale) * LOG2E, int(max_seq_len), hq // hkv, hq)
    meta = dict(D=d, GROUP_PAD=max(16, next_pow2(hq // hkv)), BLOCK_N=cfg.block_n, MIN_PARTITION=cfg.min_partition,
                BLOCK_SIZE=block_size, NUM_SPLITS=splits, CACHE_FP8=cache_fp8, PV_HILO=q.element_size() == 2,
                PREC="ieee" if q.dtype.itemsize == 4 else "tf32", PDL=pdl.stream_mode(on), QK_NORM=qk_norm,
                GEMMA=bool(gemma), FP8_WORDS=words, F16_MMA=f16, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **pdl.launch_options(on))
    cap = rope_max_registers(cfg, cache_fp8)
    if cap is not None:
        meta["maxnreg"] = cap
    if cnt is not None:
        _rope_split_combine_kernel[(bsz, hkv, splits)](*head, cnt, *tail, SPLITS_PAD=next_pow2(splits), **meta)
        return cfg
    level = hoist_level(hoist, cache_fp8, bsz, prefetch=PREFETCH or prefetch is not None, pdl_on=bool(on))
    part_meta = dict(PARTS=True) if parts is not None else {}
    if level:
        _rope_split_hoist_kernel[(bsz, hkv, splits)](*head, *tail, HOIST=level, **meta, **part_meta)
        if parts is None:
            _launch_combine(cfg, ws_o, ws_m, ws_l, seq_lens, out, max_seq_len, on, hoist=True)
        return cfg
    _rope_split_kernel[(bsz, hkv, splits)](*head, *tail, PF_KEYS=cfg.block_n if on and PREFETCH else 0,
                                           **next_prefetch(prefetch, bsz * hkv * splits), **meta, **part_meta)
    if parts is None:
        _launch_combine(cfg, ws_o, ws_m, ws_l, seq_lens, out, max_seq_len, on)
    return cfg


HOIST_MAX_BATCH = 1
"""The rope-split PDL launches of at most this many sequences (16-bit caches, the combine kernel, no prefetch asked)
read ahead of their wait at level 1 (:func:`hoist_level`): the lengths, the position's cos / sin and the new
key's block id (:func:`_rope_split_hoist_kernel`), and their combine kernel its lengths. What the wait then leaves
on the critical path is this step's q / k / v and the partition's tiles: at batch 1 a program's partition is one
tile, whose block id and rows took two dependent reads after the length's. On one H100 at 896cc8f
(``bench/results/e2e_tp1_h100_hoist_ab_896cc8f.json``, ``..._shards_hoist_ab_896cc8f.json``, rows ``_hoist1``)
level 1 at every launch made the decode step 0.997 / 1.000 / 0.998x as long at batch 1 / 8 / 64 on the full 8B in
bf16 (0.996 / 1.010 / 1.003x per-channel FP8, 0.996 / 1.007 / 1.004x static FP8) and 0.987 / 0.997 / 0.995x on the
70B TP 8 / 70B TP 4 / 8B TP 2 shards at batch 1: every batch-1 row gained, the others did not. With this rule on,
a second run at 25be4f6 (``e2e_tp1_h100_hoist_ab_25be4f6.json``, ``..._shards_hoist_ab_25be4f6.json``) timed the
batch-1 step at 0.999 / 0.994 / 0.996x the step without it (rows ``_hoist0``) on the 8B and 0.987 / 0.996 /
0.997x on the shards. Level 2 (also the partition's first K / V tile, in registers: 255 a thread) was
1.000-1.010x: never. Their GPU tests (``test_gpu_hoisted_loads_under_pdl``, the model's PDL graph decode in mode
"hoist") passed at 896cc8f; the builds' PTX is fingerprinted."""
HOIST_LOADS = None
"""A/B override of :data:`HOIST_MAX_BATCH`'s rule (``bench_e2e.py --hoist-ab``): None the rule, else that level (0
none, 1, 2) at every rope-split launch of a 16-bit cache with the combine kernel (a prefetch asked is then
dropped)."""


def hoist_level(hoist, cache_fp8: bool, batch: int = 1, prefetch: bool = False, pdl_on: bool = True) -> int:
    """The hoist level of a rope-split launch: ``hoist``, else :data:`HOIST_LOADS`, else 1 for a PDL launch
    (``pdl_on``: no wait, nothing to hide behind) of at most :data:`HOIST_MAX_BATCH` sequences without a prefetch
    asked (``prefetch``), else 0; always 0 for an FP8 cache."""
    level = hoist if hoist is not None else HOIST_LOADS
    if level is None:
        level = 1 if pdl_on and batch <= HOIST_MAX_BATCH and not prefetch else 0
    if level not in (0, 1, 2):
        raise ValueError(f"hoist must be 0, 1 or 2, got {level!r}")
    return 0 if cache_fp8 else int(level)


NEXT_PF_MAX_LINES = 2048
"""Most 128-byte lines one split program prefetches of the next GEMM's weight (:func:`next_prefetch`): 256 KB, 16
prefetches a thread at 4 warps (the 8B's o_proj, 32 MiB in bf16, over the 128 programs of batch 1)."""


def next_prefetch_lines(nbytes: int, programs: int) -> int:
    """``PF_NEXT`` of a launch of ``programs`` programs prefetching ``nbytes``: the lines each program takes, a power
    of two (``tl.arange``) with ``programs * PF_NEXT * 128 <= nbytes`` (a tail under one program's share is left
    out: a prefetch is only a hint), at most :data:`NEXT_PF_MAX_LINES`; 0 below one line a program."""
    per = min(nbytes // 128 // max(programs, 1), NEXT_PF_MAX_LINES)
    return 1 << (per.bit_length() - 1) if per >= 1 else 0


def next_prefetch(prefetch, programs: int) -> dict:
    """The split kernel's ``pf_ptr`` / ``PF_NEXT`` keywords for ``prefetch`` (a contiguous CUDA tensor, or None):
    nothing (the build without it) for None, a tensor off CUDA or not contiguous, under the interpreter (inline PTX),
    or below one line a program."""
    if prefetch is None or not prefetch.is_cuda or not prefetch.is_contiguous() or SOFT_CAST:
        return {}
    lines = next_prefetch_lines(prefetch.numel() * prefetch.element_size(), programs)
    return dict(pf_ptr=prefetch.view(-1).view(torch.uint8), PF_NEXT=lines) if lines else {}


def rope_max_registers(cfg: DecodeConfig, cache_fp8: bool):
    """The register cap (Triton's ``maxnreg``) of a rope-split launch, or None. ptxas (sm_90a, offline, Triton 3.6)
    gives the plain split kernel 128 registers with 4 warps over 32-key FP8 tiles (the B = 8 / 64 FP8 configs: 4
    programs an SM) and the rope kernel 146 (154 with the QK-norm): 3 programs an SM. Capped at 128 it compiles
    without spills (12 bytes with the QK-norm) and fits 4. Elsewhere no cap: with 8 warps (bf16 cache, one split) the
    rope kernel takes 126-128 registers uncapped (2 programs an SM, as the split kernel), and a cap of 128 there
    makes ptxas spill; with 32-key tiles at 4 warps and one split (``ONE_SPLIT_TILES`` from 3 programs an SM on)
    116 (4 programs an SM, the split kernel 96 and 5), where a cap of 96 spills 56-64 bytes: no cap (the uncapped
    build is the one timed); the other configs are bound by their shared memory or grid alike."""
    if cache_fp8 and cfg.block_n <= 32 and cfg.num_warps == 4:
        return 128
    return None


def partition_len(n: int, cfg: DecodeConfig) -> int:
    """Host mirror of the device's partition rule (tests, benchmarks): keys per partition of a sequence of ``n``
    keys; ``cdiv(n, partition_len(n, cfg))`` partitions hold keys."""
    per_split = -(-max(n, 0) // cfg.num_splits)
    return max(cfg.min_partition, -(-per_split // cfg.block_n) * cfg.block_n)
