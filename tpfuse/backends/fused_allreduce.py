"""``tpfuse_oneshot`` / ``tpfuse_twoshot``: tpfuse's fused all-reduce (+ residual add + RMSNorm + quant) kernels
over one torch symmetric-memory workspace per communicator (kernels: :mod:`tpfuse.kernels.fused_allreduce`).

Workspace (allocated once by :func:`allocate`, collective over ``comm.group``; released by ``close()``): one
symmetric uint8 buffer per rank, regions aligned to 256 bytes:

================  =====================================================  ==========================================
region            size                                                   use
================  =====================================================  ==========================================
flags             int32 ``3 * G * TP + KP * TP * G``                     barrier flags (one-shot; two-shot A and B;
                                                                         pipelined one-shot: chunk x source x producer)
oneshot_slots     ``2 x TP x C1 x H`` input dtype                        parity double buffer of pushed partials
pipe_slots        ``2 x TP x CP x H`` input dtype                        the same for the pipelined one-shot (only when
                                                                         the table / force_paths can route there)
twoshot_slots     ``TP x S x H`` input dtype, ``S = ceil(max_tokens/TP)``  pushed partials of this rank's range
stage_out         ``S x H x itemsize`` bytes                              finished output rows (any format)
stage_residual    ``S x H`` input dtype                                   finished residual rows
stage_scales      ``S x H / 4`` bytes                                     their scales (fp32 or e4m3, row-major)
================  =====================================================  ==========================================

Rows (workspace attributes ``oneshot_rows``, ``pipe_rows``, ``twoshot_rows``):
``C1 = min(max_tokens, 64 MiB / (2 * TP * H * itemsize))`` rows: larger one-shot calls run as several launches of
``C1`` rows; ``CP = min(max_tokens, 256 MiB / (2 * TP * H * itemsize))`` likewise for the pipelined one-shot
(``tpfuse_oneshot_pipe``, made for the large sizes where pushing 32 MiB and reducing it should overlap). ``G``
(programs per launch, at most one per SM) is agreed on by every rank at construction; the pipelined kernel splits it
into ``P`` producers and ``G - P`` consumers and a call into at most ``KP`` chunks.

Launches do no host sync and allocate only their outputs, so they can be captured in CUDA graphs. Every call of
an op must be issued on the same stream on every call (the kernels' buffer reuse relies on stream order).
A peer that does not arrive within ``CommConfig.timeout_s`` makes the kernel set a flag in pinned host memory;
:meth:`FusedAllReduceWorkspace.check` raises :class:`~tpfuse.errors.TPFusePeerTimeout` and marks the workspace broken.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import collectives
from ..distributed import ranks_per_device
from ..dispatch import register, table_routes
from .base import PeerTimeoutFlag, register_workspace, workspace_reason
from ..sharding import shard_rows

ONESHOT_BYTES = 64 << 20
PIPE_BYTES = 256 << 20
PIPE_MAX_CHUNKS = 8    # KP: chunks per pipelined call (more = finer overlap, more flag traffic)
PIPE_MIN_CHUNK_ROWS = 32
PIPE = "tpfuse_oneshot_pipe"
NAME = "fused_allreduce"
"""This backend's key in ``TPCommunicator.workspaces``."""
_ALIGN = 256


def _up(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def persistent_grid(sms: int, sharing: int) -> int:
    """Programs of the persistent kernels: one per SM. Where ``sharing`` ranks share one GPU (one-GPU mode), half
    the SMs, split among the ranks. Under MPS their kernels run concurrently and a program spins until its peers'
    programs run, so every rank's programs must be resident at once *and* SMs must stay free for the kernels the
    other ranks still have in flight before theirs (a GEMM cannot share an SM with a spinning program that holds its
    registers). The half is a margin, not a measured optimum (one-GPU mode is for correctness, not speed).
    Time-sliced ranks need neither, and lose nothing by it."""
    return sms if sharing <= 1 else max(1, sms // (2 * sharing))


class FusedAllReduceWorkspace(PeerTimeoutFlag):
    """The symmetric buffer, its typed views, device counters and the pinned error flag of one communicator; a
    :class:`~tpfuse.backends.base.Workspace` (``comm.workspaces["fused_allreduce"]``)."""

    def __init__(self, comm):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        super().__init__(comm, "symmetric-memory kernel")
        self.hidden, self.dtype = comm.hidden_size, comm.dtype
        dev = comm.device
        self.device = dev
        sms = torch.tensor([persistent_grid(torch.cuda.get_device_properties(dev).multi_processor_count,
                                            ranks_per_device())], device=dev)
        collectives.all_reduce_(sms, comm.group, dist.ReduceOp.MIN, backend=comm.backend)
        self.grid = int(sms.item())
        h, isz, tp, g = self.hidden, self.dtype.itemsize, self.tp, self.grid
        # rows per launch of the one-shot (C1), of the pipelined one-shot (CP) and per rank of the two-shot (S)
        self.oneshot_rows = max(1, min(comm.max_tokens, ONESHOT_BYTES // (2 * tp * h * isz)))
        self.twoshot_rows = shard_rows(comm.max_tokens, tp)
        # the pipelined one-shot's slots only where it can be chosen (they are the largest region)
        self.pipe_rows = (max(1, min(comm.max_tokens, PIPE_BYTES // (2 * tp * h * isz)))
                          if table_routes(comm, (PIPE,)) else 0)
        # pipelined one-shot: programs that push (the rest reduce). G/4 was fastest for bf16 output at >= 2048
        # tokens on the H200 pair; G/2 won some FP8-output and 1024-token cases by 5-10%
        # (bench/results/fused_ar_tp2_h200_pipe.json: 16/33/66/99/120 of 132 timed). Not yet per-size.
        want = comm.config.pipe_producers
        self.producers = max(1, g // 4) if want is None else max(1, min(want, g - 1))
        off = 0
        layout = {}
        shard = self.twoshot_rows
        for name, nbytes in (("flags", (3 * g * tp + PIPE_MAX_CHUNKS * tp * g) * 4),
                             ("pipe_slots", 2 * tp * self.pipe_rows * h * isz),
                             ("oneshot_slots", 2 * tp * self.oneshot_rows * h * isz),
                             ("twoshot_slots", tp * shard * h * isz), ("stage_out", shard * h * isz),
                             ("stage_residual", shard * h * isz), ("stage_scales", shard * _up(h // 4 + 4, 16))):
            layout[name] = (off, nbytes)
            off = _up(off + nbytes)
        self.nbytes = off
        self.buf = symm_mem.empty(off, dtype=torch.uint8, device=dev)
        self.hdl = symm_mem.rendezvous(self.buf, comm.group)
        ptrs = [int(p) for p in self.hdl.buffer_ptrs]
        me = ptrs[self.rank]
        self.deltas = torch.tensor([p - me for p in ptrs], dtype=torch.int64, device=dev)
        self._layout = layout
        self.flags = self.region("flags", torch.int32)
        self.oneshot_slots = self.region("oneshot_slots", self.dtype)
        self.pipe_slots = self.region("pipe_slots", self.dtype)
        self.twoshot_slots = self.region("twoshot_slots", self.dtype)
        self.stage_residual = self.region("stage_residual", self.dtype)
        self.flags.zero_()
        self.epochs = torch.zeros(3, g, dtype=torch.int32, device=dev)  # one-shot, two-shot, pipelined one-shot
        torch.cuda.synchronize(dev)
        collectives.barrier(comm.group, dev)  # every rank's flags are zero before any use

    # ------------------------------------------------------------------------------------------------------
    def close(self, collective: bool = True) -> None:  # frees local references only: no barrier either way
        self.buf = self.hdl = self.oneshot_slots = self.twoshot_slots = self.pipe_slots = self.stage_residual = None
        self.flags = None

    # ------------------------------------------------------------------------------------------------------
    def region(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Region ``name`` of the buffer (module table) as a flat tensor of ``dtype``."""
        off, nbytes = self._layout[name]
        return self.buf[off: off + nbytes].view(dtype)

    # the launchers live beside their kernels (tpfuse.kernels.fused_allreduce)
    def oneshot(self, x, residual, weight, eps, quant, gemma, norm=True):
        from ..kernels.fused_allreduce import launch_oneshot

        return launch_oneshot(self, x, residual, weight, eps, quant, gemma, norm)

    def oneshot_pipe(self, x, residual, weight, eps, quant, gemma, norm=True):
        from ..kernels.fused_allreduce import launch_oneshot_pipe

        return launch_oneshot_pipe(self, x, residual, weight, eps, quant, gemma, norm, max_chunks=PIPE_MAX_CHUNKS,
                                   min_chunk_rows=PIPE_MIN_CHUNK_ROWS)

    def twoshot(self, x, residual, weight, eps, quant, gemma, norm=True):
        from ..kernels.fused_allreduce import launch_twoshot

        return launch_twoshot(self, x, residual, weight, eps, quant, gemma, norm)


# ----------------------------------------------------------------------------------------------------------------
# construction and registration


def _symm_reason(comm) -> Optional[str]:
    if comm.device.type != "cuda":
        return f"needs CUDA tensors: an NCCL group, or one-GPU mode (this one is {comm.backend} on the CPU)"
    if comm.tp < 2:
        return "TP=1: nothing to reduce"
    if comm.hidden_size % 16:
        return f"hidden_size {comm.hidden_size} is not a multiple of 16"
    try:
        import triton  # noqa: F401
        import torch.distributed._symmetric_memory  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"Triton / torch symmetric memory not importable: {e}"
    return None


def allocate(comm) -> Optional[FusedAllReduceWorkspace]:
    """The workspace on NCCL groups where the kernels can run and the table (or ``CommConfig.force_paths``) can
    route a size <= max_tokens to them (collective over ``comm.group``: every rank decides alike from equal
    arguments), else None."""
    # the FlashInfer paths hand the calls FlashInfer cannot do (NVFP4, dynamic FP8, gemma, ...) to these kernels
    routed = ("tpfuse_oneshot", "tpfuse_twoshot", PIPE, "flashinfer_oneshot", "flashinfer_twoshot")
    if _symm_reason(comm) is not None or not table_routes(comm, routed):
        return None
    return FusedAllReduceWorkspace(comm)


register_workspace(NAME, allocate)


def _available(comm) -> Optional[str]:
    return _symm_reason(comm) or workspace_reason(
        comm, NAME, "no symmetric-memory workspace (the table routes no size <= max_tokens to these kernels, or closed)")


def _available_pipe(comm) -> Optional[str]:
    reason = _available(comm)
    if reason is None and not comm.workspaces[NAME].pipe_rows:
        return "no pipelined one-shot slots (the table routes no size <= max_tokens to this path)"
    if reason is None and comm.workspaces[NAME].grid < 2:
        return "needs at least 2 programs (one producer, one consumer)"
    return reason


@register("fused_add_rmsnorm", "tpfuse_oneshot", available=_available)
def _far_one(comm, x, residual, weight, eps, *, quant, gemma):
    return comm.workspaces[NAME].oneshot(x, residual, weight, eps, quant, gemma)


@register("fused_add_rmsnorm", "tpfuse_twoshot", available=_available)
def _far_two(comm, x, residual, weight, eps, *, quant, gemma):
    return comm.workspaces[NAME].twoshot(x, residual, weight, eps, quant, gemma)


@register("all_reduce", "tpfuse_oneshot", available=_available)
def _ar_one(comm, x):
    return comm.workspaces[NAME].oneshot(x, None, None, 0.0, None, False, norm=False)


@register("all_reduce", "tpfuse_twoshot", available=_available)
def _ar_two(comm, x):
    return comm.workspaces[NAME].twoshot(x, None, None, 0.0, None, False, norm=False)


@register("fused_add_rmsnorm", PIPE, available=_available_pipe)
def _far_pipe(comm, x, residual, weight, eps, *, quant, gemma):
    return comm.workspaces[NAME].oneshot_pipe(x, residual, weight, eps, quant, gemma)


@register("all_reduce", PIPE, available=_available_pipe)
def _ar_pipe(comm, x):
    return comm.workspaces[NAME].oneshot_pipe(x, None, None, 0.0, None, False, norm=False)
