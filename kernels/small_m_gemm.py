"""Small-M GEMM in Triton: ``out[M, N] = x[M, K] @ W[N, K]^T`` for decode batches (M <= 64), reading the weight once
at copy bandwidth. Public op: :func:`tpfuse.small_gemm.small_m_gemm`; reference: :func:`tpfuse.reference.small_m_gemm`.

=============  =========================  ============================================================================
operand        dtype                      shape / meaning
=============  =========================  ============================================================================
``x``          bf16, fp16 or e4m3         ``[M, K]``, unit stride along K (row stride ``stride_xm``), 1 <= M <= 64
``w``          x's 16-bit dtype or e4m3   ``[N, K]`` contiguous (nn.Linear layout); ``_silu``: ``[gate (I); up (I)]``
``xs``         fp32                       e4m3 x only: ``[]`` per-tensor (X_SCALE 1) or ``[M]`` per token (2)
``ws``         fp32                       e4m3 W only: ``[]`` per-tensor (W_SCALE 1) or ``[N]`` per channel (2)
``bias``       bf16 / fp16 / fp32         ``[N]`` (optional, HAS_BIAS)
``out``        bf16 / fp16, or e4m3       ``[M, N_OUT]`` (row stride ``stride_om``), N_OUT = N, or I with SILU_MUL;
                                          e4m3 (OUT_FP8) = the static-scale quantization by ``os`` (fp32 ``[]``)
``part``       fp32                       split-K partial sums ``[SPLIT_K, M, N]`` (only with PARTIAL)
=============  =========================  ============================================================================

Math: ``y = (sum_k x[m, k] * w[n, k]) * xs * ws[n] + bias[n]`` in fp32 (products exact, fp32 sums; FP8 dots are
promoted to fp32 every 128 K elements, as ``torch._scaled_mm(use_fast_accum=False)``: within a chunk Hopper's FP8
tensor cores keep about 14 bits of the sum, the likely cause of the one element one e4m3 step too far on one H100
where SiLU*mul's up sum cancels; ``tests/test_small_m_gemm.py`` allows that error), SILU_MUL: ``silu(y_gate) *
y_up`` (``g / (1 + exp(-g)) * u``, the SiLU*mul kernel's formula), then rounded once to ``out``'s dtype (or
quantized: ``clamp(y * (1 / os), +-448)`` to e4m3, round to nearest even).

Design (Hopper):

* **Swap AB.** A program computes an ``[BLOCK_N, BLOCK_M]`` tile ``W_tile @ x_tile^T``: the weight is the MMA's A
  operand (M side of the instruction: 64-row wgmma tiles, or mma.sync below 64) and the few tokens its N side,
  padded to BLOCK_M = max(16, next_pow2(M)) (tl.dot's minimum) by masked loads; nothing is padded in memory. An e4m3
  weight with a 16-bit x is converted in registers (exact), which only the A operand allows on Hopper (that
  weight-only scheme compiles to 8-byte cp.async and a pass through shared memory for the layout conversion: 0.45-0.60
  of the copy bandwidth on one H100, ``bench/results/small_gemm_h100_w8_66e53a3.json``; the model path takes it only
  with ``KVCacheConfig.fp8_weight_only_max_tokens``, off).
* **Tensor cores even at M = 1.** The padded MMA work is 16-300x below the memory time at every M here,
  and only loads that feed ``tl.dot`` get Triton's multi-stage ``cp.async`` pipeline (``num_stages``), which keeps
  ``num_stages`` tiles of ``BLOCK_N x BLOCK_K`` weight bytes in flight per program; a dot-free loop relies on
  occupancy alone for memory parallelism. The one exception, off (:data:`FMA_MAX_M`: measured slower than the
  activation-quantized scheme at batch 1): weight-only launches of a few rows, whose
  tensor-core form must pass the e4m3 tile through shared memory to convert it; there ``FMA`` loads the weight
  and x as ``[BLOCK_N, BLOCK_M, BLOCK_K]`` tiles in one register layout (x re-read per weight row from L1),
  converts and multiplies in registers, sums each lane's 16-byte run of K in the lane and keeps those fp32 partial
  sums through the K loop, adding them along K once after it (at M 1 the loop has no shuffles, shared memory or
  barriers in its sm_90 PTX; at M 4 x goes through shared memory); ``BLOCK_M`` is M rounded up to a power of two,
  not 16; :func:`fma_config` splits K for occupancy.
* **Weights streamed once**, rows of 256 bytes per step (16-byte loads along K); all M rows live in one program,
  so no weight byte is read twice; x (at most 64 x K) is re-read per program from L2. ``GemmConfig.tma`` (a table
  row's choice; ``W_DESC``): the weight tile comes as one TMA bulk copy from a host-side descriptor
  (:func:`weight_desc`, zero past the weight's edges, boxes of at most 256 elements a side) into the pipeline's
  shared-memory stages instead of each thread's ``cp.async``; no L2 prefetch before the PDL wait there; same bits.
  Measured no faster on one H100 (``GemmConfig.tma`` says where): the shipped tables never ask for it.
* **Split-K, deterministic**: with ``SPLIT_K > 1`` program ``(n, s)`` sums the K steps
  ``[s * n_kb // SPLIT_K, (s + 1) * n_kb // SPLIT_K)`` and stores raw fp32 partials, which are added in order
  0..SPLIT_K-1 and go through the epilogue once. Why: bitwise-reproducible results (replays, runs, ranks), an
  epilogue that needs the full sum (scales, bias, SiLU*mul, FP8 quantization) applied once, no memset of an fp32
  output. Cost: ``2 * SPLIT_K * M * N * 4`` bytes, small at decode M; the sweep keeps split-K only where it wins.
  **Serial split-K** (:data:`SERIAL`, :func:`_small_m_gemm_serial_kernel`, launches without norm / residual
  epilogues): after its partial store each program takes a ticket (a CTA barrier, one acq_rel GPU-scope atomic
  from one thread) from its N tile's int32 counter (:func:`serial_counters`), and the tile's last program re-arms
  the counter to 0, sums the partials and runs the epilogue (the "last block" pattern of decode attention's fused
  combine; nothing spins). Else :func:`_split_k_reduce_kernel` does it in a launch of its own, as the folded-norm
  launches and captures that would have to allocate the counters do.
* Grid ``(cdiv(N_OUT, BLOCK_N), SPLIT_K)`` from shapes only, workspace from the caching allocator: CUDA-graph safe.

Folded RMSNorm (``_small_m_gemm_norm_kernel``, the same program with two more constexprs; the model's decode layers
at TP = 1 with ``KVCacheConfig.fold_norms``). ``RMSNorm(h) @ W.T = rstd[m] * ((h * w_norm) @ W.T)``: the
per-feature weight goes into the rows the previous GEMM writes, the per-token rstd into this GEMM's epilogue, so
the K loop is the plain one (x tiles straight from ``cp.async`` into the MMA):

* **ADD_RES** (o_proj, down_proj): the epilogue rounds ``y`` to the output dtype, adds ``residual[m, n]`` in fp32,
  rounds again (the unfused GEMM + add + RMSNorm round the same two times) and stores ``h``; stores the next GEMM's
  rows ``round(h * w_norm[n])`` into ``xo``; and each ``SQ_GROUP`` (32) rows of its tile sum ``h^2`` per token into
  ``sqo[n / 32, m]`` (fp32, plain stores, no atomics: every partial has one writer, the sum order is fixed). With
  split-K the reduce kernel's epilogue does it (``_split_k_reduce_add_kernel``). Tiles are at least 32 rows (the
  launcher raises BLOCK_N to 32).
* **NORM_IN** (qkv; gate-up with SiLU*mul): its loads of the ``[P, M]`` partials are issued before the K loop
  where they take at most 32 registers a thread (``BLOCK_M * SQ_BLOCK <= 4096``: M <= 16 at hidden 4096), else
  after it; summed to ``rstd[m]``, which multiplies the fp32 sums after the loop (before split-K's partials are
  stored: the scale is linear), ahead of bias and SiLU*mul. A first version normalized the x tiles in the K loop
  (the add + RMSNorm kernel's rounding): the tile then went through registers and back to shared memory every K
  step, and the 8B's decode step took 1.01 / 1.02 / 1.29x as long at batch 1 / 8 / 64 as without the fold (one
  H100, 57948f7, ``bench/results/e2e_tp1_h100_full_57948f7.json``). This form: 0.99 / 1.00 / 1.00x (one H200,
  0fc9473, ``e2e_tp1_h200_full_0fc9473.json``); with PDL and today's routing 0.986 / 0.993 / 1.001x (one H100,
  1c5cd04, ``e2e_tp1_h100_fold_ab_1c5cd04.json``), so the model folds by default (``KVCacheConfig.fold_norms``).

Partial maxima (AMAX_OUT, the same kernel; :func:`tpfuse.small_gemm.small_m_gemm_amax`): the epilogue also stores,
per token, the max ``|out|`` of each 32 rows of its tile as stored (``sqo [N_OUT / 32, M]``, plain stores, one
writer each; split-K 1), so a per-token FP8 quantizer of ``out`` needs no pass over the row for its scale
(:func:`tpfuse.ops.quantize_from_amax`: many programs per row instead of the one that must see the whole row). A
version that quantized x per token in the next GEMM's K loop from these maxima (x tiles through registers to the
MMA) made the 8B's FP8 decode step 1.07 / 1.13 / 1.25x as long at batch 1 / 8 / 64 (one H100, fa22657,
``bench/results/e2e_tp1_h100_amax_ab_fa22657.json``: down-proj 41.8 us a layer exposed instead of ~24,
``profile_decode_tp1_h100_8B_b1_fp8_amaxchain_fa22657.json``); it is gone.

Launch configs (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) come from :mod:`.small_m_configs` (the tuned table, else
its default rule). Under the Triton interpreter (TRITON_INTERPRET=1 at import, tests) e4m3 operands are decoded by
integer ops and multiplied in fp32, and the bf16 / e4m3 output casts round explicitly (the interpreter's casts are
not round-to-nearest-even), as in :mod:`.quant_epilogue`.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from . import pdl
from . import small_m_configs as smc
from .quant_epilogue import SOFT_CAST, cast_for_store, fp8_cast, max_nan, rstd_from_sumsq

SCALE_NONE, SCALE_TENSOR, SCALE_ROW = 0, 1, 2
# FP8 wgmma partial sums are added into the fp32 accumulator at least every 128 K elements (as CUTLASS promotes)
IMPRECISE_MAX: tl.constexpr = tl.constexpr(128)
REDUCE_BLOCK_N = 64
SQ_ROWS = smc.SUMSQ_ROWS  # weight rows (output columns) per partial sum of squares of ADD_RES
SQ_GROUP: tl.constexpr = tl.constexpr(SQ_ROWS)
# The CUDA-core loop's in-lane run along K: one 16-byte load of e4m3 weights (Triton's vector width along K)
FMA_VEC: tl.constexpr = tl.constexpr(16)


@triton.jit
def _e4m3_to_f32(v):
    """Interpreter: exact e4m3 -> fp32 by integer ops (its own decode turns NaN into 480)."""
    bits = v.to(tl.uint8, bitcast=True).to(tl.int32)
    mag = bits & 0x7F
    e = mag >> 3
    normal = (((e + 120) << 23) | ((mag & 7) << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e == 0, (mag & 7).to(tl.float32) * 0.001953125, normal)
    val = tl.where(mag == 0x7F, float("nan"), val)
    return tl.where((bits & 0x80) != 0, -val, val)


@triton.jit
def _dot(acc, w, xt, X_FP8: tl.constexpr, W_FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc + w @ xt`` (fp32): ``w [BLOCK_N, BLOCK_K]``, ``xt [BLOCK_K, BLOCK_M]``. The interpreter multiplies
    16-bit operands as raw bits and decodes e4m3 NaN as 480: there the exact fp32 values are multiplied."""
    if SOFT_CAST:
        wf = _e4m3_to_f32(w) if W_FP8 else w.to(tl.float32)
        xf = _e4m3_to_f32(xt) if X_FP8 else xt.to(tl.float32)
        return tl.dot(wf, xf, acc, input_precision="ieee")
    elif X_FP8:
        IMPRECISE: tl.constexpr = BLOCK_K if BLOCK_K < IMPRECISE_MAX else IMPRECISE_MAX
        return tl.dot(w, xt, acc, max_num_imprecise_acc=IMPRECISE)
    elif W_FP8:
        return tl.dot(w.to(xt.dtype), xt, acc)  # e4m3 -> bf16 / fp16 is exact
    else:
        return tl.dot(w, xt, acc)


@triton.jit
def _fma_dot(acc, w, x, W_FP8: tl.constexpr):
    """``acc [BLOCK_N, BLOCK_M, BLOCK_K / FMA_VEC]`` plus the products ``w[n, k] * x[m, k]`` (fp32 FMAs on the CUDA
    cores) summed over each run of ``FMA_VEC`` consecutive k: ``w [BLOCK_N, 1, BLOCK_K]`` straight from the
    registers it was loaded into (an e4m3 weight converted there), ``x [BLOCK_N, BLOCK_M, BLOCK_K]`` 16-bit (the
    same values for every row). A run is one lane's 16-byte weight load, so the sum stays in the lane (no shuffles
    in the loop); the lanes' sums are added along K once after the loop."""
    wf = _e4m3_to_f32(w) if (SOFT_CAST and W_FP8) else w.to(tl.float32)
    prod = wf * x.to(tl.float32)
    BN: tl.constexpr = prod.shape[0]
    BM: tl.constexpr = prod.shape[1]
    BK: tl.constexpr = prod.shape[2]
    return acc + tl.sum(tl.reshape(prod, (BN, BM, BK // FMA_VEC, FMA_VEC)), axis=3)


@triton.jit
def _k_step(acc, acc_u, kb, x_tile, w_tile, up, rk, m_mask, n_mask, K, X_FP8: tl.constexpr, W_FP8: tl.constexpr,
            SILU_MUL: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, FMA: tl.constexpr = False,
            W_DESC: tl.constexpr = False, n0=0):
    """One BLOCK_K step of the main loop: x and weight tiles (the up rows too with SILU_MUL) into the sums; FMA:
    by :func:`_fma_dot` (no tensor-core MMA, no shared-memory pass). W_DESC: ``w_tile`` is the weight's TMA
    descriptor and the tile rows ``[n0, n0 + BLOCK_N)`` (``up`` rows further for the up tile), zero past the
    weight's edges."""
    k0 = kb * BLOCK_K
    if EVEN_K:
        x_mask = m_mask[:, None]
        w_mask = n_mask[:, None]
    else:
        k_ok = (k0 + rk) < K
        x_mask = m_mask[:, None] & k_ok[None, :]
        w_mask = n_mask[:, None] & k_ok[None, :]
    if FMA:  # 3-D tiles [BLOCK_N, BLOCK_M, BLOCK_K] from the loads on, x read for every weight row (the same
        # addresses: L1 hits): one register layout for both, no layout conversion through shared memory
        rows = tl.zeros_like(n_mask.to(tl.int32))[:, None, None]  # the pointers' [BLOCK_N, 1, 1] broadcast
        xk = tl.load(x_tile[None, :, :] + k0 + rows, mask=x_mask[None, :, :], other=0.0)
        wk = w_tile[:, None, :] + k0
        acc = _fma_dot(acc, tl.load(wk, mask=w_mask[:, None, :], other=0.0), xk, W_FP8)
        if SILU_MUL:
            acc_u = _fma_dot(acc_u, tl.load(wk + up, mask=w_mask[:, None, :], other=0.0), xk, W_FP8)
    elif W_DESC:
        xt = tl.trans(tl.load(x_tile + k0, mask=x_mask, other=0.0))
        acc = _dot(acc, w_tile.load([n0, k0]), xt, X_FP8, W_FP8, BLOCK_K)
        if SILU_MUL:
            acc_u = _dot(acc_u, w_tile.load([n0 + up, k0]), xt, X_FP8, W_FP8, BLOCK_K)
    else:
        xt = tl.trans(tl.load(x_tile + k0, mask=x_mask, other=0.0))
        acc = _dot(acc, tl.load(w_tile + k0, mask=w_mask, other=0.0), xt, X_FP8, W_FP8, BLOCK_K)
        if SILU_MUL:
            acc_u = _dot(acc_u, tl.load(w_tile + up + k0, mask=w_mask, other=0.0), xt, X_FP8, W_FP8, BLOCK_K)
    return acc, acc_u


@triton.jit
def _scale_bias(acc, rows, n_mask, rm, m_mask, xs_ptr, ws_ptr, b_ptr, X_SCALE: tl.constexpr,
                W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 ``acc [BLOCK_N, BLOCK_M]`` of weight rows ``rows`` times the scales, plus the bias."""
    if W_SCALE == 1:
        acc = acc * tl.load(ws_ptr)
    elif W_SCALE == 2:
        acc = acc * tl.load(ws_ptr + rows, mask=n_mask, other=0.0)[:, None]
    if X_SCALE == 1:
        acc = acc * tl.load(xs_ptr)
    elif X_SCALE == 2:
        acc = acc * tl.load(xs_ptr + rm, mask=m_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _store_add_sumsq(y, rn, n_mask, rm, m_mask, M, N_OUT, stride_om, out_ptr, res_ptr, stride_rm, sqo_ptr, nw_ptr,
                     xo_ptr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """ADD_RES epilogue: ``h = round(round(y) + residual)`` stored into ``out`` (the two roundings of the unfused
    pair: the GEMM's output, then the add + RMSNorm kernel's ``residual_out``), the next GEMM's input rows
    ``round(h * norm_weight)`` into ``xo`` (same strides), and each 32-row group's sum of ``h^2`` per token into
    ``sqo [N_OUT / 32, M]`` (that GEMM's NORM_IN rstd)."""
    mask = n_mask[:, None] & m_mask[None, :]
    dt = out_ptr.dtype.element_ty
    r = tl.load(res_ptr + rm[None, :] * stride_rm + rn[:, None], mask=mask, other=0.0).to(tl.float32)
    wn = tl.load(nw_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    h = cast_for_store(cast_for_store(y, dt).to(tl.float32) + r, dt)
    tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], h, mask=mask)
    hf = h.to(tl.float32)
    tl.store(xo_ptr + rm[None, :] * stride_om + rn[:, None], cast_for_store(hf * wn[:, None], dt), mask=mask)
    sq = tl.where(mask, hf * hf, 0.0)
    GROUPS: tl.constexpr = BLOCK_N // SQ_GROUP
    part = tl.sum(tl.reshape(sq, (GROUPS, SQ_GROUP, BLOCK_M)), axis=1)
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    tl.store(sqo_ptr + g[:, None] * M + rm[None, :], part, mask=(g < N_OUT // SQ_GROUP)[:, None] & m_mask[None, :])


@triton.jit
def _store_amax(v, n_mask, rm, m_mask, M, N_OUT, sqo_ptr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """AMAX_OUT: each ``SQ_GROUP`` (32) rows of the stored tile ``v`` (as stored, in fp32) give their max ``|v|``
    per token into ``sqo [N_OUT / 32, M]`` (NaN-propagating; plain stores: one writer each, as the sums of squares
    of :func:`_store_add_sumsq`): what :func:`tpfuse.ops.quantize_from_amax` takes the per-token FP8 scale from."""
    a = tl.where(n_mask[:, None] & m_mask[None, :], tl.abs(v), 0.0)
    GROUPS: tl.constexpr = BLOCK_N // SQ_GROUP
    part = tl.reduce(tl.reshape(a, (GROUPS, SQ_GROUP, BLOCK_M)), 1, max_nan)
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    tl.store(sqo_ptr + g[:, None] * M + rm[None, :], part, mask=(g < N_OUT // SQ_GROUP)[:, None] & m_mask[None, :])


@triton.jit
def _finish(acc, acc_u, rn, n_mask, rm, m_mask, N_OUT, stride_om, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr,
            X_SCALE: tl.constexpr, W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
            OUT_FP8: tl.constexpr, M, res_ptr, stride_rm, sqo_ptr, nw_ptr, xo_ptr, ADD_RES: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, AMAX_OUT: tl.constexpr):
    """Epilogue of the full K sum: scales, bias, SiLU*mul, one rounding (or static FP8 quantization), store of the
    transposed tile into ``out[m, n]``; ADD_RES: :func:`_store_add_sumsq` instead of the plain store; AMAX_OUT:
    :func:`_store_amax` of the rounded tile too."""
    y = _scale_bias(acc, rn, n_mask, rm, m_mask, xs_ptr, ws_ptr, b_ptr, X_SCALE, W_SCALE, HAS_BIAS)
    if SILU_MUL:
        u = _scale_bias(acc_u, rn + N_OUT, n_mask, rm, m_mask, xs_ptr, ws_ptr, b_ptr, X_SCALE, W_SCALE, HAS_BIAS)
        y = (y / (1.0 + tl.exp(-y))) * u
    if ADD_RES:
        _store_add_sumsq(y, rn, n_mask, rm, m_mask, M, N_OUT, stride_om, out_ptr, res_ptr, stride_rm, sqo_ptr, nw_ptr,
                         xo_ptr, BLOCK_N, BLOCK_M)
    else:
        dst = out_ptr + rm[None, :] * stride_om + rn[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
        if OUT_FP8:
            inv = tl.math.div_rn(1.0, tl.load(os_ptr))
            tl.store(dst, fp8_cast(y * inv), mask=mask)
        else:
            v = cast_for_store(y, out_ptr.dtype.element_ty)
            tl.store(dst, v, mask=mask)
            if AMAX_OUT:
                _store_amax(v.to(tl.float32), n_mask, rm, m_mask, M, N_OUT, sqo_ptr, BLOCK_N, BLOCK_M)


@triton.jit
def _prefetch_weight(w_ptr, rn, n_mask, K, kb_lo, kb_hi, up, SILU_MUL: tl.constexpr, BLOCK_K: tl.constexpr,
                     PF_LINES: tl.constexpr):
    """L2 prefetch of the first ``PF_LINES`` 128-byte lines of this program's K range of its weight rows (and
    their up rows with SILU_MUL), clipped to the range: issued before the PDL wait."""
    LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
    k = kb_lo * BLOCK_K + tl.arange(0, PF_LINES) * LINE
    ok = n_mask[:, None] & ((k < kb_hi * BLOCK_K) & (k < K))[None, :]
    ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + k[None, :]
    pdl.prefetch_l2(ptrs, ok)
    if SILU_MUL:
        pdl.prefetch_l2(ptrs + up, ok)


@triton.jit
def _load_partials(sq_ptr, n_sq, rm, m_mask, M, SQ_BLOCK: tl.constexpr):
    """NORM_IN: the ``[n_sq, M]`` partial sums of squares (summed after the K loop)."""
    rp = tl.arange(0, SQ_BLOCK)
    return tl.load(sq_ptr + rp[:, None] * M + rm[None, :], mask=(rp < n_sq)[:, None] & m_mask[None, :], other=0.0)


@triton.jit
def _gemm_program(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, part_ptr, M, N_OUT, K, stride_xm, stride_om,
                  n_kb, split_k, nw_ptr, sq_ptr, n_sq, eps, res_ptr, stride_rm, sqo_ptr, xo_ptr,
                  X_FP8: tl.constexpr, W_FP8: tl.constexpr, X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, OUT_FP8: tl.constexpr, PARTIAL: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PDL: tl.constexpr, PF_LINES: tl.constexpr, NORM_IN: tl.constexpr, ADD_RES: tl.constexpr,
                  SQ_BLOCK: tl.constexpr, AMAX_OUT: tl.constexpr, FMA: tl.constexpr = False,
                  W_DESC: tl.constexpr = False):
    """One program of the GEMM (the kernel entries below). W_DESC: ``w_ptr`` is the weight's TMA descriptor
    (block ``[BLOCK_N, BLOCK_K]``)."""
    # weights never come from the previous kernel: start streaming them before the wait (pointer loads only)
    if PDL and PF_LINES > 0 and not W_DESC:
        rn_pf = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        _prefetch_weight(w_ptr, rn_pf, rn_pf < N_OUT, K, tl.program_id(1) * n_kb // split_k,
                         (tl.program_id(1) + 1) * n_kb // split_k, N_OUT.to(tl.int64) * K, SILU_MUL, BLOCK_K,
                         PF_LINES)
    pdl.wait(PDL)
    pid_k = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N_OUT
    m_mask = rm < M
    if W_DESC:
        w_tile = w_ptr
    else:
        w_tile = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    x_tile = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    if W_DESC:
        up = N_OUT  # the up rows of a fused gate-up weight start at row I = N_OUT (a row index of the descriptor)
    else:
        up = N_OUT.to(tl.int64) * K  # the up rows of a fused gate-up weight start at row I = N_OUT
    n0 = tl.program_id(0) * BLOCK_N
    if FMA:  # per-lane partial sums (:func:`_fma_dot`), added along K after the loop
        acc = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_K // FMA_VEC), tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_K // FMA_VEC), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    # NORM_IN's partials: loaded before the K loop (their latency hides behind the weight stream) where they take
    # at most 32 registers a thread at 4 warps, else after it (held through the loop they would crowd the MMA's)
    SQ_EARLY: tl.constexpr = NORM_IN and BLOCK_M * SQ_BLOCK <= 4096
    sq = _load_partials(sq_ptr, n_sq, rm, m_mask, M, SQ_BLOCK) if SQ_EARLY else 0.0
    kb_lo = pid_k * n_kb // split_k
    kb_hi = (pid_k + 1) * n_kb // split_k
    if SOFT_CAST:  # the interpreter cannot take a tensor as a range() bound (its scalars are 1-element arrays)
        kb = kb_lo
        while kb < kb_hi:
            acc, acc_u = _k_step(acc, acc_u, kb, x_tile, w_tile, up, rk, m_mask, n_mask, K, X_FP8, W_FP8, SILU_MUL,
                                 EVEN_K, BLOCK_K, FMA, W_DESC, n0)
            kb += 1
    else:  # compiled: the for loop Triton software-pipelines (num_stages)
        for kb in range(kb_lo, kb_hi):
            acc, acc_u = _k_step(acc, acc_u, kb, x_tile, w_tile, up, rk, m_mask, n_mask, K, X_FP8, W_FP8, SILU_MUL,
                                 EVEN_K, BLOCK_K, FMA, W_DESC, n0)
    pdl.trigger(PDL)  # the weights are read: the next kernel may start launching (kernels/pdl.py)
    if FMA:
        acc = tl.sum(acc, axis=2)
        acc_u = tl.sum(acc_u, axis=2)
    if NORM_IN:  # linear in x: the partial sums of split-K take it too
        if not SQ_EARLY:
            sq = _load_partials(sq_ptr, n_sq, rm, m_mask, M, SQ_BLOCK)
        rstd = rstd_from_sumsq(tl.sum(sq, 0), K, eps)
        acc = acc * rstd[None, :]
        if SILU_MUL:
            acc_u = acc_u * rstd[None, :]
    if PARTIAL:
        n_w = 2 * N_OUT if SILU_MUL else N_OUT
        dst = part_ptr + (pid_k * M + rm).to(tl.int64)[None, :] * n_w + rn[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
        tl.store(dst, acc, mask=mask)
        if SILU_MUL:
            tl.store(dst + N_OUT, acc_u, mask=mask)
    else:
        _finish(acc, acc_u, rn, n_mask, rm, m_mask, N_OUT, stride_om, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr,
                X_SCALE, W_SCALE, HAS_BIAS, SILU_MUL, OUT_FP8, M, res_ptr, stride_rm, sqo_ptr, nw_ptr, xo_ptr, ADD_RES,
                BLOCK_N, BLOCK_M, AMAX_OUT)


@triton.jit(do_not_specialize=["M", "n_kb", "split_k"])
def _small_m_gemm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, part_ptr,
                         M, N_OUT, K, stride_xm, stride_om, n_kb, split_k,
                         X_FP8: tl.constexpr, W_FP8: tl.constexpr, X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, OUT_FP8: tl.constexpr,
                         PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                         PF_LINES: tl.constexpr = 0, FMA: tl.constexpr = False, W_DESC: tl.constexpr = False):
    _gemm_program(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, part_ptr, M, N_OUT, K, stride_xm, stride_om,
                  n_kb, split_k, x_ptr, x_ptr, 0, 0.0, x_ptr, 0, x_ptr, x_ptr, X_FP8, W_FP8, X_SCALE, W_SCALE, HAS_BIAS,
                  SILU_MUL, OUT_FP8, PARTIAL, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, PDL, PF_LINES, False, False, 1, False,
                  FMA, W_DESC)


@triton.jit(do_not_specialize=["M", "n_kb", "split_k", "n_sq"])
def _small_m_gemm_norm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, part_ptr,
                              M, N_OUT, K, stride_xm, stride_om, n_kb, split_k,
                              nw_ptr, sq_ptr, n_sq, eps, res_ptr, stride_rm, sqo_ptr, xo_ptr,
                              X_FP8: tl.constexpr, W_FP8: tl.constexpr, X_SCALE: tl.constexpr,
                              W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                              OUT_FP8: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              PDL: tl.constexpr, PF_LINES: tl.constexpr, NORM_IN: tl.constexpr,
                              ADD_RES: tl.constexpr, SQ_BLOCK: tl.constexpr, AMAX_OUT: tl.constexpr,
                              FMA: tl.constexpr = False, W_DESC: tl.constexpr = False):
    """The GEMM with per-token data passed to the next kernel through ``[P, M]`` partials (module docstring,
    "Folded RMSNorm" and "Partial maxima"): NORM_IN scales each token's sums by its rstd, ADD_RES adds the residual
    and writes the next GEMM's rows and the sums of squares, AMAX_OUT writes the output's partial maxima
    (``sqo``)."""
    _gemm_program(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, part_ptr, M, N_OUT, K, stride_xm, stride_om,
                  n_kb, split_k, nw_ptr, sq_ptr, n_sq, eps, res_ptr, stride_rm, sqo_ptr, xo_ptr, X_FP8, W_FP8, X_SCALE,
                  W_SCALE, HAS_BIAS, SILU_MUL, OUT_FP8, PARTIAL, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, PDL, PF_LINES,
                  NORM_IN, ADD_RES, SQ_BLOCK, AMAX_OUT, FMA, W_DESC)


@triton.jit(do_not_specialize=["M", "n_kb", "split_k"])
def _small_m_gemm_serial_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, part_ptr, cnt_ptr,
                                M, N_OUT, K, stride_xm, stride_om, n_kb, split_k,
                                X_FP8: tl.constexpr, W_FP8: tl.constexpr, X_SCALE: tl.constexpr,
                                W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                                OUT_FP8: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                                PF_LINES: tl.constexpr = 0, FMA: tl.constexpr = False,
                                W_DESC: tl.constexpr = False):
    """Split-K without the reduce kernel (module docstring, "Serial split-K"): each program stores its partial, then
    (a CTA barrier, one acq_rel GPU-scope atomic from one thread) takes a ticket from its N tile's int32 counter;
    the program drawing the last ticket re-arms the counter, sums the tile's ``split_k`` partials in split order
    (the reduce kernel's order: the same bits) and runs the epilogue."""
    _gemm_program(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, part_ptr, M, N_OUT, K, stride_xm, stride_om,
                  n_kb, split_k, x_ptr, x_ptr, 0, 0.0, x_ptr, 0, x_ptr, x_ptr, X_FP8, W_FP8, X_SCALE, W_SCALE, HAS_BIAS,
                  SILU_MUL, OUT_FP8, True, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, PDL, PF_LINES, False, False, 1, False,
                  FMA, W_DESC)
    tl.debug_barrier()  # every thread's partial stores before the one thread's release
    cnt = cnt_ptr + tl.program_id(0)
    ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
    if ticket == split_k - 1:
        tl.store(cnt, 0)  # every split of this tile has counted: re-armed for the next launch
        _reduce_program(part_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, M, N_OUT, stride_om, split_k, out_ptr, 0,
                        out_ptr, out_ptr, out_ptr, X_SCALE, W_SCALE, HAS_BIAS, SILU_MUL, OUT_FP8, BLOCK_M, BLOCK_N,
                        False, False)  # this tile: program_id(0) of both grids is the N tile


@triton.jit
def _sum_partials(part_ptr, rn, n_mask, rm, m_mask, M, N_OUT, split_k, SILU_MUL: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """The fp32 sums of an N tile's ``split_k`` partials ``[split_k, M, n_w]``, in split order (deterministic)."""
    mask = n_mask[:, None] & m_mask[None, :]
    n_w = 2 * N_OUT if SILU_MUL else N_OUT
    src = part_ptr + rm.to(tl.int64)[None, :] * n_w + rn[:, None]
    slab = M.to(tl.int64) * n_w
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    s = 0
    while s < split_k:  # a while loop: the interpreter takes no tensor range() bound; nothing to pipeline here
        acc += tl.load(src + s * slab, mask=mask, other=0.0)
        if SILU_MUL:
            acc_u += tl.load(src + s * slab + N_OUT, mask=mask, other=0.0)
        s += 1
    return acc, acc_u


@triton.jit
def _reduce_program(part_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, M, N_OUT, stride_om, split_k, res_ptr,
                    stride_rm, sqo_ptr, nw_ptr, xo_ptr, X_SCALE: tl.constexpr, W_SCALE: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, OUT_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PDL: tl.constexpr, ADD_RES: tl.constexpr):
    """Sum of the ``split_k`` partials in split order (deterministic), then the epilogue."""
    pdl.enter(PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_mask = rn < N_OUT
    m_mask = rm < M
    acc, acc_u = _sum_partials(part_ptr, rn, n_mask, rm, m_mask, M, N_OUT, split_k, SILU_MUL, BLOCK_N, BLOCK_M)
    _finish(acc, acc_u, rn, n_mask, rm, m_mask, N_OUT, stride_om, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr,
            X_SCALE, W_SCALE, HAS_BIAS, SILU_MUL, OUT_FP8, M, res_ptr, stride_rm, sqo_ptr, nw_ptr, xo_ptr, ADD_RES,
            BLOCK_N, BLOCK_M, False)


@triton.jit(do_not_specialize=["M", "split_k"])
def _split_k_reduce_kernel(part_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, M, N_OUT, stride_om, split_k,
                           X_SCALE: tl.constexpr, W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SILU_MUL: tl.constexpr, OUT_FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    _reduce_program(part_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, M, N_OUT, stride_om, split_k, out_ptr, 0,
                    out_ptr, out_ptr, out_ptr, X_SCALE, W_SCALE, HAS_BIAS, SILU_MUL, OUT_FP8, BLOCK_M, BLOCK_N, PDL,
                    False)


@triton.jit(do_not_specialize=["M", "split_k"])
def _split_k_reduce_add_kernel(part_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, M, N_OUT, stride_om, split_k,
                               res_ptr, stride_rm, sqo_ptr, nw_ptr, xo_ptr, X_SCALE: tl.constexpr,
                               W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                               OUT_FP8: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """The split-K reduce of an ADD_RES GEMM."""
    _reduce_program(part_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, os_ptr, M, N_OUT, stride_om, split_k, res_ptr,
                    stride_rm, sqo_ptr, nw_ptr, xo_ptr, X_SCALE, W_SCALE, HAS_BIAS, SILU_MUL, OUT_FP8, BLOCK_M, BLOCK_N,
                    PDL, True)


# --------------------------------------------------------------------------------------------------------------
# launcher


PREFETCH_BYTES_TRIED = 16 << 20
"""The one prefetch budget timed end to end (:data:`PREFETCH_BYTES`); the benchmarks' prefetch rows use it."""
PREFETCH_BYTES = 0
"""Weight bytes one small-M GEMM launched with PDL prefetches into L2 before its wait at every M (:func:`prefetch_lines`;
0: :data:`PREFETCH_MAX_M`'s rule). Off: on the full 8B (one H100, ``bench/results/e2e_tp1_h100_ab_4dbc35c.json``)
:data:`PREFETCH_BYTES_TRIED` a launch (a third of the L2) with the decode attention's prefetch made the decode step
0.1-3.1% slower than neither at every batch and format (rows ``_smallall_pdl`` vs ``_smallall_pdl_nopf``); a knob
for other GPUs and shapes."""
PREFETCH_SMALL_BYTES = 1 << 20
"""The budget of :data:`PREFETCH_MAX_M`'s rule: at 1 MiB a launch each program prefetches the first 1-4 lines of
its weight rows (the 8B's qkv 1, o / down 2, gate-up none; the 70B TP 8 rank's qkv 4, the others 1)."""
PREFETCH_MAX_M = 1
"""Launches of at most this many rows prefetch :data:`PREFETCH_SMALL_BYTES` when :data:`PREFETCH_BYTES` is 0 (0:
none): batch-1 decode steps. Rows ``_gpf1m`` (1 MiB at every M) over the step without: one H100 at 25be4f6
(``bench/results/e2e_tp1_h100_hoist_ab_25be4f6.json``, ``..._shards_hoist_ab_25be4f6.json``) 0.998 / 0.995 / 1.000x
at batch 1 on the full 8B (bf16 / per-channel / static FP8), 0.983 / 0.996 / 0.991x on the 70B TP 8 / 70B TP 4 /
8B TP 2 shards, but 0.996 / 1.003 / 1.023x at batch 8; another H100 at 2a634c5 (``e2e_tp1_h100_gpf_ab_2a634c5.json``,
``..._shards_gpf_ab_2a634c5.json``, batch 1) 0.999 / 0.998 / 0.999x and 0.982 / 0.995 / 0.994x, and the model's
PDL graph decode with it (``test_graph_decode_through_the_kernel_and_with_pdl_matches_the_oracle``, mode "gpf": bit
for bit as without PDL) passed there at TP 1 and one-GPU TP 2."""
MAX_PF_LINES = 32  # 4 KB of each weight row
MAX_PF_POINTERS = 2048  # BLOCK_N x lines: 16 int64 pointers a thread at 4 warps


def prefetch_lines(n_w: int, k: int, split: int, elem: int, block_n: int, m: int = 1) -> int:
    """128-byte lines of each weight row a PDL launch of ``m`` rows prefetches (the constexpr ``PF_LINES``): the
    budget (:data:`PREFETCH_BYTES`, else :data:`PREFETCH_SMALL_BYTES` at ``m <= PREFETCH_MAX_M``) spread over the
    ``n_w`` rows, at most one program's K range (``k / split``), rounded down to a power of two (``tl.arange``), at
    most :data:`MAX_PF_LINES` and ``MAX_PF_POINTERS / block_n``; 0 below one line."""
    budget = PREFETCH_BYTES or (PREFETCH_SMALL_BYTES if m <= PREFETCH_MAX_M else 0)
    per_row = min(budget // max(n_w, 1), (k // max(split, 1)) * elem)
    lines = min(per_row // 128, MAX_PF_LINES, MAX_PF_POINTERS // block_n)
    return 1 << (lines.bit_length() - 1) if lines >= 1 else 0


SERIAL = True
"""Split-K launches of :func:`launch_small_m_gemm` without norm / residual epilogues reduce in the GEMM kernel's
last program of each N tile (:func:`_small_m_gemm_serial_kernel`) instead of a reduce kernel (False: the reduce
kernel always). Same bits either way (the partials are summed in split order by both)."""
COUNTERS_MIN = 4096  # int32 tickets: one an N tile (28672 / 16 = 1792 at the narrowest tile of the 8B's gate-up)
_COUNTERS: dict = {}  # device -> the zeroed ticket counters (all zero between launches)
_KEEP: list = []  # every counter buffer ever handed out: graphs captured with a smaller one still point at it


def serial_counters(device: torch.device, tiles: int):
    """The zeroed int32 ticket counters of a serial split-K launch of ``tiles`` N tiles, or None where a CUDA graph
    capture would have to allocate them (that launch takes the reduce kernel). One buffer a device: serial
    launches on different streams must not overlap in time (the model path launches them on one stream)."""
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        cnt = torch.zeros(max(tiles, COUNTERS_MIN), dtype=torch.int32, device=device)
        _KEEP.append(cnt)
        _COUNTERS[device] = cnt
    return cnt


def reset_serial_counters() -> None:
    """Zero every serial split-K ticket counter (zero between launches unless a launch stopped part-way, e.g. a
    CUDA error: after one, call this or start a new process)."""
    for cnt in _KEEP:
        cnt.zero_()


def scale_kind(scale, rows: int) -> int:
    """SCALE_NONE / SCALE_TENSOR (one element, at most 1-D) / SCALE_ROW (``[rows]`` or ``[rows, 1]``)."""
    if scale is None:
        return SCALE_NONE
    return SCALE_TENSOR if scale.dim() <= 1 and scale.numel() == 1 else SCALE_ROW


FMA_MAX_M = 0
"""Weight-only launches (an e4m3 weight, a 16-bit x) of at most this many rows run the main loop on the CUDA cores
(:func:`_fma_dot`: the weight tile converted in the registers it was loaded into, products and sums in fp32, no MMA
and no shared-memory pass) with :func:`fma_config`'s tiles (0: never). What it was for: the tensor-core form of the
weight-only scheme reads at 0.45-0.60 of the copy bandwidth (module docstring), which keeps
``KVCacheConfig.fp8_weight_only_max_tokens`` off. Off, measured slower than the activation scheme that ships: on one
H100 at 2e319e0 (``bench/results/e2e_tp1_h100_fma_ab_2e319e0.json``, ``--fp8-weight-only 1 --w8-ab --fma-ab``) the
full 8B's FP8 decode step at batch 1 took 3.79 ms weight-only on this loop, 3.62 ms with per-token FP8 activations
(1.05x; static scales 3.82 vs 3.53 ms, 1.08x) and 5.27 ms weight-only on the tensor-core loop; at 53e8ff3 (32 x 256
tiles split to 8 programs an SM) 4.01 vs 3.61 ms. At M 1 the best tile the sweep timed per shape read at 0.38-0.89
of the copy bandwidth (``small_gemm_h100_fma_2e319e0.json``, the 8B's TP 1 / TP 2 shapes; TP 1: qkv 13.8 us, o 10.3,
gate-up + SiLU*mul 44.2, down 27.1), short of the FP8 x FP8 kernel the activation scheme runs (its table: 12.1 /
9.2 / 42.9 + the SiLU*mul kernel / 23.9 us, one H100 at 1b777fa), so the kernels it saves (no quantize, SiLU*mul
or norm kernels) do not pay for it. Its GPU tests (the kernel at M 1-4, the folded forms, the model's graph decode
against the oracle) passed on both runs."""
FMA_PROGRAMS_PER_SM = 3
"""fma_config's split-K target: about this many programs an SM. From the loop's tile sweep at M 1 (one H100, 53e8ff3,
``bench/results/small_gemm_h100_fma_53e8ff3.json``): 16 x 512 tiles split this way came within 10% of the best tile
and split it timed on each of the 8B's TP 1 / TP 2 shapes (1.00-1.10x); 32 x 256 tiles, at the splits it timed,
took 1.00-1.32x the best."""


TMA = True
"""Launches whose config asks for TMA weight tiles (``GemmConfig.tma``, from the routing table) take them where
:func:`tma_ok` (False: the pointer loads with the same tiles; the A/B knob of ``bench_e2e.py --tma-ab``)."""
TMA_MAX_BOX = 256  # a TMA box's most elements along each dimension (the hardware's limit)
_DESCS: dict = {}  # (pointer, shape, strides, dtype, block) -> the weight's TensorDescriptor


def tma_ok(w: torch.Tensor, block_n: int, block_k: int) -> bool:
    """Whether the weight can be read through a TMA descriptor with ``[block_n, block_k]`` boxes: 2-D, unit stride
    along K, 16-byte aligned base and row stride, boxes within :data:`TMA_MAX_BOX` and at least 16 bytes along K."""
    e = w.element_size()
    return (w.dim() == 2 and w.stride(1) == 1 and w.data_ptr() % 16 == 0 and (w.stride(0) * e) % 16 == 0
            and block_n <= TMA_MAX_BOX and block_k <= TMA_MAX_BOX and block_k * e >= 16)


def weight_desc(w: torch.Tensor, block_n: int, block_k: int):
    """The weight's host-side TMA descriptor with ``[block_n, block_k]`` boxes (reads past the edges give 0),
    memoized by everything it encodes (a weight freed and another allocated at its address with the same layout
    gets the same descriptor, which is as right for it). Passed by value at launch: CUDA graphs keep it."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, block_n, block_k)
    desc = _DESCS.get(key)
    if desc is None:
        if len(_DESCS) >= 4096:
            _DESCS.clear()
        desc = _DESCS[key] = TensorDescriptor.from_tensor(w, [block_n, block_k])
    return desc


def uses_fma(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a launch of ``x @ w.T`` runs :data:`FMA_MAX_M`'s CUDA-core main loop."""
    return w.dtype.itemsize == 1 and x.dtype.itemsize == 2 and x.shape[0] <= FMA_MAX_M


def fma_config(n_out: int, k: int, sms: int, m: int = 1) -> "smc.GemmConfig":
    """Tiles of the CUDA-core main loop: 16 weight rows x ``512 / BLOCK_M`` K elements at 4 warps (8 KB of e4m3 a
    step: 64 weights a thread in 4 in-lane runs of :data:`FMA_VEC`; 58 registers, no spills, at M 1 in ptxas's
    report for sm_90; ADD_RES launches raise the rows to 32), split along K to about :data:`FMA_PROGRAMS_PER_SM`
    programs an SM."""
    block_n, block_k = 16, 512 // triton.next_power_of_2(max(m, 1))
    n_kb = triton.cdiv(k, block_k)
    split = max(1, min(n_kb, round(FMA_PROGRAMS_PER_SM * sms / triton.cdiv(n_out, block_n))))
    return smc.GemmConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=1)


def launch_small_m_gemm(x, w, x_scale, w_scale, bias, out, out_scale, silu_mul: bool, scheme: str, arch: str,
                        sms: int, config=None, norm=None, add=None, amax_out=None) -> None:
    """Launch the GEMM of the module docstring into ``out [M, N_OUT]`` (inputs validated by the public op; scales
    contiguous). Config: ``config``, else the forced one (:func:`.small_m_configs.forced`), else the table's for
    ``(arch, scheme, N, K, M)`` (default rule on ``sms`` SMs), sanitized; its stages lowered to fit shared memory
    (:func:`.small_m_configs.fit_stages`). ``norm = (sumsq [P, M], eps)``: each token's sums times its rstd
    (NORM_IN); ``add = (residual [M, N], norm_weight [N], x_next [M, N], sumsq_out [N / 32, M])``: the ADD_RES
    epilogue (``x_next`` with ``out``'s strides; tiles at least 32 rows); ``amax_out [N_OUT / 32, M]``: the
    rounded output's partial maxima (AMAX_OUT; tiles at least 32 rows, split-K 1: the maxima are of the finished
    sums). Each of them launches :func:`_small_m_gemm_norm_kernel` (module docstring)."""
    from . import fast_launch

    m, k = x.shape
    n_w = w.shape[0]
    n_out = n_w // 2 if silu_mul else n_w
    fma = uses_fma(x, w)
    cfg = config or smc.forced_config()
    if cfg is not None:
        cfg = smc.sanitize(cfg, n_out, k)
    else:
        cfg = fma_config(n_out, k, sms, m) if fma else smc.lookup(arch, scheme, n_w, k, m, sms)
    if (add is not None or amax_out is not None) and cfg.block_n < SQ_ROWS:
        cfg = dataclasses.replace(cfg, block_n=SQ_ROWS)
    if amax_out is not None and cfg.split_k > 1:
        cfg = dataclasses.replace(cfg, split_k=1)
    block_m = triton.next_power_of_2(m) if fma else max(16, triton.next_power_of_2(m))
    n_kb = triton.cdiv(k, cfg.block_k)
    stages = smc.fit_stages(cfg, block_m, w.dtype.itemsize, x.dtype.itemsize, silu_mul)
    dummy = out  # pointers the constexprs switch off are never read
    xs, ws = (dummy if x_scale is None else x_scale), (dummy if w_scale is None else w_scale)
    b, os_ = (dummy if bias is None else bias), (dummy if out_scale is None else out_scale)
    split = cfg.split_k
    on = pdl.wanted(out)
    use_tma = TMA and cfg.tma and not fma and tma_ok(w, cfg.block_n, cfg.block_k)
    desc = weight_desc(w, cfg.block_n, cfg.block_k) if use_tma else None
    part = torch.empty((split, m, n_w), dtype=torch.float32, device=out.device) if split > 1 else dummy
    # the epilogue's constexprs, in the kernels' signature order (fast_launch passes them positionally)
    epi = dict(X_SCALE=scale_kind(x_scale, m), W_SCALE=scale_kind(w_scale, n_w), HAS_BIAS=bias is not None,
               SILU_MUL=bool(silu_mul), OUT_FP8=out_scale is not None)
    args = (x, w if desc is None else desc, xs, ws, b, out, os_, part, m, n_out, k, x.stride(0), out.stride(0), n_kb,
            split)
    consts = dict(X_FP8=x.dtype.itemsize == 1, W_FP8=w.dtype.itemsize == 1, **epi, PARTIAL=split > 1,
                  EVEN_K=k % cfg.block_k == 0, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  PDL=pdl.stream_mode(on),
                  PF_LINES=prefetch_lines(n_w, k, split, w.dtype.itemsize, cfg.block_n, m) if on and desc is None
                  else 0, FMA=fma, W_DESC=desc is not None)
    grid = (triton.cdiv(n_out, cfg.block_n), split)
    plain = norm is None and add is None and amax_out is None
    cnt = serial_counters(out.device, grid[0]) if split > 1 and plain and SERIAL else None
    if cnt is not None:  # split-K reduced by each tile's last program: no reduce kernel
        consts.pop("PARTIAL")
        fast_launch.launch(_small_m_gemm_serial_kernel, grid, args[:8] + (cnt,) + args[8:], consts, cfg.num_warps,
                           stages, on)
        return
    if plain:
        fast_launch.launch(_small_m_gemm_kernel, grid, args, consts, cfg.num_warps, stages, on)
    else:
        sq, eps = norm if norm is not None else (dummy, 0.0)
        res, nw, xo, sqo = add if add is not None else (dummy, dummy, dummy, dummy if amax_out is None else amax_out)
        folded = {c: v for c, v in consts.items() if c not in ("FMA", "W_DESC")}  # this kernel's last constexprs
        folded.update(NORM_IN=norm is not None, ADD_RES=add is not None and split == 1,
                      SQ_BLOCK=triton.next_power_of_2(sq.shape[0]) if norm is not None else 1,
                      AMAX_OUT=amax_out is not None, FMA=fma, W_DESC=desc is not None)
        fast_launch.launch(_small_m_gemm_norm_kernel, grid,
                           args + (nw, sq, sq.shape[0] if norm is not None else 0, float(eps), res,
                                   res.stride(0) if add is not None else 0, sqo, xo),
                           folded, cfg.num_warps, stages, on)
    if split > 1:
        red = dict(epi, BLOCK_M=block_m, BLOCK_N=REDUCE_BLOCK_N, PDL=on)
        red_args = (part, xs, ws, b, out, os_, m, n_out, out.stride(0), split)
        if add is None:
            fast_launch.launch(_split_k_reduce_kernel, (triton.cdiv(n_out, REDUCE_BLOCK_N),), red_args, red, 4, 1,
                               on)
        else:
            fast_launch.launch(_split_k_reduce_add_kernel, (triton.cdiv(n_out, REDUCE_BLOCK_N),),
                               red_args + (res, res.stride(0), sqo, nw, xo), red, 4, 1, on)
