"""Process-group setup used by the launchers, the demo and the tests.

``init_distributed()`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and picks NCCL when every local rank has its own GPU, gloo otherwise. The CUDA device is the
*local* rank (``LOCAL_RANK``), never the TP rank.

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


def default_backend(local_world_size: Optional[int] = None) -> str:
    """``"nccl"`` when CUDA has at least ``local_world_size`` devices, else ``"gloo"``."""
    n = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "gloo"


def init_distributed(backend: Optional[str] = None, timeout_s: float = 120.0) -> str:
    """Initialise the default process group from the torchrun environment (idempotent). Returns the backend."""
    if dist.is_initialized():
        return dist.get_backend()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed needs the torchrun environment; missing {missing}. Start with "
                           f"`torchrun --nproc_per_node=N ...` or launch/run.sh")
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
