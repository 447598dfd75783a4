"""``tpfuse_async_tp``: GEMMs overlapped with the collective over symmetric memory (sequence parallelism + async TP).

Design: the data moves by the GPUs' copy engines (``copy_`` between symmetric buffers is a DMA over NVLink, using
no SMs), one token-chunk per peer, while the GEMM of the chunk already present runs on the compute stream.

``all_gather_matmul(x_shard [Ts, H], w_shard_n [N, H])`` -> ``[T, N]``::

    main : copy x_shard -> own slot r | signal READY to peers | mm(x_shard) -> out[r rows] | wait chunk p | mm ...
    side :                             wait READY(p), pull peer p's slot p -> own slot p, event(p), signal DONE(p)
    main (end): wait DONE from every peer (they finished reading my slot: it may be overwritten next call)

``matmul_reduce_scatter(x_shard_k [T, K], w_shard_k [H, K])`` -> ``[Ts, H]``::

    main : barrier (every peer finished reading its slots of the last call) | for each peer d (own chunk last):
           mm(x[d rows]) -> tmp[d] (own: -> own slot r), event(d)
    side : wait event(d), push tmp[d] -> peer d's slot r, signal DATA(d)
    main (end): wait DATA from every peer, sum the TP slots in fp32 -> [Ts, H]

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
``CommConfig.timeout_s`` as their bound. Shards are the :mod:`tpfuse.sharding` ranges; uneven ``T`` is handled
by per-slot row counts (no padding rows are computed).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..dispatch import register
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

    def all_gather_matmul(self, x_shard: torch.Tensor, weight: torch.Tensor, num_tokens: int) -> torch.Tensor:
        tp, r, s, to = self.tp, self.rank, shard_rows(num_tokens, self.tp), self.timeout_ms
        slots = slot_rows(num_tokens, tp)
        out = torch.empty(num_tokens, weight.shape[0], dtype=x_shard.dtype, device=x_shard.device)
        main = torch.cuda.current_stream()
        own = self.ag[r * s: r * s + slots[r][1]]
        own.copy_(x_shard)
        for p in chunk_order(r, tp):
            self.ag_h.put_signal(p, _READY, to)
        self.side.wait_stream(main)
        events = {}
        with torch.cuda.stream(self.side):
            for p in chunk_order(r, tp):
                self.ag_h.wait_signal(p, _READY, to)
                n = slots[p][1]
                if n:
                    self.ag[p * s: p * s + n].copy_(self.ag_peer[p][p * s: p * s + n])
                ev = torch.cuda.Event()
                ev.record(self.side)
                events[p] = ev
                self.ag_h.put_signal(p, _DONE, to)
        if slots[r][1]:
            torch.mm(x_shard, weight.t(), out=out[slots[r][0]: slots[r][0] + slots[r][1]])
        for p in chunk_order(r, tp):
            main.wait_event(events[p])
            start, n = slots[p]
            if n:
                torch.mm(self.ag[p * s: p * s + n], weight.t(), out=out[start: start + n])
        main.wait_stream(self.side)
        for p in chunk_order(r, tp):
            self.ag_h.wait_signal(p, _DONE, to)
        return out

    def matmul_reduce_scatter(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        tp, r, to = self.tp, self.rank, self.timeout_ms
        t = x.shape[0]
        s = shard_rows(t, tp)
        slots = slot_rows(t, tp)
        main = torch.cuda.current_stream()
        self.rs_h.barrier(_READY, to)  # peers finished summing their slots of the previous call
        self.side.wait_stream(main)
        for p in chunk_order(r, tp):
            start, n = slots[p]
            if n:
                torch.mm(x[start: start + n], weight.t(), out=self.rs_tmp[p * s: p * s + n])
            ev = torch.cuda.Event()
            ev.record(main)
            with torch.cuda.stream(self.side):
                self.side.wait_event(ev)
                if n:
                    self.rs_peer[p][r * s: r * s + n].copy_(self.rs_tmp[p * s: p * s + n])
                self.rs_h.put_signal(p, _DATA, to)
        start, n = slots[r]
        if n:
            torch.mm(x[start: start + n], weight.t(), out=self.rs[r * s: r * s + n])
        main.wait_stream(self.side)
        for p in chunk_order(r, tp):
            self.rs_h.wait_signal(p, _DATA, to)
        acc = self.rs[r * s: r * s + n].float()
        for q in chunk_order(r, tp):
            acc += self.rs[q * s: q * s + n]
        return acc.to(x.dtype)


def wants_workspace(comm) -> bool:
    """Allocate only when the table routes some size <= max_tokens to this path (or a config forces it)."""
    forced = "tpfuse_async_tp" in dict(comm.config.force_paths).values()
    nbytes = comm.max_tokens * comm.hidden_size * comm.dtype.itemsize
    routed = any(path == "tpfuse_async_tp" for op in ("all_gather_matmul", "matmul_reduce_scatter")
                 for lo, (mb, path) in zip([0] + [b[0] for b in comm.row.paths[op][:-1]], comm.row.paths[op])
                 if (lo or 0) < nbytes)
    return forced or routed


def allocate(comm) -> Optional[AsyncTPWorkspace]:
    """Build the workspace on NCCL groups with CUDA (collective over ``comm.group``; every rank decides alike)."""
    if comm.backend != "nccl" or comm.tp == 1 or not wants_workspace(comm):
        return None
    return AsyncTPWorkspace(comm)


def _available(comm) -> Optional[str]:
    if comm.backend != "nccl":
        return f"needs an NCCL group with symmetric memory (this one is {comm.backend})"
    if getattr(comm, "async_tp", None) is None:
        return "no async-TP workspace (TP=1, or the table routes no size <= max_tokens to it)"
    return None


@register("all_gather_matmul", "tpfuse_async_tp", available=_available)
def _agmm(comm, x_shard, weight, num_tokens):
    return comm.async_tp.all_gather_matmul(x_shard, weight, num_tokens)


@register("matmul_reduce_scatter", "tpfuse_async_tp", available=_available)
def _mmrs(comm, x, weight):
    return comm.async_tp.matmul_reduce_scatter(x, weight)
