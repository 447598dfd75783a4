"""Process-group setup used by the launchers, the demo and the tests.

``init_distributed()`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and picks NCCL when every local rank has its own GPU, gloo otherwise. The CUDA device is the
*local* rank (``LOCAL_RANK``), never the TP rank. Without a torchrun environment (``python script.py``, a
notebook) it starts a one-rank world on loopback: TP=1.

**One-GPU mode** (``init_distributed(one_gpu=True)``, or ``TPFUSE_ONE_GPU=1`` in the environment, which
``launch/run.sh --one-gpu`` sets): N ranks as N processes sharing the GPUs there are (rank ``LOCAL_RANK %
device_count``; on a one-GPU machine all on ``cuda:0``) over a gloo group, to try a TP = 2 / 4 / 8 setup on one
GPU. It sets ``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1`` (torch's symmetric memory then maps several ranks'
buffers on one device, pytorch#140127) and turns NVLink multicast off (``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NCCL_NVLS_ENABLE=0``, ``NVSHMEM_DISABLE_NVLS=1``). What changes, and what does not:

* tpfuse's own kernels (fused all-reduce, sequence-parallel exchange, async TP) run unchanged on CUDA tensors:
  the communicator's device is CUDA on such a gloo group (:func:`group_device`);
* what tpfuse routes to NCCL runs the same math on the gloo group, through host memory
  (:mod:`tpfuse.collectives`; NCCL refuses two ranks on one device); it cannot be captured in a CUDA graph;
* FlashInfer's paths are unavailable (they need an NCCL group), with that reason in ``comm.plan()``.

Without MPS the ranks' GPU contexts take turns on the device, so a collective costs milliseconds. Under an MPS
daemon (``nvidia-cuda-mps-control -d``) they run concurrently and a call costs a fraction of a millisecond; the
persistent kernels then run on half the SMs split among the ranks (:func:`ranks_per_device`) so that every rank's
programs are resident at once. Either way the mode proves correctness (every rank's kernels, flags, buffers, graphs
and faults), not speed, and nothing about NVLink ordering or bandwidth.

``exit_rank(code)`` ends a rank process that has finished its work (process group destroyed): it flushes stdio and
leaves with ``os._exit``, skipping interpreter finalization. Why: gloo's worker threads drop their reference to a
finished collective's work *after* ``wait()`` has returned, and that drop decrefs the Python tensors of the
call, which needs the GIL. If the main thread is already finalizing the interpreter by then, the worker's GIL
acquire ends the thread through a ``noexcept`` destructor and the process aborts with ``terminate called without
an active exception`` (exit -6), after all its work succeeded. ``destroy_process_group()`` does not prevent it
when anything still holds the default group: importing ``torch.distributed.fsdp`` after ``init_process_group``
does (transformers imports it), so the group's threads live until finalization. Seen with torch 2.13.0+cpu in
about 1 of 30 runs of the demo (core dump: ``ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork ->
decref_pyobject -> take_gil -> pthread_exit -> std::terminate``, main thread in ``Py_FinalizeEx``); the same
race is pytorch/pytorch#190489 and the abandoned atexit fix pytorch/pytorch#179291.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import NoReturn, Optional

import torch
import torch.distributed as dist


ONE_GPU_ENV = "TPFUSE_ONE_GPU"
"""Environment switch of one-GPU mode (``1``): what ``launch/run.sh --one-gpu`` sets, and what
:func:`init_distributed` sets for the process (and its children) when called with ``one_gpu=True``."""
ONE_GPU_PROCESSES_ENV = "TPFUSE_ONE_GPU_PROCESSES"
"""Escape hatch: the rank processes of *all* one-GPU jobs sharing one GPU at once (:func:`ranks_per_device`)."""
_ONE_GPU_TORCH_ENV = {"TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                      "NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1"}


def one_gpu_mode() -> bool:
    """Whether this process runs in one-GPU mode (module docstring)."""
    return os.environ.get(ONE_GPU_ENV, "") == "1"


def ranks_per_device() -> int:
    """How many of this host's rank processes share one GPU: ``ceil(LOCAL_WORLD_SIZE / device_count)`` in one-GPU
    mode, else 1. tpfuse's persistent kernels (one program per SM, spinning on their peers' flags) size their grid by
    it (:func:`tpfuse.backends.fused_allreduce.persistent_grid`): when the ranks' kernels run *concurrently* (an MPS
    daemon), every rank's programs must be resident at once, or a program spins on a peer that has no SM left until
    ``timeout_s``. Host-local (no collective); the workspace takes the minimum over the group.

    Escape hatch ``TPFUSE_ONE_GPU_PROCESSES=<n>``: when several one-GPU jobs share the GPU at once (two test runs,
    two torchrun jobs), each job only knows its own ranks; set it to the processes of all of them on one GPU, and
    every job's kernels size their grid for that many (never for fewer than its own)."""
    if not one_gpu_mode() or not torch.cuda.is_available():
        return 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    mine = max(1, -(-local // torch.cuda.device_count()))
    shared = os.environ.get(ONE_GPU_PROCESSES_ENV)
    if shared:  # several jobs on one GPU at once: each sizes its grid for all their processes
        return max(mine, _positive_int(ONE_GPU_PROCESSES_ENV, shared))
    return mine


def _positive_int(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name}={value!r}: expected a positive number of processes")
    return n


def default_backend(local_world_size: Optional[int] = None) -> str:
    """``"nccl"`` when CUDA has at least ``local_world_size`` devices, else ``"gloo"`` (one-GPU mode: gloo)."""
    if one_gpu_mode():
        return "gloo"
    n = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "gloo"


def group_device(backend: str) -> torch.device:
    """Where a process group's tensors live in this process: the current CUDA device for NCCL, and for gloo in
    one-GPU mode; the CPU for gloo otherwise."""
    if backend == "nccl" or (backend == "gloo" and one_gpu_mode() and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def enable_one_gpu_mode() -> None:
    """Switch this process (and the ones it starts) to one-GPU mode before any process group or symmetric memory
    exists; bind it to GPU ``LOCAL_RANK % device_count``. Raises :class:`~tpfuse.errors.TPFuseError` without CUDA."""
    from .errors import TPFuseError

    if not torch.cuda.is_available():
        raise TPFuseError("one-GPU mode (TPFUSE_ONE_GPU=1 / init_distributed(one_gpu=True)) needs a CUDA GPU; "
                          "on a CPU-only machine run the ranks over gloo without it")
    os.environ[ONE_GPU_ENV] = "1"
    os.environ.update(_ONE_GPU_TORCH_ENV)  # read by torch's symmetric-memory rendezvous, NCCL and NVSHMEM
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def init_distributed(backend: Optional[str] = None, timeout_s: float = 120.0, *,
                     one_gpu: Optional[bool] = None) -> str:
    """Initialise the default process group (idempotent) and return its backend.

    Under torchrun (or ``launch/run.sh``) from its environment; without one, a one-rank world on loopback (TP=1:
    ``python script.py``, notebooks). ``one_gpu``: one-GPU mode (module docstring); ``None`` reads
    ``TPFUSE_ONE_GPU``. ``backend`` defaults to NCCL when every local rank has its own GPU, else gloo."""
    from .errors import TPFuseError

    if dist.is_initialized():
        return dist.get_backend()
    one_gpu = one_gpu_mode() if one_gpu is None else one_gpu
    if one_gpu:
        if backend not in (None, "gloo"):
            raise TPFuseError(f"one-GPU mode runs its ranks over gloo (NCCL refuses two ranks on one GPU), got "
                              f"backend={backend!r}")
        enable_one_gpu_mode()
        backend = "gloo"
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TPFuseError(f"init_distributed found a partial torchrun environment (missing {missing}). Start with "
                          f"`torchrun --nproc_per_node=N ...` or launch/run.sh, or set none of RANK / WORLD_SIZE for "
                          f"a one-rank run")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return backend


def free_port() -> int:
    """A TCP port on loopback that is free right now (for spawning local ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_rank(code: int) -> NoReturn:
    """End this rank process now with exit status ``code``: flush stdout/stderr, then ``os._exit`` (no atexit
    handlers, no interpreter finalization; see the module docstring for the gloo race this avoids). For process
    entry points only (a spawned rank, a ``torchrun`` script's end), after ``destroy_process_group()``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None under pythonw / a detached process
                stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not turn a result into a traceback
            pass
    os._exit(code)
