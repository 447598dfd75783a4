"""Fused all-reduce + residual add + RMSNorm (+ quant) over a torch symmetric-memory workspace, in Triton.

Three kernels, each one launch per call, TP = ``WORLD`` (a constexpr: 2, 4, 8 ...), fp32 accumulation, one row per
loop iteration with the whole hidden row in registers (``BLOCK = next_pow2(H)``: 16-byte vectors per thread):

**one-shot** (``_oneshot_kernel``) - for small sizes. Program ``b`` owns rows ``j = b, b + G, ...`` of the call.

1. push: read the row of this rank's partial ``x`` and store it into every peer's workspace, slot ``RANK`` of the
   parity buffer ``e & 1`` (``e``: this program's call counter, kept on device);
2. signal every peer's program ``b`` (release, system scope), wait for theirs (acquire, bounded);
3. reduce: own row (from ``x``) + every peer's slot (local memory now), + residual, RMSNorm, store ``out``
   (bf16 or any quant format through :mod:`tpfuse.kernels.quant_epilogue`) and ``residual_out``.

No closing barrier: the parity double buffer makes the call after next the first to overwrite a slot, and that
call's push only starts after the next call's barrier, i.e. after every peer finished this call.

**two-shot** (``_twoshot_kernel``) - moves half the data of the one-shot but also gathers the residual. Rank ``r`` owns token rows ``[r*S, r*S + n_r)``,
``S = ceil(T / WORLD)`` (:mod:`tpfuse.sharding`). Program ``b`` owns local rows ``j = b, b + G, ...``.

1. push: for each peer ``p``, rows ``p*S + j`` of ``x`` into peer ``p``'s reduce slot ``RANK`` (row ``j``);
2. barrier A;
3. reduce own rows ``r*S + j``: own ``x`` + the peers' slots + residual -> RMSNorm -> quant; stores ``out`` /
   ``residual_out`` rows directly and a copy of both into this rank's *stage* area (NVFP4 swizzled scales are
   staged linear);
4. barrier B;
5. gather: copy every peer's staged rows ``p*S + j`` (data, scales, residual) into ``out`` / ``residual_out``.

Reuse without a closing barrier: a peer writes my reduce slots in call ``n + 1`` only after its kernel of call ``n``
ended, whose barrier B waited for mine, raised after my step 3 read them; I overwrite my stage in call ``n + 1`` only
after barrier A of call ``n + 1``, i.e. after every peer's kernel of call ``n`` (its gather) ended (kernels of one
stream run in order). The mapping "row j of a region <-> program j % G" never changes, which keeps the per-program
counters of every rank equal and the argument valid when ``T`` changes between calls.

**pipelined one-shot** (``_oneshot_pipe_kernel``) - for the large sizes of the all-reduce form. The one-shot data
flow in up to 8 token chunks: programs ``0..P-1`` push chunk ``c`` into every peer's slot and raise one flag per
(chunk, producer) on each peer; programs ``P..G-1`` wait for chunk ``c``'s flags and reduce + norm + quant it while
chunk ``c + 1`` is still in flight. Flags ``3*G*TP + (c*TP + src)*P + b``; same parity buffer and reuse argument
as the one-shot (every program runs every call).

Barriers (helpers shared with the async-TP semaphores: :mod:`tpfuse.kernels.signals`): per program and peer,
one int32 flag in the peer's workspace set to the program's call counter + 1
(monotonic, so nothing needs resetting: CUDA-graph replays are safe; compared wrap-around safe). Every wait is
bounded by ``timeout_ns`` of ``%globaltimer``: on expiry the program sets ``err[0] = 1`` (a pinned host word the
host reads without a sync), skips the rest of its work and exits. The grid ``G`` is the same on every rank (the
workspace agrees on it at construction) and at most one program per SM, so all programs are resident (in one-GPU
mode half the SMs split among the ranks sharing the GPU, :func:`tpfuse.backends.fused_allreduce.persistent_grid`,
so that concurrent ranks' programs are too, with SMs to spare for their other kernels).

Peer addresses: the workspace passes, per peer, the byte distance from this rank's symmetric buffer to that
peer's (a multiple of 2 MiB); the kernels add it to pointers into their own buffer, so every pointer keeps the
16-byte alignment Triton needs to vectorize.

Cross-rank ordering (NVLink). Tests run N ranks on one GPU, where every buffer sits behind one L2 and a flag
hardly overtakes data; on NVLink it can unless the writer releases and the reader acquires at *system* scope (``.gpu``
is not enough). Every flag here does (reviewed on the sm_90 PTX/SASS of tests/sm90_compile_cases.py, TP 2/4/8 x fmt
0/1/5, and TP 4 with launch hints: no ``.gpu`` atomic, no ``ld.global.nc``, no separate fence instruction, data
moves by plain ``st.global`` / ``ld.global``). Abbreviations of the table:

* REL: ``tl.debug_barrier()`` (``bar.sync 0``: every thread's stores of the program precede it) then thread 0 only
  ``tl.atomic_xchg(sem="release", scope="sys")`` (``_signal``, signals.py:81) -> PTX
  ``atom.global.sys.release.exch.b32``, SASS ``MEMBAR.ALL.SYS; ATOMG.E.EXCH.STRONG.SYS``. Release is cumulative
  over the ``bar.sync``, so it orders all threads' pushes (the vLLM custom all-reduce pattern).
* ACQ: thread 0 spins ``tl.atomic_add(0, sem="acquire", scope="sys")`` (``_wait``, signals.py:87, 90) -> PTX
  ``ld.global.sys.acquire.b32`` (Triton emits the add of 0 as a load), SASS ``LDG.E.STRONG.SYS; CCTL.IVALL``
  (L1 invalidated); value broadcast through shared memory (``bar.sync``), then ``tl.debug_barrier()`` before any
  data load.
* ACQV: the same with one acquire per flag of a ``[PB]`` vector, by the thread owning it -> PTX
  ``atom.global.sys.acquire.add.u32``, SASS ``ATOMG.E.ADD.STRONG.SYS; CCTL.IVALL``; ``tl.min`` across threads
  (``bar.sync``), then ``tl.debug_barrier()``.

================  ==========================  ============================================  ====  =======
wait / flag       kernel:line                 orders                                        used  verdict
================  ==========================  ============================================  ====  =======
barrier signal    ``_oneshot_kernel``:199     my pushes of rows ``b, b+G, ..`` into the     REL   correct
                                              peers' slots -> their flag
barrier wait      ``_oneshot_kernel``:199     the peers' pushes -> my reduce's reads        ACQ   correct
barrier A signal  ``_twoshot_kernel``:242     my pushes into the peers' reduce slots        REL   correct
barrier A wait    ``_twoshot_kernel``:242     the peers' pushes -> my step-3 reads          ACQ   correct
barrier B signal  ``_twoshot_kernel``:261     my stage stores (rows, residual, scales)      REL   correct
barrier B wait    ``_twoshot_kernel``:261     the peers' stage -> my remote loads (step 5)  ACQ   correct
chunk signal      ``_oneshot_pipe_kernel``    a producer's pushes of chunk ``c``            REL   correct
                  :312 (barrier), :315
chunk wait        ``_oneshot_pipe_kernel``    every producer of every peer, chunk ``c`` ->  ACQV  correct
                  :328, :332, :336 (barrier)  the consumer's reads of its rows
reuse (WAR)       all three                   call ``n``'s loads -> a peer's later stores   REL   correct
================  ==========================  ============================================  ====  =======

``_barrier`` (:117) holds the one-shot / two-shot REL (:119, :122) and ACQ (:126 via ``_wait``, :127). "correct":
correct across NVLink, no reliance on the shared L2. Reuse: the loads of call ``n`` end with their kernel; the next
flag raised after them (a later kernel on the same stream) is a system-scope release, which orders earlier loads
too, and the peer stores only after acquiring it (chains in the paragraphs above). ``err[0]`` (plain store to pinned
host memory, polled by the host) orders no data. Open: none.

Launchers (below the kernels): :func:`launch_oneshot`, :func:`launch_oneshot_pipe`, :func:`launch_twoshot` take the
workspace (:class:`tpfuse.backends.fused_allreduce.FusedAllReduceWorkspace`: ``rank``, ``tp``, ``grid``,
``producers``, the regions ``oneshot_slots`` / ``pipe_slots`` / ``twoshot_slots`` / ``stage_residual`` / ``flags`` and ``region(name,
dtype)``, the row capacities ``oneshot_rows`` / ``pipe_rows`` / ``twoshot_rows``, ``epochs``, ``deltas``, ``err``,
``timeout_s``) and a call's arguments, allocate the outputs and return what the op returns.
"""

import triton
import triton.language as tl

from typing import NamedTuple, Optional

import torch

from .. import ops
from ..quant import FP8_DTYPE, QuantFormat, next_pow2
from ..sharding import shard_rows
from .add_rmsnorm import num_warps_for
from .quant_epilogue import (FMT_FP8_PER_GROUP, FMT_FP8_PER_TOKEN, FMT_NVFP4_LINEAR, FMT_NVFP4_SWIZZLED,
                             EpilogueArgs, cast_for_store, epilogue_args, quant_store, rmsnorm_quant_store,
                             swizzled_offset)
from .signals import _now, _peer, _signal, _wait  # noqa: F401  (the shared bounded-signal helpers)


@triton.jit
def _barrier(flag_ptr, delta_ptr, base, value, deadline, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Program-level barrier with the same program on every peer; flags ``base + src_rank``. Returns timed-out."""
    tl.debug_barrier()  # every thread's stores of this program are issued before the release
    for p in tl.static_range(WORLD):
        if p != RANK:
            _signal(flag_ptr, delta_ptr, base + RANK, value, p)
    bad = 0
    for p in tl.static_range(WORLD):
        if p != RANK:
            bad = bad | _wait(flag_ptr, base + p, value, deadline)
    tl.debug_barrier()
    return bad


@triton.jit
def _finish_row(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, out_ptr, out_stride, scale_ptr, scale_stride,
                in_scale_ptr, sf_cols_padded, NORM: tl.constexpr, GEMMA: tl.constexpr, FMT: tl.constexpr,
                BLOCK: tl.constexpr, GROUP: tl.constexpr):
    row64 = row.to(tl.int64)
    if NORM:
        rmsnorm_quant_store(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, n_cols, out_ptr, out_stride,
                            scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, GEMMA, FMT, BLOCK, GROUP)
    else:
        tl.store(out_ptr + row64 * n_cols + cols, cast_for_store(s, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_pushed_row(j, row0, cols, mask, x_ptr, ws_x_ptr, par, slot_rows, res_ptr, w_ptr, eps, n_cols,
                       res_out_ptr, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded,
                       RANK: tl.constexpr, WORLD: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
                       GEMMA: tl.constexpr, FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """One-shot tail of launch-local row ``j``: own partial + every peer's pushed copy (parity ``par`` slots) +
    residual, then RMSNorm + quant (or the plain sum)."""
    row = row0 + j
    row64 = row.to(tl.int64)
    s = tl.load(x_ptr + row64 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    for p in tl.static_range(WORLD):
        if p != RANK:
            src = ws_x_ptr + (par * WORLD + p) * slot_rows + j * n_cols
            s += tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + row64 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    _finish_row(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, out_ptr, out_stride, scale_ptr,
                scale_stride, in_scale_ptr, sf_cols_padded, NORM, GEMMA, FMT, BLOCK, GROUP)


@triton.jit
def _oneshot_start(epoch_ptr, timeout_ns, n_cols, cap_rows, BLOCK: tl.constexpr):
    """``(pid, deadline, e, par, cols, mask, slot_rows)`` of a one-shot program: its call counter ``e``, the parity
    ``par`` of the slot buffer this call uses and the elements of one slot (``ws_x``: ``[2 parities][WORLD slots]
    [cap_rows][n_cols]``)."""
    pid = tl.program_id(0)
    deadline = _now() + timeout_ns
    e = tl.load(epoch_ptr + pid)
    par = (e & 1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    slot_rows = cap_rows.to(tl.int64) * n_cols
    return pid, deadline, e, par, cols, mask, slot_rows


@triton.jit
def _push_row(j, row0, cols, mask, x_ptr, n_cols, mine, delta_ptr, RANK: tl.constexpr, WORLD: tl.constexpr,
              X_ELEM: tl.constexpr):
    """Row ``row0 + j`` of ``x`` into row ``j`` of every peer's copy of slot ``mine``."""
    xv = tl.load(x_ptr + (row0 + j).to(tl.int64) * n_cols + cols, mask=mask, other=0.0)
    for p in tl.static_range(WORLD):
        if p != RANK:
            tl.store(_peer(mine, delta_ptr, p, X_ELEM) + j * n_cols + cols, xv, mask=mask)


@triton.jit
def _oneshot_kernel(x_ptr, res_ptr, w_ptr, res_out_ptr, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                    ws_x_ptr, flag_ptr, epoch_ptr, delta_ptr, err_ptr, timeout_ns,
                    row0, n_rows, n_cols, cap_rows, flag_base, eps, sf_cols_padded,
                    RANK: tl.constexpr, WORLD: tl.constexpr, G: tl.constexpr, HAS_RES: tl.constexpr,
                    NORM: tl.constexpr, GEMMA: tl.constexpr, FMT: tl.constexpr, BLOCK: tl.constexpr,
                    GROUP: tl.constexpr, X_ELEM: tl.constexpr):
    b, deadline, e, par, cols, mask, slot_rows = _oneshot_start(epoch_ptr, timeout_ns, n_cols, cap_rows, BLOCK)
    mine = ws_x_ptr + (par * WORLD + RANK) * slot_rows
    for j in range(b, n_rows, G):
        _push_row(j, row0, cols, mask, x_ptr, n_cols, mine, delta_ptr, RANK, WORLD, X_ELEM)
    bad = _barrier(flag_ptr, delta_ptr, flag_base + b * WORLD, e + 1, deadline, RANK, WORLD)
    if bad != 0:
        tl.store(err_ptr, 1)
    else:
        for j in range(b, n_rows, G):
            _reduce_pushed_row(j, row0, cols, mask, x_ptr, ws_x_ptr, par, slot_rows, res_ptr, w_ptr, eps, n_cols,
                               res_out_ptr, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                               sf_cols_padded, RANK, WORLD, HAS_RES, NORM, GEMMA, FMT, BLOCK, GROUP)
        tl.store(epoch_ptr + b, e + 1)


@triton.jit
def _copy_row(src_ptr, dst_ptr, n, CBLOCK: tl.constexpr):
    for c0 in range(0, n, CBLOCK):
        c = c0 + tl.arange(0, CBLOCK)
        m = c < n
        tl.store(dst_ptr + c, tl.load(src_ptr + c, mask=m), mask=m)


@triton.jit
def _twoshot_kernel(x_ptr, res_ptr, w_ptr, res_out_ptr, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                    ws_x_ptr, st_out_ptr, st_res_ptr, st_scale_ptr, flag_ptr, epoch_ptr, delta_ptr, err_ptr,
                    timeout_ns, n_tokens, shard, n_cols, cap_shard, flag_base, eps, sf_cols_padded,
                    out_cols, n_sc, st_scale_stride,
                    RANK: tl.constexpr, WORLD: tl.constexpr, G: tl.constexpr, HAS_RES: tl.constexpr,
                    NORM: tl.constexpr, GEMMA: tl.constexpr, FMT: tl.constexpr, ST_FMT: tl.constexpr,
                    BLOCK: tl.constexpr, GROUP: tl.constexpr, SC_BLOCK: tl.constexpr, OUT_ELEM: tl.constexpr,
                    SC_ELEM: tl.constexpr, X_ELEM: tl.constexpr):
    b = tl.program_id(0)
    deadline = _now() + timeout_ns
    e = tl.load(epoch_ptr + b)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    slot_rows = cap_shard.to(tl.int64) * n_cols
    # 1. push my partial of each peer's token range into that peer's reduce slot RANK
    for j in range(b, shard, G):
        for p in tl.static_range(WORLD):
            if p != RANK:
                row = p * shard + j
                if row < n_tokens:
                    xv = tl.load(x_ptr + row.to(tl.int64) * n_cols + cols, mask=mask, other=0.0)
                    dst = _peer(ws_x_ptr, delta_ptr, p, X_ELEM) + RANK * slot_rows + j * n_cols
                    tl.store(dst + cols, xv, mask=mask)
    bad = _barrier(flag_ptr, delta_ptr, flag_base + b * WORLD, e + 1, deadline, RANK, WORLD)
    if bad == 0:
        # 3. reduce + add + norm + quant my rows; write them and stage them
        for j in range(b, shard, G):
            row = RANK * shard + j
            if row < n_tokens:
                row64 = row.to(tl.int64)
                s = tl.load(x_ptr + row64 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                for p in tl.static_range(WORLD):
                    if p != RANK:
                        src = ws_x_ptr + p * slot_rows + j * n_cols
                        s += tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RES:
                    s += tl.load(res_ptr + row64 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                _finish_row(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, out_ptr, out_stride, scale_ptr,
                            scale_stride, in_scale_ptr, sf_cols_padded, NORM, GEMMA, FMT, BLOCK, GROUP)
                # staged copy (local row j); NVFP4 swizzled is staged with linear scales (ST_FMT 4)
                _finish_row(s, cols, mask, j, w_ptr, eps, n_cols, st_res_ptr, st_out_ptr, out_cols, st_scale_ptr,
                            st_scale_stride, in_scale_ptr, sf_cols_padded, NORM, GEMMA, ST_FMT, BLOCK, GROUP)
        bad = _barrier(flag_ptr, delta_ptr, flag_base + G * WORLD + b * WORLD, e + 1, deadline, RANK, WORLD)
    if bad != 0:
        tl.store(err_ptr, 1)
    else:
        # 5. gather the peers' finished rows
        for j in range(b, shard, G):
            for p in tl.static_range(WORLD):
                if p != RANK:
                    row = p * shard + j
                    if row < n_tokens:
                        row64 = row.to(tl.int64)
                        j64 = j.to(tl.int64)
                        _copy_row(_peer(st_out_ptr, delta_ptr, p, OUT_ELEM) + j64 * out_cols,
                                  out_ptr + row64 * out_stride, out_cols, BLOCK)
                        if NORM:
                            _copy_row(_peer(st_res_ptr, delta_ptr, p, X_ELEM) + j64 * n_cols,
                                      res_out_ptr + row64 * n_cols, n_cols, BLOCK)
                        if FMT == FMT_FP8_PER_TOKEN or FMT == FMT_FP8_PER_GROUP or FMT == FMT_NVFP4_LINEAR:
                            _copy_row(_peer(st_scale_ptr, delta_ptr, p, SC_ELEM) + j64 * st_scale_stride,
                                      scale_ptr + row64 * scale_stride, n_sc, SC_BLOCK)
                        if FMT == FMT_NVFP4_SWIZZLED:
                            k = tl.arange(0, SC_BLOCK)
                            km = k < n_sc
                            sv = tl.load(_peer(st_scale_ptr, delta_ptr, p, SC_ELEM) + j64 * st_scale_stride + k,
                                         mask=km)
                            tl.store(scale_ptr + swizzled_offset(row64, k, sf_cols_padded, False), sv, mask=km)
        tl.store(epoch_ptr + b, e + 1)


@triton.jit
def _oneshot_pipe_kernel(x_ptr, res_ptr, w_ptr, res_out_ptr, out_ptr, out_stride, scale_ptr, scale_stride,
                         in_scale_ptr, ws_x_ptr, flag_ptr, epoch_ptr, delta_ptr, err_ptr, timeout_ns,
                         row0, n_rows, n_cols, cap_rows, flag_base, eps, sf_cols_padded, chunk_rows, n_chunks,
                         RANK: tl.constexpr, WORLD: tl.constexpr, P: tl.constexpr, C: tl.constexpr,
                         HAS_RES: tl.constexpr, NORM: tl.constexpr, GEMMA: tl.constexpr, FMT: tl.constexpr,
                         BLOCK: tl.constexpr, GROUP: tl.constexpr, X_ELEM: tl.constexpr, PB: tl.constexpr):
    """Pipelined one-shot: programs ``0..P-1`` (producers) push the call's rows chunk by chunk into every peer's
    slot ``RANK`` and raise one flag per (chunk, producer) on each peer after each chunk; programs ``P..P+C-1``
    (consumers) wait for every peer's flags of chunk ``c`` and reduce + add + norm + quant its rows while the
    producers already push chunk ``c + 1``. Pushing (NVLink) and reducing (HBM) overlap; a producer's release fence
    stalls only producers. Flags: ``flag_base + (c * WORLD + src) * P + b`` in the receiver's array, value = call
    counter + 1 (monotonic: stale values of unused chunks only make a waiter wait). Same parity double buffer and
    reuse argument as ``_oneshot_kernel``: every program runs every call, so all ``P + C`` counters stay equal."""
    pid, deadline, e, par, cols, mask, slot_rows = _oneshot_start(epoch_ptr, timeout_ns, n_cols, cap_rows, BLOCK)
    if pid < P:
        mine = ws_x_ptr + (par * WORLD + RANK) * slot_rows
        for c in range(0, n_chunks):
            lo = c * chunk_rows
            hi = tl.minimum(lo + chunk_rows, n_rows)
            for j in range(lo + pid, hi, P):
                _push_row(j, row0, cols, mask, x_ptr, n_cols, mine, delta_ptr, RANK, WORLD, X_ELEM)
            tl.debug_barrier()  # every thread's stores of this chunk are issued before the release
            for p in tl.static_range(WORLD):
                if p != RANK:
                    _signal(flag_ptr, delta_ptr, flag_base + (c * WORLD + RANK) * P + pid, e + 1, p)
        tl.store(epoch_ptr + pid, e + 1)
    else:
        q = pid - P
        bs = tl.arange(0, PB)  # PB = next_pow2(P)
        bm = bs < P
        bad = 0
        for c in range(0, n_chunks):
            if bad == 0:
                # wait for every producer of every peer for chunk c (one vector of P flags per peer)
                for p in tl.static_range(WORLD):
                    if p != RANK:
                        fp = flag_ptr + flag_base + (c * WORLD + p) * P + bs
                        v = tl.atomic_add(fp, 0, mask=bm, sem="acquire", scope="sys")
                        lag = tl.min(tl.where(bm, v - (e + 1), 0), axis=0)
                        now = _now()
                        while (lag < 0) & (now <= deadline):
                            v = tl.atomic_add(fp, 0, mask=bm, sem="acquire", scope="sys")
                            lag = tl.min(tl.where(bm, v - (e + 1), 0), axis=0)
                            now = _now()
                        bad = bad | (lag < 0).to(tl.int32)
                tl.debug_barrier()
            if bad == 0:
                lo = c * chunk_rows
                hi = tl.minimum(lo + chunk_rows, n_rows)
                for j in range(lo + q, hi, C):
                    _reduce_pushed_row(j, row0, cols, mask, x_ptr, ws_x_ptr, par, slot_rows, res_ptr, w_ptr, eps,
                                       n_cols, res_out_ptr, out_ptr, out_stride, scale_ptr, scale_stride,
                                       in_scale_ptr, sf_cols_padded, RANK, WORLD, HAS_RES, NORM, GEMMA, FMT, BLOCK,
                                       GROUP)
        if bad != 0:
            tl.store(err_ptr, 1)
        else:
            tl.store(epoch_ptr + pid, e + 1)


# ----------------------------------------------------------------------------------------------------------------
# launchers, over the workspace of :class:`tpfuse.backends.fused_allreduce.FusedAllReduceWorkspace` (its regions,
# counters, grid)


class _Call(NamedTuple):
    """One call's contiguous inputs, fresh outputs and format."""

    x: torch.Tensor
    residual: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    data: torch.Tensor  # the output (quantized data, or the sum / normalized rows in the input dtype)
    scale: torch.Tensor  # the output scale (empty for formats without one)
    res_out: torch.Tensor  # residual_out (norm), else ``data``
    fmt: int
    group_size: int
    ep: EpilogueArgs


def _prepare(x, residual, weight, quant, norm: bool) -> _Call:
    fmt, group_size, in_scale = ops.spec_to_args(quant if norm else None)
    t, h = x.shape
    data, scale = ops.alloc_outputs(t, h, fmt, group_size, x.device, x.dtype)
    if fmt == QuantFormat.NVFP4_SWIZZLED:
        scale.zero_()  # the swizzle's padding
    res_out = torch.empty_like(x) if norm else data
    if not x.is_contiguous():
        x = x.contiguous()
    if residual is not None and not residual.is_contiguous():
        residual = residual.contiguous()
    return _Call(x, residual, weight, data, scale, res_out, fmt, group_size,
                 epilogue_args(fmt, h, data, scale, in_scale))


def _result(call: _Call, quant, norm: bool):
    """What the op returns: ``(out, residual_out)`` (norm; ``out`` wrapped as the quant spec says), else the sum."""
    if not norm:
        return call.data
    return ops._wrap(call.data, call.scale, quant, call.x, tuple(call.x.shape)), call.res_out


def _head(call: _Call) -> tuple:
    """The leading pointer / stride arguments of every kernel here (``x_ptr`` .. ``in_scale_ptr``)."""
    x, ep = call.x, call.ep
    return (x, call.residual if call.residual is not None else x, call.weight if call.weight is not None else x,
            call.res_out, call.data, ep.out_stride, ep.scale, ep.scale_stride, ep.in_scale)


def _constexprs(ws, call: _Call, norm: bool, gemma) -> dict:
    """The constexprs (and ``num_warps``) every kernel here takes."""
    block = next_pow2(call.x.shape[1])
    return dict(RANK=ws.rank, WORLD=ws.tp, HAS_RES=call.residual is not None, NORM=norm, GEMMA=bool(gemma),
                FMT=call.fmt, BLOCK=block, GROUP=call.group_size, X_ELEM=call.x.element_size(),
                num_warps=num_warps_for(block))


def launch_oneshot(ws, x, residual, weight, eps, quant, gemma, norm=True):
    """One-shot kernel over ``x [T, H]`` (launches of at most ``ws.oneshot_rows`` rows); returns as the op."""
    call = _prepare(x, residual, weight, quant, norm)
    t, h = call.x.shape
    head, consts = _head(call), _constexprs(ws, call, norm, gemma)
    for row0 in range(0, t, ws.oneshot_rows):
        n = min(ws.oneshot_rows, t - row0)
        _oneshot_kernel[(min(n, ws.grid),)](
            *head, ws.oneshot_slots, ws.flags, ws.epochs[0], ws.deltas, ws.err, int(ws.timeout_s * 1e9),
            row0, n, h, ws.oneshot_rows, 0, float(eps), call.ep.sf_cols_padded, G=ws.grid, **consts)
    return _result(call, quant, norm)


def launch_oneshot_pipe(ws, x, residual, weight, eps, quant, gemma, norm=True, *, max_chunks: int,
                        min_chunk_rows: int):
    """Pipelined one-shot kernel (launches of at most ``ws.pipe_rows`` rows, each in at most ``max_chunks`` chunks
    of at least ``min_chunk_rows`` rows where possible); returns as the op."""
    call = _prepare(x, residual, weight, quant, norm)
    t, h = call.x.shape
    head, consts = _head(call), _constexprs(ws, call, norm, gemma)
    prod = min(ws.producers, ws.grid - 1)
    flag_base = 3 * ws.grid * ws.tp
    for row0 in range(0, t, ws.pipe_rows):
        n = min(ws.pipe_rows, t - row0)
        chunks = max(1, min(max_chunks, n // min_chunk_rows))
        chunk_rows = -(-n // chunks)
        chunks = -(-n // chunk_rows)
        _oneshot_pipe_kernel[(ws.grid,)](
            *head, ws.pipe_slots, ws.flags, ws.epochs[2], ws.deltas, ws.err, int(ws.timeout_s * 1e9),
            row0, n, h, ws.pipe_rows, flag_base, float(eps), call.ep.sf_cols_padded, chunk_rows, chunks,
            P=prod, C=ws.grid - prod, PB=next_pow2(prod), **consts)
    return _result(call, quant, norm)


def _stage_scales(ws, call: _Call):
    """``(view, element size, scale columns per row)`` of the two-shot's staged scales in this call's format
    (swizzled NVFP4 is staged linear); formats without scales get the stage-out view (never read) and 1."""
    h = call.x.shape[1]
    if call.fmt in (QuantFormat.FP8_PER_TOKEN, QuantFormat.FP8_PER_GROUP):
        n_sc = 1 if call.fmt == QuantFormat.FP8_PER_TOKEN else h // call.group_size
        return ws.region("stage_scales", torch.float32), 4, n_sc
    if call.fmt >= QuantFormat.NVFP4_LINEAR:
        return ws.region("stage_scales", FP8_DTYPE), 1, call.ep.n_sf_cols
    return ws.region("stage_out", call.data.dtype), call.data.element_size(), 1


def launch_twoshot(ws, x, residual, weight, eps, quant, gemma, norm=True):
    """Two-shot kernel over ``x [T, H]`` (this rank reduces rows ``[rank * S, rank * S + S)``, ``S = ceil(T /
    TP)``, then gathers the peers'); returns as the op."""
    call = _prepare(x, residual, weight, quant, norm)
    t, h = call.x.shape
    if t == 0:
        return _result(call, quant, norm)
    shard = shard_rows(t, ws.tp)
    stage_out = ws.region("stage_out", call.data.dtype)
    stage_scales, sc_elem, n_sc = _stage_scales(ws, call)
    st_fmt = QuantFormat.NVFP4_LINEAR if call.fmt == QuantFormat.NVFP4_SWIZZLED else call.fmt
    _twoshot_kernel[(min(shard, ws.grid),)](
        *_head(call), ws.twoshot_slots, stage_out, ws.stage_residual, stage_scales, ws.flags, ws.epochs[1],
        ws.deltas, ws.err, int(ws.timeout_s * 1e9), t, shard, h, ws.twoshot_rows, ws.grid * ws.tp, float(eps),
        call.ep.sf_cols_padded, call.data.shape[1], n_sc, n_sc,
        G=ws.grid, ST_FMT=st_fmt, SC_BLOCK=next_pow2(max(n_sc, 16)), OUT_ELEM=call.data.element_size(),
        SC_ELEM=sc_elem, **_constexprs(ws, call, norm, gemma))
    return _result(call, quant, norm)
