"""Paged-KV-cache decode attention (one query token per sequence, GQA), flash-decoding split-K, in Triton.

Contract (plain-torch reference in :mod:`tpfuse.attention`): for each sequence ``b`` and query head ``h`` (kv head
``h // (Hq // Hkv)``), ``out[b, h] = softmax(scale * q[b, h] . K[b, :n]) @ V[b, :n]`` with
``n = clamp(seq_lens[b], 0, max_seq_len)``; key ``i`` of sequence ``b`` lives in cache slot
``(block_tables[b, i // block_size], i % block_size)``. fp32 scores, softmax and accumulation; ``n == 0`` gives 0.

Kernels
-------
``_split_kernel``, grid ``(B, Hkv, NUM_SPLITS)``: one program owns *all* query heads of one kv head (padded to
``GROUP_PAD >= 16`` rows so both products run on tensor cores: ``[GROUP_PAD, D] x [D, BLOCK_N]`` and
``[GROUP_PAD, BLOCK_N] x [BLOCK_N, D]``), so each K/V tile is read once for the whole group. It covers keys
``[split * PARTITION, (split + 1) * PARTITION) & [0, n)`` in ``BLOCK_N`` tiles (the loop bound is the runtime
length: the grid never depends on ``seq_lens``), gathering each key's block id from the block table; keys at or
past ``n`` are masked out of every load, so unused cache slots and block-table entries are never read.
Online softmax in the exp2 domain (``log2(e)`` folded into the score scale). With one split
(``NUM_SPLITS == 1``) it normalizes and writes ``out`` directly; otherwise it writes the unnormalized partial
``o`` (fp32 ``[B, Hq, NUM_SPLITS, D]``) and its running max ``m`` / sum ``l`` (fp32 ``[B, Hq, NUM_SPLITS]``).
A program whose partition starts at or past ``n`` writes nothing: ``_combine_kernel`` (grid ``(B, Hq)``) only reads
the ``cdiv(n, PARTITION)`` partitions that hold keys, rescales them to the common max and writes
``out = sum(o_i 2^(m_i - M)) / sum(l_i 2^(m_i - M))``, or 0 for an empty sequence (never NaN).

Precision: q.K runs on tensor cores with exact products (K/V in q's dtype; e4m3 -> bf16/fp16/fp32 is exact) and fp32
accumulation. P (fp32, in [0, 1]) is split ``P = P_hi + P_lo`` into two 16-bit values for the P.V product
(``PV_HILO``), so P keeps ~16 significant bits instead of 8 (bf16) at the cost of a second, cheap MMA: the op
stays within one final rounding of the fp32 reference. fp32 inputs use IEEE fp32 products (no TF32).

FP8 (e4m3) caches: ``K = Kq * kv_scale``, ``V = Vq * kv_scale`` with one device scalar. The scale is folded into
the score scale (``(q . Kq) * (scale * kv_scale)``) and into the final output (``(P . Vq) * kv_scale``), never
applied per element.

CUDA graphs: the grid, ``NUM_SPLITS`` and the workspace size come from host-side capacities (``B``, ``Hq``,
``max_seq_len``), never from ``seq_lens``, which is only read on the device.
"""

import torch
import triton
import triton.language as tl

from ..quant import next_pow2
from .quant_epilogue import SOFT_CAST, cast_for_store

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(c_ptr, c_sb, c_so, c_sh, blk, off, kvh, valid, DT: tl.constexpr, D: tl.constexpr,
                  CACHE_FP8: tl.constexpr):
    """``[BLOCK_N, D]`` tile of one kv head in ``DT`` (rows at invalid keys are 0 and never loaded)."""
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
def _attend_tile(q, acc, m_i, l_i, start, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, kvh,
                 qk_scale, DT: tl.constexpr, D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over keys ``[start, start + BLOCK_N)`` (masked to ``< n``)."""
    pos = start + tl.arange(0, BLOCK_N)
    valid = pos < n
    # per-key block id: any BLOCK_N / block_size ratio works; masked lanes never touch the block table
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    k = _load_kv_tile(kc_ptr, kc_sb, kc_so, kc_sh, blk, off, kvh, valid, DT, D, CACHE_FP8)
    s = _mma(q, tl.trans(k), tl.zeros([GROUP_PAD, BLOCK_N], tl.float32), PREC) * qk_scale  # log2 domain
    s = tl.where(valid[None, :], s, float("-inf"))
    # every tile holds >= 1 valid key, so m_new is finite and alpha = 2^(-inf) = 0 on the first tile
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    v = _load_kv_tile(vc_ptr, vc_sb, vc_so, vc_sh, blk, off, kvh, valid, DT, D, CACHE_FP8)
    if PV_HILO:
        p_hi = p.to(DT)
        p_lo = (p - p_hi.to(tl.float32)).to(DT)
        acc = _mma(p_hi, v, acc, PREC)
        acc = _mma(p_lo, v, acc, PREC)
    else:
        acc = _mma(p.to(DT), v, acc, PREC)
    return acc, m_new, l_i


@triton.jit
def _split_kernel(q_ptr, q_sb, q_sh, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, bt_ptr, bt_stride,
                  sl_ptr, kvs_ptr, out_ptr, o_sb, o_sh, ws_o_ptr, ws_m_ptr, ws_l_ptr, qk_scale, max_len, group,
                  n_heads, D: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  PARTITION: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  CACHE_FP8: tl.constexpr, PV_HILO: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n = tl.minimum(tl.maximum(tl.load(sl_ptr + b).to(tl.int32), 0), max_len)
    lo = split * PARTITION
    hi = tl.minimum(lo + PARTITION, n)  # lo >= hi: an empty partition, the loop never runs
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
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    bt_row = bt_ptr + b * bt_stride
    if SOFT_CAST:
        # the Triton 3.6 interpreter cannot take a tensor as a range() bound (its scalars are 1-element arrays);
        # the same loop as a while. Compiled code keeps the for loop, which Triton software-pipelines.
        start = lo
        while start < hi:
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr,
                                         vc_sb, vc_so, vc_sh, kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE,
                                         CACHE_FP8, PV_HILO, PREC)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, start, n, bt_row, kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr,
                                         vc_sb, vc_so, vc_sh, kvh, qk, DT, D, GROUP_PAD, BLOCK_N, BLOCK_SIZE,
                                         CACHE_FP8, PV_HILO, PREC)
    acc = acc * kv_scale  # V's dequantization scale, once
    if NUM_SPLITS == 1:
        # n == 0: the loop never ran (l = 0); write zeros, not 0/0
        res = tl.where(n > 0, tl.math.div_rn(acc, tl.where(n > 0, l_i, 1.0)[:, None]), 0.0)
        optrs = out_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :]
        tl.store(optrs, cast_for_store(res, out_ptr.dtype.element_ty), mask=rmask[:, None])
    else:
        # an empty partition stores nothing: the combine kernel only reads the cdiv(n, PARTITION) that hold keys
        wmask = rmask & (lo < n)
        row = (b * n_heads + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(ws_o_ptr + row[:, None] * D + d[None, :], acc, mask=wmask[:, None])
        tl.store(ws_m_ptr + row, m_i, mask=wmask)
        tl.store(ws_l_ptr + row, l_i, mask=wmask)


@triton.jit
def _combine_kernel(ws_o_ptr, ws_m_ptr, ws_l_ptr, sl_ptr, out_ptr, o_sb, o_sh, n_heads, max_len,
                    D: tl.constexpr, PARTITION: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                    CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(sl_ptr + b).to(tl.int32), 0), max_len)
    n_used = (n + PARTITION - 1) // PARTITION  # partitions that hold keys (<= NUM_SPLITS: n <= max_len)
    row0 = (b * n_heads + h) * NUM_SPLITS
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

SM_COUNT_GUESS = 132  # H100 / H200; only steers the split heuristic
TARGET_PROGRAMS = 2 * SM_COUNT_GUESS  # split-kernel programs wanted at full length (~2 waves)
MAX_SPLITS = 16  # more splits than this cost more in the combine than the extra parallelism wins
MIN_PARTITION, MAX_PARTITION = 128, 2048


def pick_config(batch: int, kv_heads: int, max_seq_len: int, head_dim: int, q_elem: int,
                partition=None, block_n=None, num_warps=None, *, cache_fp8: bool = False):
    """``(PARTITION, BLOCK_N, NUM_SPLITS, num_warps)`` from host-side capacities only (CUDA-graph safe).

    bf16 / fp16 caches: chosen from the sweep in ``bench/results/decode_attention_h200_sweep.json``
    (``bench_decode_attention.py --sweep``, one H200; Hq 32/64, Hkv 8, D 128, bf16 cache, B 1/8/64, 1024/4096 keys),
    where this rule is the best swept config or within 4% of it at every point:

    * ``BLOCK_N``: 128 keys per tile for D <= 128 with 16-bit q; 32 for D = 256 or fp32 q (not swept).
    * ``PARTITION``: start at ``MIN_PARTITION`` (128) and double while the grid at full length,
      ``B * Hkv * cdiv(max_seq_len, PARTITION)``, has more than ``TARGET_PROGRAMS`` (2 x 132 SMs) programs or more
      than ``MAX_SPLITS`` splits, up to ``MAX_PARTITION`` (2048) or the whole ``max_seq_len``. So B=1, Hkv=8 gets
      8 splits of 128 at 1024 keys and 16 of 256 at 4096; B=8 gets ~256 programs; B=64 one pass at 1024 keys.
      The cap bounds the imbalance when lengths differ across the batch and keeps each program's loop short.
    * ``num_warps``: 8 from partitions of 1024 keys (long loops over 128-key tiles), else 4.

    FP8 caches (``cache_fp8``) keep the earlier rule: ``BLOCK_N`` 64 (32 for D = 256 / fp32 q), 4 warps, and the
    partition doubled while ``B * Hkv * cdiv(max_seq_len, 2 * PARTITION)`` still reaches ``TARGET_PROGRAMS``. The
    bf16 rule was not swept with FP8 caches, and on one H200 it made B=64 1.3x (1024 keys) and 1.5x (4096 keys)
    slower than this one (``bench/results/decode_attention_h200_989aa3b.json`` vs ``decode_attention_h200.json``).
    """
    if cache_fp8:
        return _pick_config_fp8_cache(batch, kv_heads, max_seq_len, head_dim, q_elem, partition, block_n, num_warps)
    if block_n is None:
        block_n = 128 if head_dim <= 128 and q_elem <= 2 else 32
    if partition is None:
        partition = max(MIN_PARTITION, block_n)
        while partition < MAX_PARTITION and partition < max_seq_len:
            splits = triton.cdiv(max_seq_len, partition)
            if batch * kv_heads * splits <= TARGET_PROGRAMS and splits <= MAX_SPLITS:
                break
            partition *= 2
    if num_warps is None:
        num_warps = 8 if partition >= 1024 else 4
    return _checked(partition, block_n, max_seq_len, num_warps)


def _pick_config_fp8_cache(batch, kv_heads, max_seq_len, head_dim, q_elem, partition, block_n, num_warps):
    if block_n is None:
        block_n = 64 if head_dim <= 128 and q_elem <= 2 else 32
    if partition is None:
        partition = max(MIN_PARTITION, block_n)
        while (partition < MAX_PARTITION and partition < max_seq_len
               and batch * kv_heads * triton.cdiv(max_seq_len, 2 * partition) >= TARGET_PROGRAMS):
            partition *= 2
    return _checked(partition, block_n, max_seq_len, 4 if num_warps is None else num_warps)


def _checked(partition, block_n, max_seq_len, num_warps):
    if partition % block_n:
        raise ValueError(f"partition {partition} must be a multiple of block_n {block_n}")
    return partition, block_n, max(1, triton.cdiv(max_seq_len, partition)), num_warps


def launch_decode_attention(q, key_cache, value_cache, block_tables, seq_lens, out, scale, kv_scale=None, *,
                            max_seq_len: int, partition=None, block_n=None, num_warps=None):
    """``out [B, Hq, D]`` <- decode attention of ``q [B, Hq, D]`` over the paged caches
    ``[num_blocks, block_size, Hkv, D]`` (see the module docstring). Inputs are validated by
    :func:`tpfuse.attention.decode_attention`; ``max_seq_len`` is the host-side capacity that fixes the grid."""
    bsz, hq, d = q.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    if bsz == 0 or hq == 0:
        return out
    group = hq // hkv
    cache_fp8 = key_cache.element_size() == 1
    part, bn, splits, nw = pick_config(bsz, hkv, max_seq_len, d, q.element_size(), partition, block_n, num_warps,
                                       cache_fp8=cache_fp8)
    kvs = kv_scale if cache_fp8 else seq_lens  # unread unless CACHE_FP8
    if splits > 1:
        # fp32 partials; the caching allocator serves this inside CUDA-graph capture too
        ws = torch.empty(bsz * hq * splits * (d + 2), dtype=torch.float32, device=q.device)
        ws_o = ws[: bsz * hq * splits * d]
        ws_m = ws[bsz * hq * splits * d: bsz * hq * splits * (d + 1)]
        ws_l = ws[bsz * hq * splits * (d + 1):]
    else:
        ws_o = ws_m = ws_l = out  # unused
    _split_kernel[(bsz, hkv, splits)](
        q, q.stride(0), q.stride(1), key_cache, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache, value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables, block_tables.stride(0), seq_lens, kvs, out, out.stride(0), out.stride(1), ws_o, ws_m, ws_l,
        float(scale) * LOG2E, int(max_seq_len), group, hq,
        D=d, GROUP_PAD=max(16, next_pow2(group)), BLOCK_N=bn, PARTITION=part, BLOCK_SIZE=block_size,
        NUM_SPLITS=splits, CACHE_FP8=cache_fp8, PV_HILO=q.element_size() == 2,
        PREC="ieee" if q.dtype.itemsize == 4 else "tf32", num_warps=nw)
    if splits > 1:
        splits_pad = next_pow2(splits)
        _combine_kernel[(bsz, hq)](
            ws_o, ws_m, ws_l, seq_lens, out, out.stride(0), out.stride(1), hq, int(max_seq_len),
            D=d, PARTITION=part, NUM_SPLITS=splits, SPLITS_PAD=splits_pad, CHUNK=min(splits_pad, 16),
            num_warps=4 if d >= 128 else 2)
    return out

