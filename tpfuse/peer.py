"""Peer faults: the process groups a communicator's collectives run on, and how a failed peer becomes a tpfuse error.

Why a group of its own: ``CommConfig.timeout_s`` must bound every wait for a peer, but the user's group has its own
timeout (120 s from :func:`tpfuse.init_distributed`, 30 min by torch's default), which is also what its other
collectives need. So each communicator runs its collectives on a process group of the same ranks created with
``timeout=timeout_s`` (:func:`groups_for`); what a timeout does there, per backend:

* **gloo**: the waiting collective raises after ``timeout_s`` (gloo's own per-operation timeout) and gloo closes
  the connection, so a peer that arrives later fails at once ("Connection closed by peer") instead of pairing with
  the abandoned call. A peer that died closes its sockets: the others fail within milliseconds.
* **NCCL**: a collective cannot be cancelled from the host. The group is created with
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (unless the user set that variable): the ProcessGroupNCCL watchdog aborts
  the group's NCCL communicator once a collective is ``timeout_s`` late (the kernels then exit, so a stream sync
  returns), and the next collective on the group raises, which the communicator turns into
  :class:`~tpfuse.errors.TPFusePeerTimeout`. With the variable set by the user to 3 (torch's default) or 1, the
  watchdog ends the process instead. The debug exchange runs on a gloo group of the same ranks (bounded like
  above). Not yet run on GPUs.

Groups are cached per (ranks, backend, timeout, debug) and shared by the communicators of one TP group: creating one
per communicator would leave its sockets and threads behind (a group cannot be destroyed and re-created with
local synchronisation: torch re-derives the same name and store prefix, and the new group reads the old one's
addresses). After a peer fault the cached group is marked broken; the next construction on any rank of the group
makes every rank create a fresh one (agreed with one all-reduce on the user's group at construction).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .errors import TPFuseError, TPFusePeerError, TPFusePeerTimeout

_NCCL_ERRORS_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
# what torch.distributed's gloo / NCCL / store errors say when a peer is gone or late (gloo raises plain
# RuntimeErrors): anything else (a shape error inside a local torch op, ...) is not a peer fault and passes through
# words of the collectives' own failures; a bare "peer" or "NCCL" is left out on purpose: a local error such as
# "CUDA error: peer access is not supported" must not break the communicator (NCCL's failures arrive as
# torch.distributed.DistError, checked first)
_PEER_MARKERS = ("gloo", "Gloo", "ProcessGroup", "Connection closed", "Connection reset", "Broken pipe", "Socket",
                 "socket", "aborted", "Aborted", "timed out", "Timed out")
_TIMEOUT_MARKERS = ("timed out", "timeout", "watchdog")


class Groups:
    """The process group a communicator's collectives use (``pg``) and the one of its debug exchange
    (``debug_pg``: ``pg`` itself on gloo, a gloo group of the same ranks on NCCL, ``None`` without debug)."""

    def __init__(self, pg, debug_pg):
        self.pg, self.debug_pg = pg, debug_pg
        self.broken: Optional[str] = None


_CACHE: Dict[Tuple, Groups] = {}


def _new_group(ranks, backend: str, timeout_s: float):
    set_env = backend == "nccl" and _NCCL_ERRORS_ENV not in os.environ
    if set_env:  # read by ProcessGroupNCCL's constructor: applies to this group only
        os.environ[_NCCL_ERRORS_ENV] = "2"  # CleanUpOnly: abort the communicator and raise, don't end the process
    try:
        return dist.new_group(list(ranks), timeout=timedelta(seconds=float(timeout_s)), backend=backend,
                              use_local_synchronization=True)
    finally:
        if set_env:
            del os.environ[_NCCL_ERRORS_ENV]


def groups_for(parent, backend: str, tp: int, timeout_s: float, debug: bool, device: torch.device) -> Groups:
    """The (cached) groups of a communicator on ``parent`` (collective over ``parent``; see the module docstring)."""
    if tp == 1:
        return Groups(parent, parent if debug else None)
    ranks = tuple(dist.get_process_group_ranks(parent))
    key = (ranks, backend, float(timeout_s), bool(debug) and backend != "gloo")
    cur = _CACHE.get(key)
    need = torch.tensor([0 if cur is not None and cur.broken is None else 1], dtype=torch.int32,
                        device=device if backend == "nccl" else "cpu")  # gloo moves host tensors
    dist.all_reduce(need, op=dist.ReduceOp.MAX, group=parent)  # one rank's broken group: every rank gets a fresh one
    if int(need.item()):
        pg = _new_group(ranks, backend, timeout_s)
        dbg = pg if backend == "gloo" else (_new_group(ranks, "gloo", timeout_s) if debug else None)
        cur = _CACHE[key] = Groups(pg, dbg)
    return cur


def translate(exc: BaseException, *, op: str, call: int, rank: int, tp: int, backend: str,
              timeout_s: float) -> Optional[TPFuseError]:
    """The tpfuse error for a torch.distributed failure caused by a peer, or ``None`` when ``exc`` is something
    else (a tpfuse error already, or an error of a local torch op)."""
    if isinstance(exc, TPFuseError) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if not (isinstance(exc, getattr(dist, "DistError", ())) or any(m in text for m in _PEER_MARKERS)):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    low = text.lower()
    late = any(m in low for m in _TIMEOUT_MARKERS)
    what = (f"a peer did not arrive within {timeout_s:g} s (CommConfig.timeout_s)" if late else
            "a peer closed its connection")
    msg = (f"{op} (call #{call} of this communicator) on rank {rank} of TP={tp}: {what}: a peer died, hangs, "
           f"skipped or reordered a call, closed its communicator early, or rejected its own input. This "
           f"communicator is broken: every later call raises at once. Next: look at the other ranks' errors (the "
           f"first one is the cause), build a new TPCommunicator on every rank (re-initialise the process group "
           f"first if a peer died); CommConfig(debug=True) names the call where the ranks diverge. "
           f"[{backend}: {first[:300]}]")
    return (TPFusePeerTimeout if late else TPFusePeerError)(msg)
