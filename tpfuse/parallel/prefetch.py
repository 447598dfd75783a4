"""A decode step's next GEMM weight brought into L2 while decode attention runs (``KVCacheConfig.prefetch_o_proj``)
beside the unfused attention kernels (``fuse_rope=False``); the fused RoPE + attention kernel prefetches it itself
(``tpfuse.attention.rope_decode_attention(prefetch=)``), with no side stream.

At small batch the decode attention reads a few MB of KV cache in ~10 µs (B = 1 at 1k tokens: 4 MB), latency- not
bandwidth-bound, so HBM idles through it; the o_proj GEMM right after it then streams its whole weight (8B: 32 MB
bf16, 16 MB e4m3) from HBM. :func:`prefetching` forks a side stream after the qkv GEMM, issues
:func:`tpfuse.kernels.l2_prefetch.launch_l2_prefetch` of that weight there (its programs issue ``prefetch.global.L2``
and exit), and joins it back before the caller's next kernel: the weight's lines arrive while attention runs.

Streams: the side stream (one per device, :func:`side_stream`) waits for everything queued on the current stream
(the qkv GEMM's output is not read, only ordering for the HBM traffic), and the current stream waits for the side
stream at the end of the ``with`` block (a CUDA graph capture needs every forked stream joined; the prefetch
kernel is short, its data still in flight then). Inside graph capture the fork / join become graph edges. Values:
none change (a prefetch writes nothing), so the step's output is bit for bit the step without it; only the time
moves. Off CUDA (CPU, the interpreter) the block runs as without it. Off by default: on the full 8B it made the
decode step 1-6% slower (``KVCacheConfig.prefetch_o_proj`` has the numbers).
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch

_SIDE: Dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    s = _SIDE.get(device)
    if s is None:
        s = _SIDE[device] = torch.cuda.Stream(device=device)
    return s


_PLAIN = contextlib.nullcontext()  # reusable: the layers enter it every step where the prefetch is off


def prefetching(weight: torch.Tensor, enabled: bool = True):
    """A context that runs its block with ``weight`` prefetched into L2 from a side stream (module docstring); a
    plain block (no generator made: this sits in every layer's forward) where ``enabled`` is False or ``weight`` is
    not on a GPU."""
    return _side_prefetch(weight) if enabled and weight.is_cuda else _PLAIN


@contextlib.contextmanager
def _side_prefetch(weight: torch.Tensor):
    from ..kernels.l2_prefetch import launch_l2_prefetch

    main = torch.cuda.current_stream(weight.device)
    side = side_stream(weight.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        launch_l2_prefetch(weight)
    try:
        yield
    finally:
        main.wait_stream(side)


def prefetch_o_proj(ctx) -> bool:
    """Whether this step prefetches the o_proj weight: a decode step (``ctx.meta.decode``) of a cache whose
    ``KVCacheConfig.prefetch_o_proj`` is on (``ctx``: a :class:`~tpfuse.parallel.layers.StepContext`)."""
    cfg = getattr(ctx.storage, "cfg", None)
    return ctx.meta.decode is not None and bool(getattr(cfg, "prefetch_o_proj", False))
