"""o_proj with the decode attention's split combine folded in, in Triton: ``out[b, n] = sum_k x[b, k] W[n, k]``
where ``x[b]`` is the attention output of sequence ``b`` that a split decode-attention launch left as per-split
partials. Public ops: :func:`tpfuse.attention_o.attn_o_gemm` / ``attn_o_gemm_add``; reference:
:func:`tpfuse.attention_o.attn_o_gemm_ref`.

Why: at batch 1 a decode step's attention is two latency-bound launches (the split kernel, then a combine kernel of
~2 us that reads a few KB), and the o_proj GEMM after them reads its x from the combine. Here the split kernel
writes each partition's output already normalized by its own softmax sum, and o_proj takes those partials as
extra rows of its x: the combine weights are per (sequence, head, split), and o_proj's K axis is ``head * D +
d``, so with ``BLOCK_K`` dividing ``D`` each K step lies in one head and the combine is one scale a column of that
step's MMA product::

    x[b, h*D + d] = sum_s c[b, h, s] * p[b, s, h*D + d]         c = l_s 2^(m_s - M) / sum_s' l_s' 2^(m_s' - M)
    out[b, n]     = sum_s sum_h c[b, h, s] * (W[n, hD:(h+1)D] . p[b, s, hD:(h+1)D])

=============  ====================  ==========================================================================
operand        dtype                 shape / meaning
=============  ====================  ==========================================================================
``p``          bf16 / fp16           ``[B, S, Hq * D]``: split ``s``'s attention output of sequence ``b`` over its
                                     partition, divided by its sum ``l`` (rows of partitions past the sequence's
                                     length are never read)
``m``, ``l``   fp32                  ``[B * Hq * S]`` at ``(b * Hq + h) * S + s``: the partition's max score
                                     (log2 domain) and sum of ``2^(score - m)``
``seq_lens``   int32 / int64         ``[B]``: with ``max_len``, the partition rule of the attention launch
                                     (``NUM_SPLITS``, ``MIN_PARTITION``, ``ATTN_BLOCK_N``) gives the partials that
                                     exist: ``cdiv(n, part(n))``, read before the PDL wait (written before the step)
``w``          p's dtype             ``[N, Hq * D]`` contiguous
``out``        p's dtype             ``[B, N]``; ADD_RES: the folded-norm epilogue of :mod:`.small_m_gemm`
=============  ====================  ==========================================================================

A program owns ``BLOCK_N`` output columns and every (sequence, split) row: the MMA's narrow side is ``BLOCK_M =
B_PAD * S_PAD`` rows (at most 64; at batch 1 the 16 padded rows a plain launch multiplies anyway), the weight is
streamed once as in the small-M GEMM. The combine weights of all heads are computed once before the K loop
(``[HQ_PAD, BLOCK_M]`` in registers); each K step selects its head's row by a masked sum (no memory access in the
loop besides the two tiles), scales its fp32 MMA product by it and adds it to the accumulator; after the loop the
``S_PAD`` columns of each sequence are summed. One rounding at the end (the epilogue's), none of x: the partials
are rounded once each when stored (the split combine kernel rounds the combined x once instead).
"""

import dataclasses

import triton
import triton.language as tl

from . import pdl
from . import small_m_configs as smc
from .quant_epilogue import SOFT_CAST
from .small_m_gemm import _dot, _finish, _prefetch_weight, prefetch_lines


@triton.jit
def _used_splits(sl_ptr, rb, M, max_len, NUM_SPLITS: tl.constexpr, MIN_PARTITION: tl.constexpr,
                 ATTN_BLOCK_N: tl.constexpr):
    """Partials the attention launch wrote for the sequences ``rb`` (its partition rule; 0 past the batch)."""
    n = tl.minimum(tl.maximum(tl.load(sl_ptr + rb, mask=rb < M, other=0).to(tl.int32), 0), max_len)
    per_split = (n + NUM_SPLITS - 1) // NUM_SPLITS
    part = tl.maximum((per_split + ATTN_BLOCK_N - 1) // ATTN_BLOCK_N * ATTN_BLOCK_N, MIN_PARTITION)
    return (n + part - 1) // part


@triton.jit
def _combine_weights(am_ptr, al_ptr, n_used, M, n_heads, HQ_PAD: tl.constexpr, B_PAD: tl.constexpr,
                     S_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """``[HQ_PAD, B_PAD * S_PAD]``: the combine weight ``c[b, h, s]`` of each head (rows) and (sequence, split)
    column; 0 for partials that do not exist and for empty sequences (never NaN)."""
    h = tl.arange(0, HQ_PAD)[:, None, None]
    b = tl.arange(0, B_PAD)[None, :, None]
    s = tl.arange(0, S_PAD)[None, None, :]
    ok = (h < n_heads) & (b < M) & (s < tl.reshape(n_used, (1, B_PAD, 1)))
    idx = (b * n_heads + h) * NUM_SPLITS + s
    m = tl.load(am_ptr + idx, mask=ok, other=float("-inf"))
    big = tl.max(m, axis=2)
    big = tl.where(big == float("-inf"), 0.0, big)  # no partial: no -inf - -inf
    w = tl.load(al_ptr + idx, mask=ok, other=0.0) * tl.math.exp2(m - big[:, :, None])
    total = tl.sum(w, axis=2)
    c = w / tl.where(total > 0.0, total, 1.0)[:, :, None]
    return tl.reshape(c, (HQ_PAD, B_PAD * S_PAD))


@triton.jit
def _head_step(acc, k0, x_tile, w_tile, row_ok, n_mask, coef, hq, D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step (inside head ``k0 // D``): the fp32 MMA product of the weight and partial tiles, each column
    scaled by its combine weight for this head."""
    xt = tl.trans(tl.load(x_tile + k0, mask=row_ok[:, None], other=0.0))
    w = tl.load(w_tile + k0, mask=n_mask[:, None], other=0.0)
    prod = _dot(tl.zeros_like(acc), w, xt, False, False, BLOCK_K)
    c = tl.sum(tl.where((hq == k0 // D)[:, None], coef, 0.0), axis=0)
    return acc + prod * c[None, :]


@triton.jit(do_not_specialize=["M"])
def _attn_o_gemm_kernel(p_ptr, w_ptr, am_ptr, al_ptr, sl_ptr, out_ptr, M, N_OUT, K, stride_om, n_heads, max_len,
                        res_ptr, stride_rm, sqo_ptr, nw_ptr, xo_ptr,
                        D: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_PARTITION: tl.constexpr,
                        ATTN_BLOCK_N: tl.constexpr, B_PAD: tl.constexpr, S_PAD: tl.constexpr, HQ_PAD: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ADD_RES: tl.constexpr, PDL: tl.constexpr,
                        PF_LINES: tl.constexpr = 0):
    """Grid ``(cdiv(N_OUT, BLOCK_N),)``; module docstring. ``K = Hq * D``, ``D % BLOCK_K == 0``."""
    tl.static_assert(D % BLOCK_K == 0, "a K step must lie in one head")
    BLOCK_M: tl.constexpr = B_PAD * S_PAD
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N_OUT
    if PDL and PF_LINES > 0:  # the weight never comes from the previous kernel
        _prefetch_weight(w_ptr, rn, n_mask, K, 0, K // BLOCK_K, 0, False, BLOCK_K, PF_LINES)
    n_used = _used_splits(sl_ptr, tl.arange(0, B_PAD), M, max_len, NUM_SPLITS, MIN_PARTITION, ATTN_BLOCK_N)
    pdl.wait(PDL)  # the partials come from the kernel before this one; the lengths from before the step
    rr = tl.arange(0, BLOCK_M)
    rb = rr // S_PAD
    rs = rr % S_PAD
    row_ok = (rb < M) & (rs < tl.reshape(tl.broadcast_to(n_used[:, None], (B_PAD, S_PAD)), (BLOCK_M,)))
    coef = _combine_weights(am_ptr, al_ptr, n_used, M, n_heads, HQ_PAD, B_PAD, S_PAD, NUM_SPLITS)
    hq = tl.arange(0, HQ_PAD)
    rk = tl.arange(0, BLOCK_K)
    x_tile = p_ptr + ((rb * NUM_SPLITS + rs).to(tl.int64) * K)[:, None] + rk[None, :]
    w_tile = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    if SOFT_CAST:  # the interpreter cannot take a tensor as a range() bound
        kb = 0
        while kb < K // BLOCK_K:
            acc = _head_step(acc, kb * BLOCK_K, x_tile, w_tile, row_ok, n_mask, coef, hq, D, BLOCK_K)
            kb += 1
    else:  # compiled: the loop Triton software-pipelines (num_stages)
        for kb in range(0, K // BLOCK_K):
            acc = _head_step(acc, kb * BLOCK_K, x_tile, w_tile, row_ok, n_mask, coef, hq, D, BLOCK_K)
    pdl.trigger(PDL)
    y = tl.sum(tl.reshape(acc, (BLOCK_N, B_PAD, S_PAD)), axis=2)
    rm = tl.arange(0, B_PAD)
    _finish(y, y, rn, n_mask, rm, rm < M, N_OUT, stride_om, out_ptr, out_ptr, out_ptr, out_ptr, out_ptr, 0, 0,
            False, False, False, M, res_ptr, stride_rm, sqo_ptr, nw_ptr, xo_ptr, ADD_RES, BLOCK_N, B_PAD, False)


# --------------------------------------------------------------------------------------------------------------
# launcher

MAX_ROWS = 64
"""Most (sequence, split) rows a launch multiplies (``B_PAD * S_PAD``): the small-M kernel's largest M."""


def rows_pad(batch: int, splits: int):
    """``(B_PAD, S_PAD)``: powers of two covering the batch and the split count, ``B_PAD * S_PAD >= 16`` (the
    MMA's narrowest side)."""
    b_pad = triton.next_power_of_2(max(batch, 1))
    return b_pad, max(triton.next_power_of_2(max(splits, 1)), 16 // min(b_pad, 16))


MAX_WEIGHTS = 4096
"""Most combine weights a program holds through its K loop (``HQ_PAD * B_PAD * S_PAD`` fp32: 32 registers a thread
at 4 warps)."""


def fits(batch: int, splits: int, head_dim: int, n_heads: int) -> bool:
    """Whether a launch takes these partials: at most :data:`MAX_ROWS` rows and :data:`MAX_WEIGHTS` combine
    weights, more than one split (one split writes the attention output itself), a head of at least 16 elements
    (the MMA's K; a K step lies in one head)."""
    b_pad, s_pad = rows_pad(batch, splits)
    return (splits > 1 and b_pad * s_pad <= MAX_ROWS and head_dim >= 16
            and triton.next_power_of_2(n_heads) * b_pad * s_pad <= MAX_WEIGHTS)


def tile_config(n_out: int, k: int, head_dim: int, batch: int, block_m: int, scheme: str, arch: str, sms: int,
                add: bool) -> "smc.GemmConfig":
    """The plain o_proj's tile for this batch (the small-M table's row, else its default rule) with a K step inside
    one head, no split-K, at least 32 rows with the ADD_RES epilogue and the stages that fit ``block_m`` rows."""
    cfg = smc.lookup(arch, scheme, n_out, k, batch, sms)
    cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, head_dim), split_k=1, tma=0,
                              block_n=max(cfg.block_n, smc.SUMSQ_ROWS) if add else cfg.block_n)
    return dataclasses.replace(cfg, num_stages=smc.fit_stages(cfg, block_m, 2, 2, False))


def launch_attn_o_gemm(p, m, l, seq_lens, w, out, *, max_len: int, num_splits: int, min_partition: int,
                       attn_block_n: int, n_heads: int, head_dim: int, scheme: str, arch: str, sms: int,
                       add=None) -> None:
    """``out [B, N]`` (module docstring); inputs validated by :mod:`tpfuse.attention_o`. ``add = (residual [B, N],
    norm_weight [N], x_next [B, N], sumsq_out [N / 32, B])``: the ADD_RES epilogue of :mod:`.small_m_gemm`."""
    from . import fast_launch

    bsz = out.shape[0]
    n_out, k = w.shape
    if not fits(bsz, num_splits, head_dim, n_heads):
        raise ValueError(f"partials of B={bsz}, {num_splits} splits, {n_heads} heads of {head_dim}: not a launch of "
                         f"this kernel (fits)")
    b_pad, s_pad = rows_pad(bsz, num_splits)
    cfg = tile_config(n_out, k, head_dim, bsz, b_pad * s_pad, scheme, arch, sms, add is not None)
    on = pdl.wanted(out)
    res, nw, xo, sqo = add if add is not None else (out, out, out, out)
    args = (p, w, m, l, seq_lens, out, bsz, n_out, k, out.stride(0), n_heads, int(max_len), res,
            res.stride(0) if add is not None else 0, sqo, nw, xo)
    consts = dict(D=head_dim, NUM_SPLITS=num_splits, MIN_PARTITION=min_partition, ATTN_BLOCK_N=attn_block_n,
                  B_PAD=b_pad, S_PAD=s_pad, HQ_PAD=triton.next_power_of_2(n_heads), BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, ADD_RES=add is not None, PDL=pdl.stream_mode(on),
                  PF_LINES=prefetch_lines(n_out, k, 1, w.element_size(), cfg.block_n, bsz) if on else 0)
    fast_launch.launch(_attn_o_gemm_kernel, (triton.cdiv(n_out, cfg.block_n),), args, consts, cfg.num_warps,
                       cfg.num_stages, on)
