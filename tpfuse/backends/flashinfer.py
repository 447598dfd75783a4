"""``flashinfer_oneshot`` / ``flashinfer_twoshot``: FlashInfer's trtllm fused all-reduce (+ residual add + RMSNorm
[+ FP8-static quant]) kernel as tpfuse paths of ``fused_add_rmsnorm`` and ``all_reduce``.

FlashInfer is optional. This module never imports it at import time: ``import tpfuse`` and every gloo/CPU plan
work without it (availability first asks ``importlib.util.find_spec``; the import happens only on NCCL groups whose
table or ``force_paths`` can route here). API used, FlashInfer 0.6 (as ``bench/bench_fused_ar.py`` used it before this
backend existed): ``trtllm_create_ipc_workspace_for_all_reduce_fusion`` (the trtllm CUDA-IPC workspace) and
``trtllm_allreduce_fusion`` with ``use_oneshot`` always given. Never the unified ``allreduce_fusion`` /
``create_allreduce_fusion_workspace(backend="auto")``: "auto" may pick the multicast (MNNVL) backend, which tpfuse must
never need.

Workspace (one per communicator; :func:`allocate` at construction, collective over ``comm.group``; released by
``close()``, which is then collective too - it frees CUDA-IPC buffers behind barriers). Per rank, each rounded up
to 2 MiB and IPC-shared with every peer (``R`` rows, ``H`` hidden, 2-byte elements):

====================  ==========================  =============================================================
buffer                bytes                       use
====================  ==========================  =============================================================
two-shot buffer       ``TP * R * H * 2``          reduce-scatter slots + the reduced rows gathered back
barrier flags         ``TP * 256 * 4``            two-shot barriers (FlashInfer's ``BarrierFlagCount``)
Lamport buffers       ``3 * TP * R * H * 2``      one-shot triple buffer (-0.0 marks "not yet written")
state                 20 (plain device memory)    Lamport buffer index / clear size
====================  ==========================  =============================================================

``R`` = ``max_tokens`` when ``CommConfig.force_paths`` names a FlashInfer path or ``all_workspaces`` is set, else the
largest token count the thresholds row routes to a FlashInfer path (as vLLM sizes it: ``max_size // (H * itemsize)``);
always capped so that ``TP * R * H * 2 <= MAX_COMM_BYTES`` (above it FlashInfer silently turns a one-shot call into a
two-shot one, which would make ``last_path`` lie). Building it JIT-compiles FlashInfer's comm module the first time on
a machine (~100 s), at construction, before any IPC buffer exists (so a failed build leaves no rank in a collective).

What one call does (every decision depends only on arguments the communicator contract makes equal on all ranks:
``T``, the quant kind, ``gemma``, the weight dtype, whether a residual is given):

========================================  =====================================================================
call                                      runs
========================================  =====================================================================
quant None                                FlashInfer ``kARResidualRMSNorm``: out (input dtype), residual_out
``FP8Static(scale)``                      FlashInfer ``kARResidualRMSNormFP8Quant``: e4m3 out, residual_out
residual None                             the same with a zero residual (as vLLM does for the first layer)
``all_reduce``                            FlashInfer ``kAllReduce``
FP8PerToken / FP8PerGroup                 fallback: FlashInfer 0.6 has no fused dynamic FP8
NVFP4                                     fallback: FlashInfer's fused NVFP4 runs on sm100+ only (zeros on sm90);
                                          not enabled here because no sm100 machine has tested it
``gemma=True``                            fallback: FlashInfer multiplies by ``weight``, not ``weight + 1``
weight dtype != activation dtype          fallback: FlashInfer reads the weight in the activation dtype
``T == 0``, ``T > R``                     fallback
two-shot with ``T <= TP``                 fallback: FlashInfer's two-shot needs more tokens than ranks
========================================  =====================================================================

Fallback: the path declines the call (:class:`~tpfuse.backends.base.Decline`) and the communicator runs tpfuse's own
kernel of the same shot count (``tpfuse_oneshot`` / ``tpfuse_twoshot``, registered as ``declines_to``; the
communicator allocates their symmetric workspace whenever the table or ``force_paths`` can route to FlashInfer), else
``nccl``, else ``reference``, skipping paths not in ``CommConfig.allowed_paths``. ``comm.last_path[op]`` names the path
that ran and ``comm.last_fallback[op]`` says why; ``plan(T)`` still names the FlashInfer path.

Math: FlashInfer sums the ranks in fp32 (``fp32_acc=True``) but rounds that sum to the input dtype before adding the
residual, and rounds the normalised value to the input dtype before quantizing - a rounding or two more than tpfuse's
fp32-throughout contract, inside :mod:`tpfuse.tolerance`'s budgets (the GPU tests check it against the fp64 oracle).
Inputs whose pointers are not 16-byte aligned are copied locally (pointers may differ between ranks; the path may
not).

Streams and graphs: launched on the current stream, no host sync, Lamport / barrier state on the device: CUDA-graph
capturable. All ranks must issue the same calls in the same order on one stream. FlashInfer's kernels have no
timeout: a peer that skips a call hangs the others (tpfuse's own kernels raise ``TPFusePeerTimeout``) - a known gap,
as for the async-TP paths.

Availability reasons (:func:`static_reason`, in this order): flashinfer not installed; not an NCCL group; TP=1 or a
TP FlashInfer was not built for; not sm90+; dtype not bf16/fp16; hidden size the kernel cannot launch; flashinfer not
importable; then (:func:`_available`) no workspace, or why building it failed (a rank's GPU without peer access to
another's, ranks on several hosts, the JIT build failing).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import socket
from typing import Optional

import torch

from ..dispatch import register, table_routes
from .base import Decline, register_workspace, workspace

ONESHOT, TWOSHOT = "flashinfer_oneshot", "flashinfer_twoshot"
NAME = "flashinfer"
"""This backend's key in ``TPCommunicator.workspaces``."""
PATHS = (ONESHOT, TWOSHOT)
TP_SIZES = (2, 4, 8, 16)                           # FlashInfer's kernel instantiations (NRanks)
DTYPES = (torch.bfloat16, torch.float16)          # fp32 would need its fp32 Lamport workspace: not wired
MAX_COMM_BYTES = 2147483647 & ~((1 << 21) - 1)     # flashinfer.comm.trtllm_ar.MAX_COMM_SIZE (0.6)
ACCESS_BYTES = 16                                  # one 16-byte vector per thread and access
_ALIGN = 16


# ----------------------------------------------------------------------------------------------------------------
# availability


def _installed_reason() -> Optional[str]:
    """Cheap check that never imports FlashInfer."""
    try:
        found = importlib.util.find_spec("flashinfer") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else 'flashinfer not importable: not installed (pip install "tpfuse[flashinfer]")'


_IMPORT: dict = {}


def _import_reason() -> Optional[str]:
    """``None`` if ``flashinfer.comm`` imports (imports it; cached per process), else why."""
    if "reason" not in _IMPORT:
        try:
            import flashinfer.comm  # noqa: F401
            _IMPORT["reason"] = None
        except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
            _IMPORT["reason"] = f"flashinfer not importable: {type(e).__name__}: {e}"
    return _IMPORT["reason"]


def _capability(device) -> tuple:
    return torch.cuda.get_device_capability(device)


def hidden_reason(hidden: int, itemsize: int) -> Optional[str]:
    """``None`` if FlashInfer 0.6's launcher makes valid blocks for ``hidden`` on sm90+, else why.

    Mirrors ``allreduce_fusion_kernel_launcher``: one thread per 16-byte vector of a token, a thread-block cluster of
    up to 8 blocks per token (a power of two dividing the threads), blocks doubled up to >= 128 threads while the
    cluster allows. Its RMSNorm block reduction shuffles whole warps, so a block must be a multiple of 32 threads (and
    at most 1024)."""
    vec = ACCESS_BYTES // itemsize
    if hidden % vec:
        return f"hidden {hidden} unsupported by FlashInfer's kernel (needs a multiple of {vec}: 16-byte vectors)"
    threads = hidden // vec
    cluster = 8
    while threads % cluster and cluster > 1:
        cluster //= 2
    block = threads // cluster
    while block < 128 and cluster >= 2:
        block, cluster = block * 2, cluster // 2
    if block > 1024 or block % 32:
        return (f"hidden {hidden} unsupported by FlashInfer's kernel (it would launch {block}-thread blocks; its "
                f"block reduction needs a multiple of 32, at most 1024)")
    return None


def _contract_reason(comm) -> Optional[str]:
    """The checks that depend only on what every rank shares by contract (group, dtype, hidden)."""
    if comm.backend != "nccl":
        return f"needs an NCCL group (FlashInfer's CUDA-IPC workspace; this one is {comm.backend})"
    if comm.tp < 2:
        return "TP=1: nothing to reduce"
    if comm.tp not in TP_SIZES:
        return f"TP={comm.tp} unsupported: FlashInfer's kernel is built for TP {', '.join(map(str, TP_SIZES))}"
    return None


def _shape_reason(comm) -> Optional[str]:
    if comm.dtype not in DTYPES:
        return f"dtype {str(comm.dtype).replace('torch.', '')} unsupported (FlashInfer's fused path: bf16/fp16 only)"
    return hidden_reason(comm.hidden_size, comm.dtype.itemsize)


def static_reason(comm) -> Optional[str]:
    """Why FlashInfer's paths can never run on ``comm`` (``None``: they can, given a workspace). Imports FlashInfer
    only after every cheaper check passed (so never on gloo / CPU)."""
    reason = _installed_reason() or _contract_reason(comm)
    if reason:
        return reason
    major, minor = _capability(comm.device)
    if major < 9:
        return f"needs sm90+ (Hopper or newer) for FlashInfer's cluster launch; this device is sm{major}{minor}"
    return _shape_reason(comm) or _import_reason()


def _available(comm) -> Optional[str]:
    reason = static_reason(comm)
    if reason:
        return reason
    ws = workspace(comm, NAME)
    if ws is None:
        return ("no FlashInfer workspace (the table routes no size <= max_tokens to FlashInfer and force_paths names "
                "none, allowed_paths excludes it, or closed)")
    return ws.reason


def call_reason(rows: int, tp: int, t: int, oneshot: bool, *, norm: bool = True, quant=None, gemma: bool = False,
                weight_dtype=None, dtype=None) -> Optional[str]:
    """``None`` if FlashInfer runs this call, else why it goes to the fallback (see the module docstring's table)."""
    from .. import quant as q

    if t == 0:
        return "no tokens"
    if t > rows:
        return f"{t} tokens exceed the FlashInfer workspace's {rows} rows"
    if not oneshot and t <= tp:
        return f"FlashInfer's two-shot needs more tokens than ranks ({t} <= TP={tp})"
    if not norm:
        return None
    if quant is not None and not isinstance(quant, q.FP8Static):
        what = ("fused NVFP4 runs on sm100+ only and is not enabled (untested here)" if isinstance(quant, q.NVFP4)
                else "FlashInfer 0.6 has no fused dynamic FP8")
        return f"{type(quant).__name__} output: {what}"
    if gemma:
        return "gemma=True: FlashInfer's RMSNorm multiplies by weight, not weight + 1"
    if weight_dtype != dtype:
        return (f"norm weight {str(weight_dtype).replace('torch.', '')} with {str(dtype).replace('torch.', '')} "
                f"activations: FlashInfer reads the weight in the activation dtype")
    return None


# ----------------------------------------------------------------------------------------------------------------
# workspace


def rows_needed(comm) -> int:
    """``R``: workspace rows (module docstring). 0 when no size <= max_tokens can reach FlashInfer."""
    row_bytes = comm.hidden_size * comm.dtype.itemsize
    cap = max(0, min(comm.max_tokens, MAX_COMM_BYTES // (comm.tp * row_bytes)))
    forced = any(p in PATHS for p in dict(comm.config.force_paths).values())
    if getattr(comm.config, "all_workspaces", False) or forced:
        return cap
    rows = 0
    for buckets in comm.row.paths.values():
        for max_bytes, path in buckets:
            if path in PATHS:
                if max_bytes is None:
                    return cap
                rows = max(rows, max_bytes // row_bytes)
    return min(cap, rows)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % _ALIGN == 0 else t.clone()  # a fresh allocation is aligned


class FlashInferWorkspace:
    """FlashInfer's trtllm IPC workspace of one communicator (``comm.workspaces["flashinfer"]``). ``reason`` is
    ``None`` when it is usable, else why building it was given up (identical on every rank)."""

    broken: Optional[str] = None
    """Always ``None``: FlashInfer's kernels have no timeout, so nothing here detects a dead peer."""

    def check(self) -> None:
        """Nothing to check (see :attr:`broken`)."""

    def __init__(self, comm, rows: int):
        import torch.distributed as dist

        self.tp, self.rank, self.hidden, self.dtype = comm.tp, comm.rank, comm.hidden_size, comm.dtype
        self.rows, self.group, self.device = rows, comm.group, comm.device
        self.ipc = self.ptrs = self.fc = None
        self.reason: Optional[str] = None
        self.setup_log = ""
        # every rank states what it sees before any IPC buffer exists, so all ranks give up together
        mine = self._local_reason()
        info = (socket.gethostname(), _device_uuid(self.device), mine)
        every: list = [None] * self.tp
        dist.all_gather_object(every, info, group=self.group)
        problems = [f"rank {r}: {e[2]}" for r, e in enumerate(every) if e[2]]
        if not problems:
            problems = self._peer_problems(every)
        if problems:
            self.reason = "FlashInfer workspace not built: " + "; ".join(problems)
            return
        import flashinfer.comm as fc

        self.fc = fc
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # it prints every IPC pointer; keep the log, not the noise
            self.ipc, self.ptrs = fc.trtllm_create_ipc_workspace_for_all_reduce_fusion(
                self.rank, self.tp, rows, self.hidden, group=self.group)
        self.setup_log = out.getvalue()
        self._state_ptr = int(self.ptrs[-1].item())  # FlashInfer's 20-byte state buffer (its destroy leaks it)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group, device_ids=[self.device.index])  # every rank's Lamport buffers initialised

    def _local_reason(self) -> Optional[str]:
        major, minor = _capability(self.device)
        if major < 9:
            return f"needs sm90+ (this device is sm{major}{minor})"
        reason = _installed_reason() or _import_reason()
        if reason:
            return reason
        try:  # JIT-build (or load) the comm module now, locally, so a failure cannot strand a peer in a collective
            from flashinfer.comm.trtllm_ar import get_trtllm_comm_module

            get_trtllm_comm_module()
        except Exception as e:  # noqa: BLE001
            return f"FlashInfer's comm module did not build/load: {type(e).__name__}: {str(e)[:300]}"
        return None

    def _peer_problems(self, every) -> list:
        hosts = {e[0] for e in every}
        if len(hosts) > 1:
            return [f"ranks span hosts {sorted(hosts)}: FlashInfer's CUDA-IPC workspace needs one node"]
        visible = {_device_uuid(torch.device("cuda", i)): i for i in range(torch.cuda.device_count())}
        out = []
        for r, (_, uuid, _) in enumerate(every):
            if r == self.rank:
                continue
            peer = visible.get(uuid)
            if peer is None:
                out.append(f"rank {r}'s GPU is not visible to rank {self.rank} (CUDA_VISIBLE_DEVICES isolation)")
            elif not torch.cuda.can_device_access_peer(self.device.index, peer):
                out.append(f"rank {self.rank}'s GPU has no peer access to rank {r}'s")
        return out

    def close(self, collective: bool = True) -> None:
        """Free the IPC buffers (collective: barriers on ``group``). Idempotent. ``collective=False`` (a peer timed
        out, it may be dead): no barrier and no sync; the IPC buffers are left to process exit, since freeing
        memory a live peer may still read is worse than leaking it."""
        if self.ipc is None:
            return
        if not collective:
            self.ipc = self.ptrs = None
            self.reason = "closed (after a peer timeout: buffers not freed)"
            return
        import ctypes

        import torch.distributed as dist
        from flashinfer.comm.cuda_ipc import cudart

        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group, device_ids=[self.device.index])  # no peer still reads our buffers
        with contextlib.redirect_stdout(io.StringIO()):
            self.fc.trtllm_destroy_ipc_workspace_for_all_reduce_fusion(self.ipc, group=self.group)
        cudart.cudaFree(ctypes.c_void_p(self._state_ptr))
        self.ipc = self.ptrs = None
        self.reason = "closed"

    # ------------------------------------------------------------------------------------------------------------
    def _launch(self, x, pattern, oneshot, **kw) -> None:
        t, h = x.shape
        args = dict(allreduce_out=None, residual_in=None, residual_out=None, norm_out=None, quant_out=None,
                    scale_out=None, rms_gamma=None, rms_eps=None, scale_factor=None, layout_code=None)
        args.update(kw)
        self.fc.trtllm_allreduce_fusion(
            allreduce_in=x, world_size=self.tp, world_rank=self.rank, token_num=t, hidden_dim=h,
            workspace_ptrs=self.ptrs, launch_with_pdl=False, trigger_completion_at_end=True, fp32_acc=True,
            pattern_code=pattern, use_oneshot=bool(oneshot), **args)

    def fused(self, x, residual, weight, eps, quant, oneshot):
        from .. import ops
        from .. import quant as q

        t, h = x.shape
        x, w = _aligned(x), _aligned(weight)
        res = torch.zeros_like(x) if residual is None else _aligned(residual)
        res_out = torch.empty_like(x)
        pat = self.fc.AllReduceFusionPattern
        if quant is None:
            out = torch.empty_like(x)
            self._launch(x, pat.kARResidualRMSNorm, oneshot, residual_in=res, residual_out=res_out, norm_out=out,
                         rms_gamma=w, rms_eps=float(eps))
        else:  # FP8Static (call_reason lets nothing else through)
            out = torch.empty(t, h, dtype=q.FP8_DTYPE, device=x.device)
            self._launch(x, pat.kARResidualRMSNormFP8Quant, oneshot, residual_in=res, residual_out=res_out,
                         quant_out=out, rms_gamma=w, rms_eps=float(eps), scale_factor=quant.scale)
        return ops._wrap(out, None, quant, x, (t, h)), res_out

    def all_reduce(self, x, oneshot):
        x = _aligned(x)
        out = torch.empty_like(x)
        self._launch(x, self.fc.AllReduceFusionPattern.kAllReduce, oneshot, allreduce_out=out)
        return out


def _device_uuid(device) -> str:
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else f"{getattr(props, 'pci_bus_id', '?')}/{device}"


def allocate(comm) -> Optional[FlashInferWorkspace]:
    """The workspace where FlashInfer can be routed to (collective over ``comm.group`` whenever the shared checks
    pass: every rank decides alike from equal arguments, then the ranks agree on the local ones), else ``None``."""
    allowed = comm.config.allowed_paths
    if allowed is not None and not set(PATHS) & set(allowed):
        return None
    if _contract_reason(comm) or _shape_reason(comm) or not table_routes(comm, PATHS):
        return None
    rows = rows_needed(comm)
    if rows < 1:
        return None
    return FlashInferWorkspace(comm, rows)


register_workspace(NAME, allocate)


# ----------------------------------------------------------------------------------------------------------------
# the paths


def _fused(comm, x, residual, weight, eps, quant, gemma, oneshot):
    ws = comm.workspaces[NAME]
    why = call_reason(ws.rows, ws.tp, x.shape[0], oneshot, quant=quant, gemma=gemma, weight_dtype=weight.dtype,
                      dtype=x.dtype)
    if why:
        raise Decline(why)
    return ws.fused(x, residual, weight, eps, quant, oneshot)


def _all_reduce(comm, x, oneshot):
    ws = comm.workspaces[NAME]
    why = call_reason(ws.rows, ws.tp, x.shape[0], oneshot, norm=False)
    if why:
        raise Decline(why)
    return ws.all_reduce(x, oneshot)


@register("fused_add_rmsnorm", ONESHOT, available=_available, declines_to=("tpfuse_oneshot",))
def _far_one(comm, x, residual, weight, eps, *, quant, gemma):
    return _fused(comm, x, residual, weight, eps, quant, gemma, True)


@register("fused_add_rmsnorm", TWOSHOT, available=_available, declines_to=("tpfuse_twoshot",))
def _far_two(comm, x, residual, weight, eps, *, quant, gemma):
    return _fused(comm, x, residual, weight, eps, quant, gemma, False)


@register("all_reduce", ONESHOT, available=_available, declines_to=("tpfuse_oneshot",))
def _ar_one(comm, x):
    return _all_reduce(comm, x, True)


@register("all_reduce", TWOSHOT, available=_available, declines_to=("tpfuse_twoshot",))
def _ar_two(comm, x):
    return _all_reduce(comm, x, False)
