"""Process-group setup used by the launchers, the demo and the tests.

``init_distributed()`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and picks NCCL when every local rank has its own GPU, gloo otherwise. The CUDA device is the
*local* rank (``LOCAL_RANK``), never the TP rank.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

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
