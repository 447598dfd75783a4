"""The torch.distributed collectives tpfuse issues on tensors, for any (group backend, tensor device) pair.

NCCL moves device tensors and gloo host tensors. In one-GPU mode (:mod:`tpfuse.distributed`) the communicator's
tensors are on CUDA while its group is gloo (NCCL refuses two ranks on one device), so every collective here
copies a CUDA tensor to the host, runs gloo on the copy and writes the result back ("staged"). The math is the
same as NCCL's: sums in the tensor's dtype (gloo sums bf16 / fp16 on the host in that dtype). Staged calls sync
the stream and cannot be captured in a CUDA graph. NCCL groups and host tensors take torch's call directly.

Every function is collective over ``group``: all ranks call it alike, in the same order. ``backend``: the group's
backend where the caller knows it (a hot path: ``dist.get_backend`` costs microseconds), else looked up.

================================  =============================================================================
function                          result
================================  =============================================================================
``all_reduce_(t, group, op)``     ``t`` (in place) reduced over the group
``all_gather_into_(out, x, g)``   ``out [tp * n, ...]`` = every rank's ``x [n, ...]`` in rank order
``reduce_scatter_(out, x, g)``    ``out [n, ...]`` = this rank's rows of the sum of every rank's ``x [tp * n, ...]``
``broadcast_(t, src, group)``     ``t`` (in place) = global rank ``src``'s ``t``
``barrier(group, device)``        returns once every rank arrived (NCCL: on ``device``)
================================  =============================================================================
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _nccl(group, backend: Optional[str]) -> bool:
    # callers on a hot path pass the backend they know (comm.backend): dist.get_backend costs microseconds
    return (backend or dist.get_backend(group)) == "nccl"


def staged(t: torch.Tensor, group, backend: Optional[str] = None) -> bool:
    """True when ``t`` is a CUDA tensor on a group that moves host memory only (gloo: one-GPU mode)."""
    return t.is_cuda and not _nccl(group, backend)


def _in_place(t: torch.Tensor, group, backend: Optional[str], collective) -> torch.Tensor:
    """``collective(x)`` works on ``x`` in place: on ``t`` itself, or on a host copy written back when staged."""
    if not staged(t, group, backend):
        collective(t)
        return t
    h = t.cpu()
    collective(h)
    return t.copy_(h)


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM, backend: Optional[str] = None) -> torch.Tensor:
    return _in_place(t, group, backend, lambda x: dist.all_reduce(x, op=op, group=group))


def all_gather_into_(out: torch.Tensor, x: torch.Tensor, group, backend: Optional[str] = None) -> torch.Tensor:
    if _nccl(group, backend):
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    # gloo: the list form (every torch version's gloo has it for every dtype)
    h = x.cpu().contiguous()
    parts = [torch.empty_like(h) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, h, group=group)
    return out.copy_(torch.cat(parts, dim=0))


def reduce_scatter_(out: torch.Tensor, x: torch.Tensor, group, backend: Optional[str] = None) -> torch.Tensor:
    if _nccl(group, backend):
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    # gloo: an all-reduce, then this rank's rows (gloo's reduce-scatter does not cover every dtype and version);
    # a copy, since the input is never written
    h = x.to("cpu", copy=True)
    dist.all_reduce(h, group=group)
    n = out.shape[0]
    r = dist.get_rank(group)
    return out.copy_(h[r * n: (r + 1) * n])


def broadcast_(t: torch.Tensor, src: int, group, backend: Optional[str] = None) -> torch.Tensor:
    return _in_place(t, group, backend, lambda x: dist.broadcast(x, src=src, group=group))


def barrier(group, device: torch.device) -> None:
    """Every rank of ``group`` arrived (NCCL's barrier runs on ``device``; gloo's on the host)."""
    if _nccl(group, None):
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)
