"""Sequence-parallel paths over symmetric memory: ``tpfuse_async_tp`` (GEMMs overlapped with the collective),
``tpfuse_reduce_scatter`` (reduce-scatter fused with add + RMSNorm + quant) and ``tpfuse_all_gather`` (all-gather).

Design: the data moves by the GPUs' copy engines (``copy_`` between symmetric buffers is a DMA over NVLink, using
no SMs), one token-chunk per peer, while the GEMM of the chunk already present runs on the compute stream. The
ranks synchronise through counting semaphores (:mod:`tpfuse.kernels.signals`: one tiny kernel signals and/or
waits, ``sem(signal=..., wait=...)`` below) whose waits are bounded by ``CommConfig.timeout_s``.

``all_gather_matmul(x_shard [Ts, H], w_shard_n [N, H])`` -> ``[T, N]`` (``gemm``: ``torch.mm``, or
``torch._scaled_mm`` for FP8 operands, :mod:`tpfuse.scaled_gemm`)::

    side : copy x_shard (+ its row-wise scales) -> own slot r
           sem(signal READY to all peers, wait READY from all peers), event(ready)
           pull peer p0's slot p0 -> own slot p0, event(p0) | pull p1, event(p1) | ... (copy engine, no SM)
           sem(signal DONE to all peers)
    main : wait event(ready) | gemm(x_shard) -> out[r rows] | wait event(p0), gemm(slot p0) -> out[p0 rows] | ...
    main (end): join side; sem(wait DONE from every peer) (they finished reading my slot r: it may be overwritten)

  Why the first GEMM waits for the handshake: a semaphore is a (one-warp) kernel, and a cuBLAS/CUTLASS GEMM
  that is already running holds every SM's registers until it ends, so a semaphore launched after it starts
  would wait for the whole GEMM and the pulls behind it would not overlap anything (measured with
  ``bench/probe_ag_overlap.py``: FP8 8B shard, M=8192, 1.25x the GEMM with the rolling per-peer handshake vs 1.06x
  for the same GEMMs and pulls with no semaphores). All semaphore kernels of the gather therefore run before the
  first GEMM, except the final DONE signal; the pulls are copy-engine work that needs no SM.

``matmul_reduce_scatter(x_shard_k [T, K], w_shard_k [H, K])`` -> ``[Ts, H]``::

    main : sem(signal BAR to all, wait BAR from all) (every peer finished summing its slots of the last call)
           for each peer d (own chunk last): gemm(x[d rows]) -> rs_tmp[d] (own: -> own rs slot r), event(d)
    side : wait event(d), push rs_tmp[d] -> peer d's rs slot r, sem(signal DATA to d)
    main (end): join side; sem(wait DATA from every peer); one kernel sums the TP slots in fp32 -> [Ts, H]
                (``matmul_reduce_scatter_rmsnorm``: the same kernel also adds the residual and applies
                RMSNorm + quant, :mod:`tpfuse.kernels.reduce_slots`)

``reduce_scatter_rmsnorm`` (``tpfuse_reduce_scatter``) is the same exchange without the GEMM (x's token chunks are
pushed as they are); ``all_gather`` (``tpfuse_all_gather``) is the all-gather half without the GEMM (peers' slots are
pulled straight into the output).

Buffers (allocated once per communicator, sized from ``max_tokens x hidden``; ``S = ceil(max_tokens / TP)``,
``s = ceil(T / TP)`` of the call, ``n_q`` = rank q's shard rows of the call):

=============  ==============================  ===================================================================
buffer         shape                           written by
=============  ==============================  ===================================================================
``ag``         symmetric bytes, at least       dense: slot q = rows ``[q*s, q*s + n_q)`` of a ``[TP * S, H]``
               ``TP*S*H*itemsize`` and         view. FP8: slot q = ``n_q x H`` e4m3 bytes, then (row-wise) its
               ``TP*S*(H+4) + 16*TP``          ``n_q`` fp32 scales, slots packed in rank order at 16-byte
                                               boundaries (one copy pulls a chunk with its scales). Slot r:
                                               this rank's shard; slot p: this rank's pull of p
``rs``         symmetric ``[TP * S, H]``       slot q: rank q's partial sum for this rank's token shard (bf16
                                               also for FP8 GEMMs: partials are summed after the GEMM)
``rs_tmp``     local ``[TP * S, H]``           this rank's partials for peers, until their push is done
``sc_tmp``     local fp32 ``[TP * S4]``        FP8 row-wise GEMMs: rank q's rows of ``x_scale`` when they start
               (``S4 = round_up(S, 4)``)       off a 16-byte boundary, staged at ``q * round_up(s, 4)``
                                               (cuBLASLt's vector scales want 16 bytes)
``flags``      symmetric int32 ``[4*TP + 1]``  semaphores: ``flag[c*TP + q]`` counts channel c's signals from
               (padded)                        rank q (READY, DONE, DATA, BAR); ``flag[4*TP]``: local error word
``err``        pinned host int32 ``[1]``       set by a wait that timed out (read by :meth:`check`, no sync)
=============  ==============================  ===================================================================

Streams and reuse: the caller's current stream does the GEMMs and the final reduction; one side stream per
communicator does the copies and semaphores. Both are joined before an op returns, so the op is stream-ordered
like any torch op. Every call of this workspace's ops must be issued on one stream, in the same order on every
rank (the collective contract); then:

* a rank overwrites its ``ag`` slot r (next call's first side-stream copy, which follows the previous call's
  main stream) only after the previous call's DONE waits, i.e. after every peer's pull of it has completed; its
  own slots p are rewritten by its own next pull, after the GEMMs that read them (same stream order);
* a peer writes this rank's ``rs`` slot only after the BAR of its next call, which this rank signals only after
  its own reduction of the previous call (main stream order); ``rs_tmp`` is rewritten only after the side stream
  that pushed it was joined;
* each semaphore is balanced per call (every call signals each flag exactly as often as it is waited on), so the
  counts return to zero: nothing needs resetting and CUDA-graph replays are safe; ``sc_tmp`` chunk q is written
  and read on the main stream. Ops do no host sync and allocate only their outputs (plus CUDA events), so they
  can be captured in CUDA graphs.

Timeouts: a wait that does not see its peer within ``CommConfig.timeout_s`` sets a local flag and the pinned host
word and returns; later waits of this workspace return at once (one timeout, not one per wait) and the data of
that call is garbage. The next check point (:meth:`check`, run by every communicator op and
``TPCommunicator.synchronize``) raises :class:`~tpfuse.errors.TPFusePeerTimeout`, and the workspace stays broken:
the CUDA context is not poisoned (no aborting kernel), so the process can build a new communicator.

Shards are the :mod:`tpfuse.sharding` ranges; uneven ``T`` is handled by per-slot row counts (no padding rows are
computed).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .. import collectives
from ..dispatch import register, table_routes
from ..errors import TPFuseError
from .base import PeerTimeoutFlag, register_workspace, workspace_reason
from ..sharding import shard_range, shard_rows

# semaphore channels: flag index = channel * TP + source rank
_READY, _DONE, _DATA, _BAR = range(4)
_NCHAN = 4

Layout = List[Tuple[int, int, int]]  # per rank q: (byte offset of slot q in ``ag``, data bytes, scale bytes)


def chunk_order(rank: int, tp: int) -> List[int]:
    """Peers in the order this rank talks to them: rank+1, rank+2, ... (so no peer is everyone's first)."""
    return [(rank + i) % tp for i in range(1, tp)]


def slot_rows(num_tokens: int, tp: int) -> List[Tuple[int, int]]:
    """``(start, length)`` of each rank's token slot (:mod:`tpfuse.sharding` ranges)."""
    return [(s, e - s) for s, e in (shard_range(num_tokens, tp, p) for p in range(tp))]


def ag_layout(num_tokens: int, tp: int, hidden: int, itemsize: int, fp8: Optional[str]) -> Layout:
    """Where each rank's slot lies in ``ag`` for a call (module docstring's buffer table). ``fp8``: ``None``
    (dense, ``itemsize`` bytes per element), ``"tensor"`` (e4m3 bytes only) or ``"row"`` (e4m3 bytes, then the
    slot's fp32 row scales)."""
    slots = slot_rows(num_tokens, tp)
    if fp8 is None:
        s = shard_rows(num_tokens, tp)
        return [(q * s * hidden * itemsize, n * hidden * itemsize, 0) for q, (_, n) in enumerate(slots)]
    out, off = [], 0
    for _, n in slots:
        sc = 4 * n if fp8 == "row" else 0
        out.append((off, n * hidden, sc))
        off += -(-(n * hidden + sc) // 16) * 16
    return out


def ag_bytes(max_tokens: int, tp: int, hidden: int, itemsize: int) -> int:
    """Size of ``ag``: the larger of the dense and the FP8 layouts at ``max_tokens``."""
    rows = tp * shard_rows(max_tokens, tp)
    return max(rows * hidden * itemsize, rows * (hidden + 4) + 16 * tp)


class AsyncTPWorkspace(PeerTimeoutFlag):
    """Symmetric buffers, semaphores and side stream of one communicator (see the module docstring); a
    :class:`~tpfuse.backends.base.Workspace` (``comm.workspaces["async_tp"]``)."""

    def __init__(self, comm):
        import torch.distributed._symmetric_memory as symm_mem

        super().__init__(comm, "async-TP / sequence-parallel exchange")
        self.hidden, self.dtype = comm.hidden_size, comm.dtype
        self.s_max = shard_rows(comm.max_tokens, comm.tp)
        rows = self.tp * self.s_max
        dev, dt, h = comm.device, comm.dtype, self.hidden
        self.device = dev
        nbytes = ag_bytes(comm.max_tokens, self.tp, h, dt.itemsize)
        self.ag_buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
        self.ag_h = symm_mem.rendezvous(self.ag_buf, comm.group)
        self.ag = self.ag_buf[: rows * h * dt.itemsize].view(dt).view(rows, h)
        self.rs = symm_mem.empty(rows, h, dtype=dt, device=dev)
        self.rs_h = symm_mem.rendezvous(self.rs, comm.group)
        self.rs_tmp = torch.empty(rows, h, dtype=dt, device=dev)
        self.sc_tmp = torch.empty(self.tp * -(-self.s_max // 4) * 4, dtype=torch.float32, device=dev)
        # views of every peer's buffers, made once (no per-call handle work)
        self.ag_peer = [self.ag_h.get_buffer(p, [nbytes], torch.uint8) for p in range(self.tp)]
        self.rs_peer = [self.rs_h.get_buffer(p, [rows, h], dt) for p in range(self.tp)]
        # semaphores: counters per (channel, source rank), then the local error word; 64 ints = one 256 B line
        self.err_slot = _NCHAN * self.tp
        self.flags = symm_mem.empty(-(-(self.err_slot + 1) // 64) * 64, dtype=torch.int32, device=dev)
        self.flags_h = symm_mem.rendezvous(self.flags, comm.group)
        ptrs = [int(p) for p in self.flags_h.buffer_ptrs]
        deltas = [p - ptrs[self.rank] for p in ptrs]
        if any(d % 64 for d in deltas):  # kernels.signals._peer assumes 64-byte multiples (16 int32)
            raise TPFuseError(f"symmetric flag buffers are not 64-byte aligned relative to each other: {deltas}")
        self.deltas = torch.tensor(deltas, dtype=torch.int64, device=dev)
        self.flags.zero_()
        self.timeout_ns = int(self.timeout_s * 1e9)
        self.side = torch.cuda.Stream(device=dev)
        self._all = 0
        for p in chunk_order(self.rank, self.tp):
            self._all |= 1 << p
        torch.cuda.synchronize(dev)
        collectives.barrier(comm.group, dev)  # every rank's flags are zero before any signal

    # ------------------------------------------------------------------------------------------------------
    def close(self, collective: bool = True) -> None:  # frees local references only: no barrier either way
        self.ag_buf = self.ag_h = self.ag = self.ag_peer = None
        self.rs = self.rs_h = self.rs_tmp = self.rs_peer = self.sc_tmp = None
        self.flags = self.flags_h = None

    def _sem(self, signal: Optional[Tuple[int, int]] = None, wait: Optional[Tuple[int, int]] = None) -> None:
        """One semaphore kernel on the current stream: ``signal=(channel, peer mask)`` then ``wait=(channel,
        peer mask)`` (one signal from each masked peer)."""
        from ..kernels.signals import launch_semaphore

        sc, sm = signal if signal is not None else (0, 0)
        wc, wm = wait if wait is not None else (0, 0)
        launch_semaphore(self.flags, self.deltas, self.err, self.timeout_ns, self.err_slot, self.rank, self.tp,
                         sig_base=sc * self.tp, sig_mask=sm, wait_base=wc * self.tp, wait_mask=wm)

    def _stage_scale(self, sc: torch.Tensor, q: int, s: int) -> torch.Tensor:
        """A row-wise scale chunk ``[n, 1]`` of rank q's rows, at a 16-byte boundary (cuBLASLt's vector scales):
        as it is, or copied (current stream) into ``sc_tmp`` at ``q * round_up(s, 4)``."""
        if sc.data_ptr() % 16 == 0:
            return sc
        s4 = -(-s // 4) * 4
        staged = self.sc_tmp[q * s4: q * s4 + sc.shape[0]].view(-1, 1)
        staged.copy_(sc)
        return staged

    # ------------------------------------------------------------------------------------------------------
    # all-gather half

    def _publish_and_pull(self, x_shard: torch.Tensor, x_scale: Optional[torch.Tensor], lay: Layout,
                          num_tokens: int, dest: Optional[torch.Tensor]
                          ) -> Tuple[torch.cuda.Event, Dict[int, torch.cuda.Event]]:
        """Side stream: copy this rank's shard (and its row-wise scales) into its ``ag`` slot, signal READY to and
        wait READY from every peer, pull every peer's slot (into ``dest`` rows when given, else into this rank's
        ``ag`` slot of that peer), signal DONE. Returns the event after the handshake (the caller's first GEMM
        waits for it: see the module docstring) and an event per peer (its chunk has arrived)."""
        r = self.rank
        slots = slot_rows(num_tokens, self.tp)
        self.side.wait_stream(torch.cuda.current_stream())
        events = {}
        with torch.cuda.stream(self.side):
            off, db, sb = lay[r]
            if db:
                self.ag_buf[off: off + db].copy_(x_shard.view(torch.uint8).view(-1))
            if sb:
                self.ag_buf[off + db: off + db + sb].copy_(x_scale.view(torch.uint8).view(-1))
            self._sem(signal=(_READY, self._all), wait=(_READY, self._all))
            ready = torch.cuda.Event()
            ready.record(self.side)
            for p in chunk_order(r, self.tp):
                off, db, sb = lay[p]
                if db:
                    start, n = slots[p]
                    target = (dest[start: start + n].view(torch.uint8).view(-1) if dest is not None
                              else self.ag_buf[off: off + db + sb])
                    target.copy_(self.ag_peer[p][off: off + db + sb])
                ev = torch.cuda.Event()
                ev.record(self.side)
                events[p] = ev
            self._sem(signal=(_DONE, self._all))
        return ready, events

    def _finish_gather(self) -> None:
        """Join the side stream and wait until every peer has pulled this rank's slot (it may then be reused)."""
        torch.cuda.current_stream().wait_stream(self.side)
        self._sem(wait=(_DONE, self._all))

    def all_gather_matmul(self, x_shard: torch.Tensor, weight: torch.Tensor, num_tokens: int,
                          x_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
        from .. import scaled_gemm as sg

        tp, r, h = self.tp, self.rank, self.hidden
        fp8 = None if w_scale is None else (sg.ROW if x_scale.dim() == 2 else sg.TENSOR)
        slots = slot_rows(num_tokens, tp)
        lay = ag_layout(num_tokens, tp, h, self.dtype.itemsize, fp8)
        out = torch.empty(num_tokens, weight.shape[0], dtype=self.dtype, device=x_shard.device)
        main = torch.cuda.current_stream()

        def gemm(a, a_scale, rows):
            if fp8 is None:
                torch.mm(a, weight.t(), out=rows)
            else:
                sg.mm(a, weight, a_scale, w_scale, out=rows)

        ready, events = self._publish_and_pull(x_shard, x_scale, lay, num_tokens, None)
        main.wait_event(ready)  # no semaphore kernel may be left behind a running GEMM (module docstring)
        start, n = slots[r]
        if n:
            gemm(x_shard, self._stage_scale(x_scale, r, shard_rows(num_tokens, tp)) if fp8 == sg.ROW else x_scale,
                 out[start: start + n])
        for p in chunk_order(r, tp):
            main.wait_event(events[p])
            start, n = slots[p]
            if n:
                off, db, sb = lay[p]
                if fp8 is None:
                    a, a_scale = self.ag_buf[off: off + db].view(self.dtype).view(n, h), None
                else:
                    a = self.ag_buf[off: off + db].view(sg.FP8).view(n, h)
                    a_scale = (self.ag_buf[off + db: off + db + sb].view(torch.float32).view(n, 1) if sb
                               else x_scale)  # per-tensor: equal on every rank (scaled_gemm contract)
                gemm(a, a_scale, out[start: start + n])
        self._finish_gather()
        return out

    def all_gather(self, x_shard: torch.Tensor, num_tokens: int) -> torch.Tensor:
        out = torch.empty(num_tokens, self.hidden, dtype=x_shard.dtype, device=x_shard.device)
        start, n = slot_rows(num_tokens, self.tp)[self.rank]
        lay = ag_layout(num_tokens, self.tp, self.hidden, self.dtype.itemsize, None)
        self._publish_and_pull(x_shard, None, lay, num_tokens, out)
        out[start: start + n].copy_(x_shard)
        self._finish_gather()
        return out

    # ------------------------------------------------------------------------------------------------------
    # reduce-scatter half

    def _push_partials(self, x: torch.Tensor, weight: Optional[torch.Tensor], x_scale: Optional[torch.Tensor],
                       w_scale: Optional[torch.Tensor]):
        """Exchange of the reduce-scatter: this rank's partial (``x @ weight.T``, FP8 when scales are given, or
        ``x`` itself when ``weight`` is None) of every peer's token rows lands in that peer's ``rs`` slot ``r``.
        Returns ``(rows, S)`` of this rank's shard; on return, slots ``0..TP-1`` rows ``[q*S, q*S + rows)`` hold
        every rank's partial."""
        from .. import scaled_gemm as sg

        tp, r = self.tp, self.rank
        t = x.shape[0]
        s = shard_rows(t, tp)
        slots = slot_rows(t, tp)
        row_scales = x_scale is not None and x_scale.dim() == 2
        main = torch.cuda.current_stream()

        def gemm(q, start, n, out):  # rows of rank q's token chunk
            if w_scale is None:
                torch.mm(x[start: start + n], weight.t(), out=out)
                return
            sc = self._stage_scale(x_scale[start: start + n], q, s) if row_scales else x_scale
            sg.mm(x[start: start + n], weight, sc, w_scale, out=out)

        self._sem(signal=(_BAR, self._all), wait=(_BAR, self._all))  # peers finished summing the last call's slots
        self.side.wait_stream(main)
        for p in chunk_order(r, tp):
            start, n = slots[p]
            src = x[start: start + n]
            if weight is not None and n:
                src = self.rs_tmp[p * s: p * s + n]
                gemm(p, start, n, src)
            ev = torch.cuda.Event()
            ev.record(main)
            with torch.cuda.stream(self.side):
                self.side.wait_event(ev)
                if n:
                    self.rs_peer[p][r * s: r * s + n].copy_(src)
                self._sem(signal=(_DATA, 1 << p))
        start, n = slots[r]
        if n:
            if weight is not None:
                gemm(r, start, n, self.rs[r * s: r * s + n])
            else:
                self.rs[r * s: r * s + n].copy_(x[start: start + n])
        main.wait_stream(self.side)
        self._sem(wait=(_DATA, self._all))
        return n, s

    def matmul_reduce_scatter(self, x: torch.Tensor, weight: torch.Tensor, x_scale: Optional[torch.Tensor] = None,
                              w_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        from ..kernels.reduce_slots import launch_reduce_slots

        n, s = self._push_partials(x, weight, x_scale, w_scale)
        out = torch.empty(n, self.hidden, dtype=self.dtype, device=x.device)
        return launch_reduce_slots(self.rs, self.tp, s * self.hidden, n, out)

    def reduce_scatter_rmsnorm(self, x, weight, residual_shard, norm_weight, eps, quant, gemma, x_scale=None,
                               w_scale=None):
        """The exchange (``weight``: GEMM first, or None) then sum + residual + RMSNorm + quant in one kernel."""
        from .. import ops
        from ..kernels.reduce_slots import launch_reduce_slots_rmsnorm

        n, s = self._push_partials(x, weight, x_scale, w_scale)
        fmt, group_size, in_scale = ops.spec_to_args(quant)
        data, scale = ops.alloc_outputs(n, self.hidden, fmt, group_size, x.device, self.dtype)
        res_out = torch.empty(n, self.hidden, dtype=self.dtype, device=x.device)
        launch_reduce_slots_rmsnorm(self.rs, self.tp, s * self.hidden, n, residual_shard, norm_weight, eps, res_out,
                                    data, scale, in_scale, fmt, group_size, gemma)
        return ops._wrap(data, scale, quant, res_out, (n, self.hidden)), res_out


PATHS = ("tpfuse_async_tp", "tpfuse_reduce_scatter", "tpfuse_all_gather")
NAME = "async_tp"
"""This backend's key in ``TPCommunicator.workspaces``."""


def allocate(comm) -> Optional[AsyncTPWorkspace]:
    """Build the workspace on NCCL groups with CUDA (collective over ``comm.group``; every rank decides alike)."""
    if comm.device.type != "cuda" or comm.tp == 1 or not table_routes(comm, PATHS):
        return None
    return AsyncTPWorkspace(comm)


register_workspace(NAME, allocate)


def _available(comm) -> Optional[str]:
    if comm.device.type != "cuda":
        return f"needs CUDA tensors: an NCCL group, or one-GPU mode (this one is {comm.backend} on the CPU)"
    return workspace_reason(comm, NAME, "no sequence-parallel workspace (TP=1, or the table routes no size <= "
                                        "max_tokens to these paths)")


@register("all_gather_matmul", "tpfuse_async_tp", available=_available)
def _agmm(comm, x_shard, weight, num_tokens, *, x_scale=None, w_scale=None):
    return comm.workspaces[NAME].all_gather_matmul(x_shard, weight, num_tokens, x_scale, w_scale)


@register("matmul_reduce_scatter", "tpfuse_async_tp", available=_available)
def _mmrs(comm, x, weight, *, x_scale=None, w_scale=None):
    return comm.workspaces[NAME].matmul_reduce_scatter(x, weight, x_scale, w_scale)


@register("matmul_reduce_scatter_rmsnorm", "tpfuse_async_tp", available=_available)
def _mmrsn(comm, x, weight, residual_shard, norm_weight, eps, *, quant, gemma, x_scale=None, w_scale=None):
    return comm.workspaces[NAME].reduce_scatter_rmsnorm(x, weight, residual_shard, norm_weight, eps, quant, gemma, x_scale,
                                                w_scale)


@register("reduce_scatter_rmsnorm", "tpfuse_reduce_scatter", available=_available)
def _rsn(comm, x, residual_shard, weight, eps, *, quant, gemma):
    return comm.workspaces[NAME].reduce_scatter_rmsnorm(x, None, residual_shard, weight, eps, quant, gemma)


@register("all_gather", "tpfuse_all_gather", available=_available)
def _ag(comm, x_shard, num_tokens):
    return comm.workspaces[NAME].all_gather(x_shard, num_tokens)
