"""The one shape every backend's workspace has, and how a path implementation hands a call on.

Contract
========
* **Workspaces.** A backend that needs device state (symmetric buffers, IPC handles, semaphores) registers one
  allocator with :func:`register_workspace`. At construction the communicator calls every allocator in registration
  order and keeps what they return in ``TPCommunicator.workspaces`` (name -> :class:`Workspace`); ``None`` means
  "not needed here" (another group kind, or the table never routes a size <= ``max_tokens`` to this backend).
  Allocators are collective over ``comm.group``: every rank decides alike from equal arguments, so every rank
  allocates the same workspaces in the same order.
* **Checks.** ``check()`` runs before every op and must cost well under a microsecond (read pinned host memory, no
  sync). It raises :class:`~tpfuse.errors.TPFusePeerTimeout` once a kernel of the workspace gave up waiting for a
  peer; ``broken`` then holds the reason and stays set.
* **Close.** ``close(collective)`` frees the workspace, in reverse registration order. ``collective`` is ``False``
  once any workspace of the communicator is broken (a peer may be dead): then nothing may wait for peers.
* **Declining a call.** A path implementation that cannot run one particular call (an output form its library
  cannot produce, more tokens than its buffer) raises :class:`Decline` before launching anything; the communicator
  runs the op's next candidate path (``OpChoice.on_decline``), records the path that ran in ``last_path`` and the
  reason in ``last_fallback``. Declining is decided from arguments that match across ranks, so every rank declines
  alike.
"""

from __future__ import annotations

import ctypes
from typing import Callable, List, Optional, Protocol, Tuple, runtime_checkable

import torch

from ..errors import TPFusePeerTimeout


@runtime_checkable
class Workspace(Protocol):
    """Device state of one backend on one communicator."""

    broken: Optional[str]
    """Why the workspace can no longer be used (a peer timed out), ``None`` while it is healthy."""

    def check(self) -> None:
        """Raise :class:`~tpfuse.errors.TPFusePeerTimeout` if a kernel of this workspace timed out. No sync."""

    def close(self, collective: bool) -> None:
        """Free the device state. ``collective``: peers are alive, barriers are allowed."""


class Decline(Exception):
    """Raised by a path implementation, before it launches anything, for a call it cannot run (``reason`` says
    why); the communicator runs the op's next candidate path."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


Allocator = Callable[[object], Optional[Workspace]]
_ALLOCATORS: List[Tuple[str, Allocator]] = []


def register_workspace(name: str, allocate: Allocator) -> None:
    """Register ``allocate(comm) -> Workspace | None`` under ``name`` (the key in ``TPCommunicator.workspaces``)."""
    if any(n == name for n, _ in _ALLOCATORS):
        raise ValueError(f"workspace {name!r} is registered twice")
    _ALLOCATORS.append((name, allocate))


def allocators() -> Tuple[Tuple[str, Allocator], ...]:
    """``(name, allocate)`` in registration order (the order workspaces are built in)."""
    return tuple(_ALLOCATORS)


def workspace(comm, name: str):
    """``comm``'s workspace ``name``, or ``None`` (not allocated, or the communicator is closed)."""
    return getattr(comm, "workspaces", {}).get(name)


def workspace_reason(comm, name: str, missing: str) -> Optional[str]:
    """The usual availability answer of a path that runs on workspace ``name``: ``None`` if it is there and healthy,
    else ``missing`` (why it would not have been allocated) or that a peer timeout broke it."""
    ws = workspace(comm, name)
    if ws is None:
        return missing
    if ws.broken:
        return "workspace broken by a peer timeout"
    return None


class PeerTimeoutFlag:
    """The pinned host word a kernel sets when a peer does not arrive within ``CommConfig.timeout_s``, and the
    ``check`` / ``broken`` half of :class:`Workspace` built on it. ``where`` names the kernels in the error message."""

    def __init__(self, comm, where: str):
        self.rank, self.tp, self.timeout_s, self.where = comm.rank, comm.tp, float(comm.config.timeout_s), where
        self.err = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        # check() runs on every op: read the word in place (int(self.err[0]) builds a tensor: ~3 us)
        self._err_word = ctypes.c_int32.from_address(self.err.data_ptr())
        self.broken: Optional[str] = None

    def check(self) -> None:
        if self.broken is None and self._err_word.value != 0:
            self.broken = (f"peer did not arrive within {self.timeout_s:g} s (CommConfig.timeout_s) in a tpfuse "
                           f"{self.where} on rank {self.rank} of TP={self.tp}: a peer died, skipped a call or called "
                           f"with different arguments; this communicator is broken, build a new one (after "
                           f"re-initialising the process group if a peer died)")
        if self.broken is not None:
            raise TPFusePeerTimeout(self.broken)
