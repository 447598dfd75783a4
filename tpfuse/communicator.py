"""``TPCommunicator``: one per tensor-parallel process group; picks the fastest correct path per call.

Contract
========
* **Collective calls.** Every op is collective over ``group``: all ranks call the same ops in the same order with
  the same token count ``T`` (shard ops: the same *global* ``T``) and the same ``quant`` kind. ``CommConfig(debug=
  True)`` checks this on every call and raises :class:`TPFuseMismatchError` on every rank when ranks disagree.
* **What must match across ranks.** ``hidden_size``, ``dtype``, ``max_tokens`` and an equal ``CommConfig``, so the
  plan (and so the path) is identical on every rank; plans depend only on these and on ``T``.
* **Devices.** With an NCCL group the device is ``torch.cuda.current_device()`` of each process (set it before
  building the communicator; a TP rank is never used as a device index). With gloo, everything is on the CPU,
  except in one-GPU mode (:mod:`tpfuse.distributed`): then the tensors are on the current CUDA device too, and what
  routes to NCCL runs on the gloo group through host memory (:mod:`tpfuse.collectives`, not graph-capturable:
  :meth:`TPCommunicator.graph_safe`).
* **Buffers.** GPU paths own workspaces allocated once at construction, sized from ``max_tokens x hidden x TP``,
  held in ``workspaces`` (backend name -> :class:`~tpfuse.backends.base.Workspace`) and released by :meth:`close`.
  Ops return fresh output tensors; inputs are never written.
* **Bad input.** Checks run before any collective, so a bad argument given on every rank raises a
  :class:`TPFuseInputError` on every rank and the communicator stays usable.
* **Peer faults.** Every wait for a peer is bounded by ``CommConfig.timeout_s`` (the collectives run on a group of
  the same ranks created with that timeout, :mod:`tpfuse.peer`): a peer that dies, hangs, skips a call or closes
  early makes the waiting ranks raise :class:`~tpfuse.errors.TPFusePeerError` (connection closed) or
  :class:`~tpfuse.errors.TPFusePeerTimeout`, naming the op and call number; the communicator is broken from then
  on (every later call raises the same at once). Per backend: the README's contract section.

Shapes: see :mod:`tpfuse.reference` (the shape table of every op) and :mod:`tpfuse.sharding` (token shards).
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from . import backends  # noqa: F401  (registers the paths and the workspaces)
from . import compile_ops
from . import peer
from . import quant as q
from . import scaled_gemm
from . import thresholds
from .config import CommConfig
from .backends.base import Decline, Workspace, allocators
from .dispatch import Plan, implementation, make_plan
from .distributed import group_device
from .errors import TPFuseClosedError, TPFuseError, TPFuseInputError, TPFuseMismatchError, TPFusePeerError
from .sharding import shard_len
from .validation import (ACTIVATION_DTYPES, check_activation, check_eps, check_norm_weight, check_same_rows,
                         check_tensor)


MODE_OPS = {"allreduce": ("fused_add_rmsnorm",),
            "sequence_parallel": ("all_gather_matmul", "matmul_reduce_scatter_rmsnorm", "all_gather")}
"""The ops a step of the model runtime (:mod:`tpfuse.parallel`) calls in each :attr:`Plan.mode
<tpfuse.dispatch.Plan.mode>` (what :meth:`TPCommunicator.graph_safe` checks by default)."""


def detect_arch(device: torch.device) -> str:
    """``"sm90"`` style name of a CUDA device, ``"cpu"`` otherwise."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


class TPCommunicator:
    """Fused TP collectives for one process group (see the module docstring for the contract).

    >>> comm = TPCommunicator(max_tokens=8192, hidden_size=4096)          # doctest: +SKIP
    >>> out, residual = comm.fused_add_rmsnorm(partial, residual, norm_w)  # doctest: +SKIP
    >>> print(comm.plan(512))                                              # doctest: +SKIP
    """

    def __init__(self, group=None, *, max_tokens: int, hidden_size: int, dtype: torch.dtype = torch.bfloat16,
                 config: Optional[CommConfig] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise TPFuseError("torch.distributed is not initialized: call tpfuse.init_distributed() (or "
                              "torch.distributed.init_process_group) before building a TPCommunicator, e.g. under "
                              "torchrun")
        self.config = config if config is not None else CommConfig()
        if not isinstance(self.config, CommConfig):
            raise TPFuseInputError(f"config must be a tpfuse.CommConfig, got {type(self.config).__name__}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise TPFuseInputError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise TPFuseInputError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if dtype not in ACTIVATION_DTYPES:
            raise TPFuseInputError(f"dtype must be one of {ACTIVATION_DTYPES}, got {dtype}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise TPFuseInputError("this process is not a member of the group passed to TPCommunicator")
        self.tp = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        self.device = group_device(self.backend)  # CUDA on NCCL, and on gloo in one-GPU mode
        self.max_tokens, self.hidden_size, self.dtype = max_tokens, hidden_size, dtype
        self.arch = self.config.arch or detect_arch(self.device)
        self.table = thresholds.load(self.config.resolved_thresholds_path())
        self.row = self.table.lookup(self.arch, self.tp, str(dtype).replace("torch.", ""), hidden_size)
        self.last_path: Dict[str, str] = {}
        """op -> the path its latest call ran (what tests assert against ``plan()``). Equals ``plan(T).path(op)``
        unless the planned path declined the call (:class:`~tpfuse.backends.base.Decline`, e.g. an output form
        FlashInfer cannot produce): then it names the fallback that ran."""
        self.last_fallback: Dict[str, str] = {}
        """op -> ``"<planned path> -> <path that ran>: <why>"`` of the op's latest declined call (kept until the next
        one; compare ``last_path`` with the plan to tell whether the latest call declined)."""
        self.workspaces: Dict[str, Workspace] = {}
        """Backend name -> its workspace (:mod:`tpfuse.backends.base`), only those this communicator needs."""
        self._plans: Dict[int, Plan] = {}
        self._routes: Dict[tuple, tuple] = {}  # (op, num_tokens) -> (path, implementation): _run's memo of plan()
        # what the eager fast checks compare against (see _ok_activation)
        self._on_cuda = self.device.type == "cuda"
        self._host_staged = self._on_cuda and self.backend != "nccl"  # one-GPU mode (see graph_safe)
        self._dev_index = self.device.index if self._on_cuda else -1
        self._calls = 0
        self._closed = False
        self._broken: Optional[TPFusePeerError] = None  # set (with _closed) when a peer failed during a call
        self._groups = peer.groups_for(self.group, self.backend, self.tp, self.config.timeout_s, self.config.debug,
                                       self.device)
        self.ops_group = self._groups.pg
        """The process group the op collectives run on: ``group``'s ranks, timeout ``CommConfig.timeout_s``."""
        self._handle = compile_ops.register(self)
        for name, allocate in allocators():  # collective: every rank of the group allocates alike, in this order
            ws = allocate(self)
            if ws is not None:
                self.workspaces[name] = ws
        self._checks = tuple(ws.check for ws in self.workspaces.values())

    # ----------------------------------------------------------------------------------------------------------
    # lifecycle

    def close(self) -> None:
        """Release workspaces. Idempotent; any later op raises :class:`TPFuseClosedError`. Collective (barriers)
        when a FlashInfer workspace exists (``workspaces["flashinfer"]``): then call it on every rank - except after a
        peer fault (:class:`~tpfuse.errors.TPFusePeerError`, a set timeout flag: a peer may be dead), when nothing
        here waits for peers.
        With ``CommConfig(debug=True)`` it is collective too: the ranks exchange a ``close`` signature (bounded by
        ``timeout_s``), so a peer still calling ops raises :class:`TPFuseMismatchError` instead of waiting, and so
        does this ``close()`` after releasing everything."""
        err = None
        if self.config.debug and not self._closed and self._broken is None:
            self._calls += 1
            try:
                self._debug_exchange("close", (), None)
            except TPFuseError as e:  # release first, then report
                err = e
        try:
            self._release_workspaces()
        finally:
            self._checks = ()
            compile_ops.unregister(self._handle)
        self._plans.clear()
        self._routes.clear()
        self._closed = True
        self._broken = None
        if err is not None:
            raise err

    def _release_workspaces(self) -> None:
        """Close every workspace, in reverse order; without barriers once a peer may be dead (a peer fault was
        raised, or a kernel's timeout flag is set even if no call has read it yet)."""
        for ws in self.workspaces.values():
            try:
                ws.check()  # sets ws.broken from a flag no call has read yet
            except TPFuseError:
                pass
        collective = self._broken is None and not any(ws.broken for ws in self.workspaces.values())
        for name in reversed(list(self.workspaces)):
            self.workspaces.pop(name).close(collective)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            if self._broken is not None:  # a peer failed earlier: the same error, at once
                raise type(self._broken)(str(self._broken))
            raise TPFuseClosedError("this TPCommunicator was closed; build a new one")
        for check in self._checks:
            check()  # raises TPFusePeerTimeout (and stays broken) after a kernel's peer timeout

    def synchronize(self) -> None:
        """Wait for this rank's queued work, then raise :class:`~tpfuse.errors.TPFusePeerTimeout` if a kernel
        gave up waiting for a peer (``CommConfig.timeout_s``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._check_open()

    check = synchronize

    # ----------------------------------------------------------------------------------------------------------
    # dispatch

    def plan(self, num_tokens: int) -> Plan:
        """Which path each op takes at ``num_tokens`` (global tokens) and why. Cached per token count."""
        self._check_open()
        p = self._plans.get(num_tokens)
        return p if p is not None else self._make_plan(num_tokens)

    def graph_safe(self, num_tokens: int, ops: Optional[Tuple[str, ...]] = None) -> bool:
        """Whether ``ops`` (default: the model runtime's ops of ``plan(num_tokens).mode``, :data:`MODE_OPS`) run on
        paths a CUDA graph can capture at ``num_tokens``. Always on NCCL groups; in one-GPU mode
        (:mod:`tpfuse.distributed`) not where one of them takes ``nccl`` or ``reference``: those run gloo
        collectives through host memory (:mod:`tpfuse.collectives`). The model runtime then decodes eagerly."""
        if not self._host_staged:
            return True
        p = self.plan(num_tokens)
        return not any(p.path(op) in ("nccl", "reference") for op in (ops or MODE_OPS[p.mode]))

    def _make_plan(self, num_tokens: int) -> Plan:
        p = self._plans.get(num_tokens)
        if p is None:
            if not isinstance(num_tokens, int) or not 0 <= num_tokens <= self.max_tokens:
                raise TPFuseInputError(f"num_tokens must be an int in [0, max_tokens={self.max_tokens}], "
                                       f"got {num_tokens!r}")
            p = make_plan(self, num_tokens)
            self._plans[num_tokens] = p
        return p

    def _run(self, op: str, num_tokens: int, args: tuple, kwargs: dict):
        """Run ``op`` on its planned path (or, for a call that path declines, on its fallbacks). Callers have just
        run :meth:`_check_open`."""
        route = self._routes.get((op, num_tokens))
        if route is None:
            choice = self._make_plan(num_tokens).ops[op]
            if choice.error is not None:  # force_paths pins this op to a path that cannot run here
                raise TPFuseInputError(choice.error)
            route = self._routes[(op, num_tokens)] = (choice.path, implementation(op, choice.path), choice.on_decline)
        self.last_path[op] = route[0]
        try:
            return route[1](self, *args, **kwargs)
        except Decline as d:
            return self._run_fallback(op, route, d.reason, args, kwargs)
        except RuntimeError as e:
            self._peer_fault(op, e)
            raise

    def _run_fallback(self, op: str, route: tuple, why: str, args: tuple, kwargs: dict):
        """The call ``route``'s path declined, on the first of its fallbacks that takes it."""
        for path in route[2]:
            self.last_path[op] = path
            self.last_fallback[op] = f"{route[0]} -> {path}: {why}"
            try:
                return implementation(op, path)(self, *args, **kwargs)
            except Decline as d:
                why = d.reason
            except RuntimeError as e:
                self._peer_fault(op, e)
                raise
        raise AssertionError(f"{op}: every fallback of {route[0]} declined (the reference path never does)")

    def _peer_fault(self, op: str, exc: BaseException) -> None:
        """Raise the tpfuse error for a collective that failed because of a peer (and break this communicator);
        return when ``exc`` is anything else."""
        err = peer.translate(exc, op=op, call=self._calls, rank=self.rank, tp=self.tp, backend=self.backend,
                             timeout_s=self.config.timeout_s)
        if err is None:
            return
        self._broken, self._closed = err, True
        self._groups.broken = str(err)
        raise err from exc

    # eager fast checks: True when the argument certainly passes the full checks (the common case), so an op can
    # skip building the check closure and the debug signature; False sends the op through _enter, whose full
    # checks raise the precise TPFuseInputError. They never accept what the full checks would reject.

    def _ok_tensor(self, t, dim: int) -> bool:
        return (isinstance(t, torch.Tensor) and t.dim() == dim and
                (t.is_cuda and t.get_device() == self._dev_index if self._on_cuda else t.is_cpu) and
                t.is_contiguous())

    def _ok_activation(self, x) -> bool:
        return (self._ok_tensor(x, 2) and x.dtype is self.dtype and x.shape[1] == self.hidden_size and
                x.shape[0] <= self.max_tokens)

    def _ok_norm_args(self, weight, eps, quant) -> bool:
        if not (self._ok_tensor(weight, 1) and weight.shape[0] == self.hidden_size and
                weight.dtype in ACTIVATION_DTYPES and (type(eps) is float or type(eps) is int) and eps > 0):
            return False
        if quant is not None:
            q.check_spec(quant, self.hidden_size, self.device)  # raises like _enter would (not in debug mode)
        return True

    def _enter(self, op: str, signature: tuple, check) -> None:
        """Run the local checks; in debug mode also compare ``signature`` and check results across ranks. Callers have
        just run :meth:`_check_open`."""
        self._calls += 1
        err = None
        try:
            check()
        except TPFuseInputError as e:
            err = e
        if self.config.debug:
            self._debug_exchange(op, signature, err)
        if err is not None:
            raise err

    def _debug_exchange(self, op: str, signature: tuple, err: Optional[Exception]) -> None:
        mine = (op, self._calls, signature, None if err is None else str(err))
        every: list = [None] * self.tp
        try:
            dist.all_gather_object(every, mine, group=self._groups.debug_pg)
        except RuntimeError as e:
            self._peer_fault(op, e)
            raise
        failed = [(r, e[3]) for r, e in enumerate(every) if e[3] is not None]
        if failed and err is None:
            raise TPFuseMismatchError(f"{op}: rank(s) {[r for r, _ in failed]} of the TP group rejected their input:"
                                      f" {failed[0][1]}")
        if not failed and any(e[:3] != every[0][:3] for e in every):
            detail = "; ".join(f"rank {r}: {e[0]} call #{e[1]} {e[2]}" for r, e in enumerate(every))
            closed = [r for r, e in enumerate(every) if e[0] == "close"]
            if closed and op != "close":  # a peer has gone: nothing more to exchange with it
                self._broken, self._closed = TPFusePeerError(
                    f"rank(s) {closed} of the TP group closed this communicator while rank {self.rank} called {op}"
                    f" (call #{self._calls}); build a new TPCommunicator on every rank"), True
            raise TPFuseMismatchError(f"{op}: ranks of the TP group made different calls: {detail}")

    # ----------------------------------------------------------------------------------------------------------
    # ops

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x [T, H]`` over the group (out of place)."""
        if torch.compiler.is_compiling():
            return torch.ops.tpfuse.comm_all_reduce(self._handle, x)
        self._check_open()
        if not self.config.debug and self._ok_activation(x):
            self._calls += 1  # as _enter does: peer-fault messages name the call
            return self._run("all_reduce", x.shape[0], (x,), {})
        def check():
            check_activation("x", x, hidden=self.hidden_size, dtype=self.dtype, device=self.device,
                             max_tokens=self.max_tokens)
        self._enter("all_reduce", (tuple(x.shape) if isinstance(x, torch.Tensor) else None,), check)
        return self._run("all_reduce", x.shape[0], (x,), {})

    def fused_add_rmsnorm(self, x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                          eps: float = 1e-6, *, quant: Optional[q.QuantSpec] = None, gemma: bool = False
                          ) -> Tuple[object, torch.Tensor]:
        """``residual_out = sum_ranks(x) + residual``; ``out = rmsnorm(residual_out) * weight`` (fp32 math).

        ``x``: this rank's partial sum ``[T, H]``; ``residual``: ``[T, H]`` or ``None`` (first layer); ``weight``:
        ``[H]`` (``weight + 1`` when ``gemma``). Returns ``(out, residual_out)``: ``out`` in the input dtype, or a
        :class:`~tpfuse.quant.QuantizedActivation` when ``quant`` is given; ``residual_out`` in the input dtype."""
        if torch.compiler.is_compiling():
            return compile_ops.norm_op("fused_add_rmsnorm", self, x, residual, weight, eps, quant, gemma)
        return self._norm_call("fused_add_rmsnorm", x, residual, weight, eps, quant, gemma, False)

    def reduce_scatter_rmsnorm(self, x: torch.Tensor, residual_shard: Optional[torch.Tensor], weight: torch.Tensor,
                               eps: float = 1e-6, *, quant: Optional[q.QuantSpec] = None, gemma: bool = False
                               ) -> Tuple[object, torch.Tensor]:
        """Sequence-parallel form of :meth:`fused_add_rmsnorm`: the sum is scattered by token ranges.

        ``x``: partial sum ``[T, H]`` (any ``T``; a ``T`` that TP does not divide is padded internally);
        ``residual_shard``: this rank's ``[Ts, H]`` slice (:func:`tpfuse.sharding.shard_range`) or ``None``.
        Returns ``(out_shard, residual_shard_out)``, both ``[Ts, H]``."""
        if torch.compiler.is_compiling():
            return compile_ops.norm_op("reduce_scatter_rmsnorm", self, x, residual_shard, weight, eps, quant, gemma)
        return self._norm_call("reduce_scatter_rmsnorm", x, residual_shard, weight, eps, quant, gemma, True)

    def _norm_call(self, op: str, x, residual, weight, eps, quant, gemma, shard: bool):
        """The two norm ops (``shard``: ``residual`` is this rank's token shard): the eager fast checks, else the
        full checks (and the debug exchange), then the run."""
        self._check_open()
        if (not self.config.debug and self._ok_activation(x) and
                (residual is None or (self._ok_tensor(residual, 2) and residual.dtype is self.dtype and
                                      ((residual.shape[1] == self.hidden_size and
                                        residual.shape[0] == shard_len(x.shape[0], self.tp, self.rank)) if shard
                                       else residual.shape == x.shape))) and
                self._ok_norm_args(weight, eps, quant)):
            self._calls += 1  # as _enter does: peer-fault messages name the call
            return self._run(op, x.shape[0], (x, residual, weight, eps), {"quant": quant, "gemma": gemma})
        def check():
            check_activation("x", x, hidden=self.hidden_size, dtype=self.dtype, device=self.device,
                             max_tokens=self.max_tokens)
            if shard:
                self._check_residual_shard(residual, x.shape[0])
            else:
                self._check_residual(residual, x)
            self._check_norm(weight, eps, quant)
        self._enter(op, (_shape(x), residual is None, type(quant).__name__, bool(gemma)), check)
        return self._run(op, x.shape[0], (x, residual, weight, eps), {"quant": quant, "gemma": gemma})

    def _check_residual(self, residual, x) -> None:
        if residual is not None:
            check_tensor("residual", residual, dtype=self.dtype, device=self.device, dim=2)
            check_same_rows("x", x, "residual", residual)

    def _check_norm(self, weight, eps, quant) -> None:
        check_norm_weight(weight, hidden=self.hidden_size, device=self.device)
        check_eps(eps)
        q.check_spec(quant, self.hidden_size, self.device)

    def _check_shard(self, name: str, x_shard, num_tokens: Optional[int], width: Optional[int],
                     dtype: Optional[torch.dtype] = None) -> int:
        check_tensor(name, x_shard, dtype=dtype or self.dtype, device=self.device, dim=2)
        if width is not None and x_shard.shape[1] != width:
            raise TPFuseInputError(f"{name} has hidden size {x_shard.shape[1]}, but the communicator's hidden_size "
                                   f"is {width}")
        if num_tokens is None and self.tp > 1:
            # a shard does not tell the global T (T=3 over TP=2 gives shards of 2 and 1 rows, which also fit T=4 and
            # T=2): ranks guessing differently would send different sizes into the collective
            raise TPFuseInputError(f"num_tokens is required with TP={self.tp}: pass the global token count "
                                   f"(rank {self.rank}'s {name} has {x_shard.shape[0]} rows; a shard alone does not "
                                   f"tell T when TP does not divide it)")
        t = num_tokens if num_tokens is not None else x_shard.shape[0]
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= self.max_tokens:
            raise TPFuseInputError(f"num_tokens must be an int in [0, max_tokens={self.max_tokens}], got {t!r}")
        want = shard_len(t, self.tp, self.rank)
        if x_shard.shape[0] != want:
            raise TPFuseInputError(f"{name} has {x_shard.shape[0]} rows, but rank {self.rank}'s shard of {t} tokens "
                                   f"over TP={self.tp} has {want}")
        return t

    def _check_residual_shard(self, residual_shard, num_tokens: int) -> None:
        if residual_shard is None:
            return
        check_tensor("residual_shard", residual_shard, dtype=self.dtype, device=self.device, dim=2)
        want = (shard_len(num_tokens, self.tp, self.rank), self.hidden_size)
        if tuple(residual_shard.shape) != want:
            raise TPFuseInputError(f"residual_shard has shape {tuple(residual_shard.shape)}, expected {want}"
                                   f" (rank {self.rank}'s shard of {num_tokens} tokens over TP={self.tp})")

    def _check_row_parallel(self, x, weight, x_scale, w_scale) -> Tuple[torch.Tensor, dict]:
        """``x_shard_k [T, K/TP]`` and ``w_shard_k [H, K/TP]`` of a row-parallel linear (dense, or FP8 with scales,
        :mod:`tpfuse.scaled_gemm`). Returns ``x``'s data tensor and the scale kwargs of the paths."""
        xd, xs = scaled_gemm.unpack(x, x_scale)
        fp8 = scaled_gemm.is_fp8(xd, weight, xs, w_scale)
        if fp8:
            scaled_gemm.check(xd, weight, xs, w_scale, device=self.device, out_dtype=self.dtype)
        else:
            check_tensor("x", xd, dtype=self.dtype, device=self.device, dim=2)
            check_tensor("weight", weight, dtype=self.dtype, device=self.device, dim=2)
        if weight.shape != (self.hidden_size, xd.shape[1]):
            raise TPFuseInputError(f"weight has shape {tuple(weight.shape)}; expected [{self.hidden_size}, "
                                   f"{xd.shape[1]}] (out-features = hidden_size, in-features = x.shape[1])")
        if xd.shape[0] > self.max_tokens:
            raise TPFuseInputError(f"x has {xd.shape[0]} tokens, more than max_tokens={self.max_tokens}")
        return xd, ({"x_scale": xs, "w_scale": w_scale} if fp8 else {})

    def all_gather(self, x_shard: torch.Tensor, *, num_tokens: Optional[int] = None) -> torch.Tensor:
        """``[Ts, H]`` token shards -> ``[T, H]``. ``num_tokens``: the global T, required when TP > 1 (a rank cannot
        tell T from its own shard when TP does not divide T)."""
        if torch.compiler.is_compiling():
            return torch.ops.tpfuse.comm_all_gather(self._handle, x_shard,
                                                    compile_ops.gather_tokens(self, x_shard, num_tokens))
        self._check_open()
        box = {}
        def check():
            box["t"] = self._check_shard("x_shard", x_shard, num_tokens, self.hidden_size)
        self._enter("all_gather", (num_tokens, _shape(x_shard)[1:]), check)
        t = box["t"]
        return self._run("all_gather", t, (x_shard, t), {})

    def all_gather_matmul(self, x_shard, weight: torch.Tensor, *, num_tokens: Optional[int] = None,
                          x_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
        """Column-parallel linear with a sequence-parallel input: ``all_gather(x_shard) @ weight.T``.

        ``x_shard``: ``[Ts, H]``; ``weight`` (``w_shard_n``): ``[N / TP, H]`` (nn.Linear layout). Returns
        ``[T, N / TP]``. FP8 (:mod:`tpfuse.scaled_gemm`): ``x_shard`` e4m3 with ``x_scale`` (per-tensor, the same
        on every rank, or ``[Ts, 1]`` per token, gathered with its rows) or a ``QuantizedActivation`` (FP8Static /
        FP8PerToken); ``weight`` e4m3 with ``w_scale`` (per-tensor or ``[N / TP, 1]``); the output is bf16."""
        if torch.compiler.is_compiling():
            xd, xs = scaled_gemm.unpack(x_shard, x_scale)
            return torch.ops.tpfuse.comm_all_gather_matmul(self._handle, xd, weight,
                                                           compile_ops.gather_tokens(self, xd, num_tokens), xs, w_scale)
        self._check_open()
        box = {}
        def check():
            xd, xs = scaled_gemm.unpack(x_shard, x_scale)
            fp8 = scaled_gemm.is_fp8(xd, weight, xs, w_scale)
            if fp8:
                scaled_gemm.check(xd, weight, xs, w_scale, device=self.device, out_dtype=self.dtype, x_name="x_shard")
            box["t"] = self._check_shard("x_shard", xd, num_tokens, self.hidden_size,
                                         dtype=scaled_gemm.FP8 if fp8 else None)
            if not fp8:
                check_tensor("weight", weight, dtype=self.dtype, device=self.device, dim=2)
            if weight.shape[1] != self.hidden_size:
                raise TPFuseInputError(f"weight has shape {tuple(weight.shape)}; expected [N_shard, {self.hidden_size}]"
                                       f" (nn.Linear layout, in-features = hidden_size)")
            box["x"], box["kw"] = xd, ({"x_scale": xs, "w_scale": w_scale} if fp8 else {})
        self._enter("all_gather_matmul", (num_tokens,) + self._gemm_sig(x_shard, weight, x_scale, w_scale, True),
                    check)
        t = box["t"]
        return self._run("all_gather_matmul", t, (box["x"], weight, t), box["kw"])

    def matmul_reduce_scatter(self, x, weight: torch.Tensor, *, x_scale: Optional[torch.Tensor] = None,
                              w_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Row-parallel linear with a sequence-parallel output: ``reduce_scatter(x @ weight.T)`` by tokens.

        ``x`` (``x_shard_k``): ``[T, K / TP]``; ``weight`` (``w_shard_k``): ``[H, K / TP]``. Returns this rank's
        ``[Ts, H]`` token shard of the sum. FP8 (:mod:`tpfuse.scaled_gemm`): ``x`` e4m3 with ``x_scale``
        (per-tensor or ``[T, 1]``) or a ``QuantizedActivation``; ``weight`` e4m3 with ``w_scale`` (per-tensor or
        ``[H, 1]``); the partials and the output are bf16."""
        if torch.compiler.is_compiling():
            xd, xs = scaled_gemm.unpack(x, x_scale)
            return torch.ops.tpfuse.comm_matmul_reduce_scatter(self._handle, xd, weight, xs, w_scale)
        self._check_open()
        box = {}
        def check():
            box["x"], box["kw"] = self._check_row_parallel(x, weight, x_scale, w_scale)
        self._enter("matmul_reduce_scatter", self._gemm_sig(x, weight, x_scale, w_scale), check)
        xd = box["x"]
        return self._run("matmul_reduce_scatter", xd.shape[0], (xd, weight), box["kw"])

    def matmul_reduce_scatter_rmsnorm(self, x, weight: torch.Tensor,
                                      residual_shard: Optional[torch.Tensor], norm_weight: torch.Tensor,
                                      eps: float = 1e-6, *, quant: Optional[q.QuantSpec] = None, gemma: bool = False,
                                      x_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None
                                      ) -> Tuple[object, torch.Tensor]:
        """Row-parallel linear followed by the sequence-parallel add + RMSNorm (+ quant), fused where the path
        allows: ``s = reduce_scatter(x @ weight.T) + residual_shard``; returns ``(rmsnorm(s) [quantized], s)``,
        both ``[Ts, H]``. Routed like :meth:`matmul_reduce_scatter` (its table bucket and forced path;
        ``plan(T)["matmul_reduce_scatter_rmsnorm"]``): the async-TP path sums the peers' partials, adds, normalises
        and quantizes in one kernel; other paths run the reduce-scatter (its result rounded to the input dtype),
        then the local fused stage. FP8 operands as in :meth:`matmul_reduce_scatter`."""
        if torch.compiler.is_compiling():
            return compile_ops.matmul_norm_op(self, x, weight, residual_shard, norm_weight, eps, quant, gemma,
                                              x_scale, w_scale)
        self._check_open()
        box = {}
        def check():
            box["x"], box["kw"] = self._check_row_parallel(x, weight, x_scale, w_scale)
            self._check_residual_shard(residual_shard, box["x"].shape[0])
            self._check_norm(norm_weight, eps, quant)
        self._enter("matmul_reduce_scatter_rmsnorm", self._gemm_sig(x, weight, x_scale, w_scale) +
                    (residual_shard is None, type(quant).__name__, bool(gemma)), check)
        xd = box["x"]
        return self._run("matmul_reduce_scatter_rmsnorm", xd.shape[0], (xd, weight, residual_shard, norm_weight, eps),
                         {"quant": quant, "gemma": gemma, **box["kw"]})

    def _gemm_sig(self, x, weight, x_scale, w_scale, shard: bool = False) -> tuple:
        """What must match across ranks for a GEMM op (debug mode): shapes (without the shard's rows when
        ``shard``), dtypes, scale kinds; with ``shard`` and debug on, also the value of a per-tensor ``x_scale``
        (the all-gather uses one scale for every rank's rows)."""
        qa = isinstance(x, q.QuantizedActivation)
        xd, xs = (x.data, x.scale) if qa else (x, x_scale)
        cut = 1 if shard else 0
        sig = (_shape(xd)[cut:], getattr(xd, "dtype", None), _shape(weight), getattr(weight, "dtype", None),
               _shape(xs)[cut:] if xs is not None else None, _shape(w_scale) if w_scale is not None else None)
        if (shard and self.config.debug and isinstance(xs, torch.Tensor) and xs.numel() == 1 and xs.dim() <= 1
                and xs.device.type != "meta"):
            sig += (float(xs.reshape(())).hex(),)  # hex: a NaN scale equals itself (NaN != NaN as a float)
        return sig

    # the workspaces' former attributes (read-only properties, not __getattr__: a class __getattr__ slows every
    # attribute lookup on the eager path)
    workspace = property(lambda self: self._renamed_workspace("workspace"))
    async_tp = property(lambda self: self._renamed_workspace("async_tp"))
    flashinfer = property(lambda self: self._renamed_workspace("flashinfer"))

    def _renamed_workspace(self, name: str):
        new = _RENAMED_WORKSPACES[name]
        warnings.warn(f"TPCommunicator.{name} is deprecated: use comm.workspaces.get({new!r})", DeprecationWarning,
                      stacklevel=3)
        return self.workspaces.get(new)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"backend={self.backend}, device={self.device}"
        return (f"TPCommunicator(rank={self.rank}/{self.tp}, hidden={self.hidden_size}, max_tokens={self.max_tokens},"
                f" dtype={self.dtype}, arch={self.arch}, {state})")


_RENAMED_WORKSPACES = {"workspace": "fused_allreduce", "async_tp": "async_tp", "flashinfer": "flashinfer"}


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else (None,)
