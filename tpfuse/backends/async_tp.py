"""Sequence-parallel paths over symmetric memory: ``tpfuse_async_tp`` (GEMMs overlapped with the collective),
``tpfuse_rs`` (reduce-scatter fused with add + RMSNorm + quant) and ``tpfuse_ag`` (all-gather).

Design: the data moves by the GPUs' copy engines (``copy_`` between symmetric buffers is a DMA over NVLink, using
no SMs), one token-chunk per peer, while the GEMM of the chunk already present runs on the compute stream.

``all_gather_matmul(x_shard [Ts, H], w_shard_n [N, H])`` -> ``[T, N]``::

    main : mm(x_shard) -> out[r rows] | wait chunk p, mm(chunk p) -> out[p rows] | ...
    side : copy x_shard -> own slot r, signal READY to peers | wait READY(p), pull peer p's slot p -> own slot p,
           event(p), signal DONE(p)
    main (end): wait DONE from every peer (they finished reading my slot: it may be overwritten next call)

``matmul_reduce_scatter(x_shard_k [T, K], w_shard_k [H, K])`` -> ``[Ts, H]``::

    main : barrier (every peer finished reading its slots of the last call) | for each peer d (own chunk last):
           mm(x[d rows]) -> tmp[d] (own: -> own slot r), event(d)
    side : wait event(d), push tmp[d] -> peer d's slot r, signal DATA(d)
    main (end): wait DATA from every peer, one kernel sums the TP slots in fp32 -> [Ts, H]
                (``matmul_reduce_scatter_rmsnorm``: the same kernel also adds the residual and applies
                RMSNorm + quant, :mod:`tpfuse.kernels.reduce_slots`)

``reduce_scatter_rmsnorm`` (``tpfuse_rs``) is the same exchange without the GEMM (x's token chunks are pushed as
they are); ``all_gather`` (``tpfuse_ag``) is the all-gather half without the GEMM (peers' slots are pulled
straight into the output).

Buffers (allocated once per communicator, sized from ``max_tokens x hidden``; ``S = ceil(max_tokens / TP)``):

=============  ==========================  =========================================================
buffer         shape                       written by
=============  ==========================  =========================================================
``ag``         symmetric ``[TP * S, H]``   slot r: this rank's shard; slot p: this rank's pull of p
``rs``         symmetric ``[TP * S, H]``   slot q: rank q's partial sum for this rank's token shard
``rs_tmp``     local ``[TP * S, H]``       this rank's partials for peers, until their push is done
=============  ==========================  =========================================================

Streams: the caller's current stream does the GEMMs and the final reduction; one side stream per communicator
does the copies and signals. Both are joined before an op returns, so the op is stream-ordered like any torch op
and CUDA-graph capturable (signals reset themselves). Waits go through torch symmetric memory's signal pads with
``CommConfig.timeout_s`` as their bound; on timeout torch aborts the kernel (a CUDA error), unlike the fused
all-reduce kernels, which raise :class:`~tpfuse.errors.TPFusePeerTimeout` - a known gap of these paths. Shards are the :mod:`tpfuse.sharding` ranges; uneven ``T`` is handled
by per-slot row counts (no padding rows are computed).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..dispatch import register, table_routes
from ..sharding import shard_range, shard_rows

# signal-pad channels (each symmetric buffer has its own pad, so channels only need to be unique per buffer)
_READY, _DONE, _DATA = 0, 1, 2


def chunk_order(rank: int, tp: int) -> List[int]:
    """Peers in the order this rank talks to them: rank+1, rank+2, ... (so no peer is everyone's first)."""
    return [(rank + i) % tp for i in range(1, tp)]


def slot_rows(num_tokens: int, tp: int) -> List[Tuple[int, int]]:
    """``(start, length)`` of each rank's token slot (:mod:`tpfuse.sharding` ranges)."""
    return [(s, e - s) for s, e in (shard_range(num_tokens, tp, p) for p in range(tp))]


class AsyncTPWorkspace:
    """Symmetric buffers + side stream of one communicator (see the module docstring's buffer table)."""

    def __init__(self, comm):
        import torch.distributed._symmetric_memory as symm_mem

        self.tp, self.rank, self.hidden = comm.tp, comm.rank, comm.hidden_size
        self.s_max = shard_rows(comm.max_tokens, comm.tp)
        rows = self.tp * self.s_max
        dev, dt = comm.device, comm.dtype
        self.ag = symm_mem.empty(rows, self.hidden, dtype=dt, device=dev)
        self.ag_h = symm_mem.rendezvous(self.ag, comm.group)
        self.rs = symm_mem.empty(rows, self.hidden, dtype=dt, device=dev)
        self.rs_h = symm_mem.rendezvous(self.rs, comm.group)
        self.rs_tmp = torch.empty(rows, self.hidden, dtype=dt, device=dev)
        # views of every peer's buffers, made once (no per-call handle work)
        self.ag_peer = [self.ag_h.get_buffer(p, [rows, self.hidden], dt) for p in range(self.tp)]
        self.rs_peer = [self.rs_h.get_buffer(p, [rows, self.hidden], dt) for p in range(self.tp)]
        self.side = torch.cuda.Stream(device=dev)
        self.timeout_ms = int(comm.config.timeout_s * 1000)

    def _publish_and_pull(self, x_shard: torch.Tensor, num_tokens: int, dest: Optional[torch.Tensor]):
        """Side stream: copy this rank's shard into its ``ag`` slot, signal READY, pull every peer's slot (into
        ``dest`` rows when given, else into this rank's ``ag`` slot of that peer), signal DONE. Returns an event per
        peer (its chunk has arrived). The caller's stream is free meanwhile (it runs the local GEMM)."""
        tp, r, s, to = self.tp, self.rank, shard_rows(num_tokens, self.tp), self.timeout_ms
        slots = slot_rows(num_tokens, tp)
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        events = {}
        with torch.cuda.stream(self.side):
            self.ag[r * s: r * s + slots[r][1]].copy_(x_shard)
            for p in chunk_order(r, tp):
                self.ag_h.put_signal(p, _READY, to)
            for p in chunk_order(r, tp):
                self.ag_h.wait_signal(p, _READY, to)
                start, n = slots[p]
                if n:
                    target = dest[start: start + n] if dest is not None else self.ag[p * s: p * s + n]
                    target.copy_(self.ag_peer[p][p * s: p * s + n])
                ev = torch.cuda.Event()
                ev.record(self.side)
                events[p] = ev
                self.ag_h.put_signal(p, _DONE, to)
        return events

    def _finish_gather(self) -> None:
        """Join the side stream and wait until every peer has pulled this rank's slot (it may then be reused)."""
        torch.cuda.current_stream().wait_stream(self.side)
        for p in chunk_order(self.rank, self.tp):
            self.ag_h.wait_signal(p, _DONE, self.timeout_ms)

    def all_gather_matmul(self, x_shard: torch.Tensor, weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
        tp, r, s = self.tp, self.rank, shard_rows(num_tokens, self.tp)
        slots = slot_rows(num_tokens, tp)
        out = torch.empty(num_tokens, weight.shape[0], dtype=x_shard.dtype, device=x_shard.device)
        main = torch.cuda.current_stream()
        events = self._publish_and_pull(x_shard, num_tokens, None)
        if slots[r][1]:
            torch.mm(x_shard, weight.t(), out=out[slots[r][0]: slots[r][0] + slots[r][1]])
        for p in chunk_order(r, tp):
            main.wait_event(events[p])
            start, n = slots[p]
            if n:
                torch.mm(self.ag[p * s: p * s + n], weight.t(), out=out[start: start + n])
        self._finish_gather()
        return out

    def _push_partials(self, x: torch.Tensor, weight: Optional[torch.Tensor]):
        """Exchange of the reduce-scatter: this rank's partial (``x @ weight.T``, or ``x`` itself when ``weight`` is
        None) of every peer's token rows lands in that peer's ``rs`` slot ``r``. Returns ``(rows, S)`` of this
        rank's shard; on return, slots ``0..TP-1`` rows ``[q*S, q*S + rows)`` hold every rank's partial."""
        tp, r, to = self.tp, self.rank, self.timeout_ms
        t = x.shape[0]
        s = shard_rows(t, tp)
        slots = slot_rows(t, tp)
        main = torch.cuda.current_stream()
        self.rs_h.barrier(_READY, to)  # peers finished summing their slots of the previous call
        self.side.wait_stream(main)
        for p in chunk_order(r, tp):
            start, n = slots[p]
            src = x[start: start + n]
            if weight is not None and n:
                torch.mm(src, weight.t(), out=self.rs_tmp[p * s: p * s + n])
                src = self.rs_tmp[p * s: p * s + n]
            ev = torch.cuda.Event()
            ev.record(main)
            with torch.cuda.stream(self.side):
                self.side.wait_event(ev)
                if n:
                    self.rs_peer[p][r * s: r * s + n].copy_(src)
                self.rs_h.put_signal(p, _DATA, to)
        start, n = slots[r]
        if n:
            if weight is not None:
                torch.mm(x[start: start + n], weight.t(), out=self.rs[r * s: r * s + n])
            else:
                self.rs[r * s: r * s + n].copy_(x[start: start + n])
        main.wait_stream(self.side)
        for p in chunk_order(r, tp):
            self.rs_h.wait_signal(p, _DATA, to)
        return n, s

    def matmul_reduce_scatter(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from ..kernels.reduce_slots import launch_reduce_slots

        n, s = self._push_partials(x, weight)
        out = torch.empty(n, self.hidden, dtype=x.dtype, device=x.device)
        return launch_reduce_slots(self.rs, self.tp, s * self.hidden, n, out)

    def reduce_rmsnorm(self, x, weight, residual_shard, norm_weight, eps, quant, gemma):
        """The exchange (``weight``: GEMM first, or None) then sum + residual + RMSNorm + quant in one kernel."""
        from .. import ops
        from ..kernels.reduce_slots import launch_reduce_slots_rmsnorm

        n, s = self._push_partials(x, weight)
        fmt, group, in_scale = ops.spec_to_args(quant)
        data, scale = ops.alloc_outputs(n, self.hidden, fmt, group, x.device, x.dtype)
        res_out = torch.empty(n, self.hidden, dtype=x.dtype, device=x.device)
        launch_reduce_slots_rmsnorm(self.rs, self.tp, s * self.hidden, n, residual_shard, norm_weight, eps, res_out,
                                    data, scale, in_scale, fmt, group, gemma)
        return ops._wrap(data, scale, quant, res_out, (n, self.hidden)), res_out

    def all_gather(self, x_shard: torch.Tensor, num_tokens: int) -> torch.Tensor:
        out = torch.empty(num_tokens, self.hidden, dtype=x_shard.dtype, device=x_shard.device)
        start, n = slot_rows(num_tokens, self.tp)[self.rank]
        self._publish_and_pull(x_shard, num_tokens, out)
        out[start: start + n].copy_(x_shard)
        self._finish_gather()
        return out


PATHS = ("tpfuse_async_tp", "tpfuse_rs", "tpfuse_ag")


def allocate(comm) -> Optional[AsyncTPWorkspace]:
    """Build the workspace on NCCL groups with CUDA (collective over ``comm.group``; every rank decides alike)."""
    if comm.backend != "nccl" or comm.tp == 1 or not table_routes(comm, PATHS):
        return None
    return AsyncTPWorkspace(comm)


def _available(comm) -> Optional[str]:
    if comm.backend != "nccl":
        return f"needs an NCCL group with symmetric memory (this one is {comm.backend})"
    if getattr(comm, "async_tp", None) is None:
        return "no sequence-parallel workspace (TP=1, or the table routes no size <= max_tokens to these paths)"
    return None


@register("all_gather_matmul", "tpfuse_async_tp", available=_available)
def _agmm(comm, x_shard, weight, num_tokens):
    return comm.async_tp.all_gather_matmul(x_shard, weight, num_tokens)


@register("matmul_reduce_scatter", "tpfuse_async_tp", available=_available)
def _mmrs(comm, x, weight):
    return comm.async_tp.matmul_reduce_scatter(x, weight)


@register("reduce_scatter_rmsnorm", "tpfuse_rs", available=_available)
def _rsn(comm, x, residual_shard, weight, eps, *, quant, gemma):
    return comm.async_tp.reduce_rmsnorm(x, None, residual_shard, weight, eps, quant, gemma)


@register("all_gather", "tpfuse_ag", available=_available)
def _ag(comm, x_shard, num_tokens):
    return comm.async_tp.all_gather(x_shard, num_tokens)
