"""Path registry and the planner behind ``TPCommunicator.plan()``.

A *path* is one way to run an op (``"reference"``, ``"nccl"``, ``"tpfuse_oneshot"``, ...). Backends register an
implementation per (op, path) with an availability check; the thresholds table names the preferred path per size;
the planner walks ``[forced or preferred, "nccl", "reference"]`` and takes the first path that is registered,
allowed by ``CommConfig.allowed_paths`` and available on this communicator. ``Plan`` records, per op, what the
table preferred, what will run here, and why - so a CPU machine shows the decision a GPU would make
(``CommConfig(arch="sm90")``) while executing the reference path.

Each choice also lists ``on_decline``: the paths, in order, that run a call the chosen implementation declines
(:class:`tpfuse.backends.base.Decline`): the path's own ``declines_to`` (registered with it), then ``nccl``, then
``reference``, each only where it is allowed and available.

Ops the thresholds table has no entry for are routed as another op (:data:`ROUTED_AS`):
``matmul_reduce_scatter_rmsnorm`` takes ``matmul_reduce_scatter``'s bucket and forced path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from .thresholds import OPS as TABLE_OPS, Row

ROUTED_AS: Dict[str, str] = {"matmul_reduce_scatter_rmsnorm": "matmul_reduce_scatter"}
"""op -> the table op whose bucket (and ``CommConfig.force_paths`` entry) it follows."""
OPS: Tuple[str, ...] = TABLE_OPS + tuple(ROUTED_AS)
"""Every op the communicator plans (the table's ops, then the routed ones)."""

PATH_DOCS: Dict[str, str] = {
    "reference": "torch.distributed collectives + torch ops, fp32 math (gloo or NCCL): the oracle and last fallback",
    "nccl": "NCCL collective in the input dtype + tpfuse's local fused stage",
    "tpfuse_oneshot": "tpfuse symmetric-memory kernel: every rank reads all peers' partials, fused add+norm+quant",
    "tpfuse_twoshot": "tpfuse symmetric-memory kernel: reduce a token range, add+norm+quant it, all-gather results",
    "tpfuse_oneshot_pipe": "tpfuse symmetric-memory kernel: one-shot whose pushes (NVLink) overlap the add+norm+quant "
                           "of the chunks already arrived (producer / consumer programs)",
    "flashinfer_oneshot": "FlashInfer trtllm fused all-reduce+add+RMSNorm(+quant), one-shot (Lamport)",
    "flashinfer_twoshot": "FlashInfer trtllm fused all-reduce+add+RMSNorm(+quant), two-shot",
    "tpfuse_reduce_scatter": "tpfuse symmetric-memory reduce-scatter fused with add+RMSNorm(+quant)",
    "tpfuse_all_gather": "tpfuse symmetric-memory all-gather",
    "tpfuse_async_tp": "GEMM overlapped with the collective over symmetric memory (async TP)",
}


RENAMED_PATHS: Dict[str, str] = {"tpfuse_rs": "tpfuse_reduce_scatter", "tpfuse_ag": "tpfuse_all_gather"}
"""Former path names -> current ones. Tables and ``CommConfig`` still accept them (tables written by older sweeps
silently, a config with a DeprecationWarning)."""


def current_path(name: str) -> str:
    """``name``, or the current name of a renamed path."""
    return RENAMED_PATHS.get(name, name)


@dataclass(frozen=True)
class Impl:
    """One path's implementation of one op."""

    fn: Callable
    """``fn(comm, *op_args, **op_kwargs)``; may raise :class:`~tpfuse.backends.base.Decline` for one call."""
    available: Callable[[object], Optional[str]]
    """``available(comm)``: ``None`` if usable on ``comm``, else the reason it is not."""
    declines_to: Tuple[str, ...]
    """Paths to try first (before ``nccl`` and ``reference``) for a call ``fn`` declines."""


_IMPLS: Dict[Tuple[str, str], Impl] = {}


def register(op: str, path: str, available: Optional[Callable[[object], Optional[str]]] = None,
             declines_to: Tuple[str, ...] = ()):
    """Decorator: register ``fn`` as ``path``'s implementation of ``op``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    for p in (path, *declines_to):
        if p not in PATH_DOCS:
            raise ValueError(f"unknown path {p!r}; add it to PATH_DOCS with a one-line description")

    def deco(fn):
        _IMPLS[(op, path)] = Impl(fn, available or (lambda comm: None), tuple(declines_to))
        return fn

    return deco


def implementation(op: str, path: str) -> Callable:
    return _IMPLS[(op, path)].fn


def registered_paths(op: str) -> Tuple[str, ...]:
    """Every path with an implementation of ``op`` in this build (available here or not)."""
    return tuple(p for (o, p) in _IMPLS if o == op)


def unavailable_reason(op: str, path: str, comm) -> Optional[str]:
    """``None`` if ``path`` can run ``op`` on ``comm``, else a short reason."""
    if (op, path) not in _IMPLS:
        return f"{path} has no implementation of {op} in this build"
    return _IMPLS[(op, path)].available(comm)


def table_routes(comm, paths) -> bool:
    """Whether ``comm`` can ever run one of ``paths``: its table row sends some size <= ``max_tokens`` there, or
    ``CommConfig.force_paths`` names one, or ``CommConfig.all_workspaces`` is set (and ``allowed_paths``, if
    given, names one of ``paths``). Backends allocate their workspaces only then."""
    if getattr(comm.config, "all_workspaces", False):
        allowed = comm.config.allowed_paths
        return allowed is None or any(p in allowed for p in paths)
    if any(p in paths for p in dict(comm.config.force_paths).values()):
        return True
    nbytes = comm.max_tokens * comm.hidden_size * comm.dtype.itemsize
    for buckets in comm.row.paths.values():
        lo = 0
        for max_bytes, path in buckets:
            if path in paths and lo < nbytes:
                return True
            lo = max_bytes if max_bytes is not None else lo
    return False


@dataclass(frozen=True)
class OpChoice:
    """The decision for one op at one size."""

    op: str
    path: str
    """The path that runs on this communicator."""
    preferred: str
    """The path the thresholds table picks for this arch / TP / dtype / size."""
    rule: str
    """Why the table picked ``preferred`` (bucket bounds, table row)."""
    fallback: Optional[str] = None
    """Why ``path`` differs from ``preferred`` (``None`` when they agree)."""
    error: Optional[str] = None
    """Set when ``CommConfig.force_paths`` pins this op to a path that cannot run here: calling the op raises
    :class:`~tpfuse.errors.TPFuseInputError` with this text (the other ops are unaffected)."""
    on_decline: Tuple[str, ...] = ()
    """Where a call that ``path`` declines goes, in order (see the module docstring). Not to be confused with
    ``fallback``, the reason the table's path was not chosen."""


@dataclass(frozen=True)
class Plan:
    """What every op does at ``num_tokens`` on this communicator (``print(plan)`` for a table)."""

    num_tokens: int
    hidden: int
    dtype: str
    activation_bytes: int
    tp: int
    arch: str
    mode: str
    """``"allreduce"`` (residual stream replicated; use ``fused_add_rmsnorm``) or ``"sequence_parallel"``
    (residual stream sharded by tokens; use ``reduce_scatter_rmsnorm`` + ``all_gather(_matmul)``)."""
    mode_rule: str
    ops: Mapping[str, OpChoice]
    table: str
    """The table file and row the decision came from."""

    def __getitem__(self, op: str) -> OpChoice:
        return self.ops[op]

    def path(self, op: str) -> str:
        return self.ops[op].path

    def __str__(self) -> str:
        lines = [f"plan: {self.num_tokens} tokens x {self.hidden} {self.dtype} ({_fmt_bytes(self.activation_bytes)}),"
                 f" TP={self.tp}, arch={self.arch}, mode={self.mode} [{self.mode_rule}]", f"  table: {self.table}"]
        w = max(len(o) for o in self.ops)
        for op, c in self.ops.items():
            extra = f"  (table: {c.preferred}; {c.fallback})" if c.fallback else ""
            lines.append(f"  {op:<{w}}  {c.path:<18} {c.rule}{extra}")
        return "\n".join(lines)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "inf"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


def _usable(op: str, path: str, comm) -> Optional[str]:
    """``None`` if ``path`` may run ``op`` on ``comm`` (allowed by ``CommConfig.allowed_paths`` and available)."""
    allowed = comm.config.allowed_paths
    if path != "reference" and allowed is not None and path not in allowed:
        return f"{path} not in allowed_paths"
    return unavailable_reason(op, path, comm)


def _decline_chain(op: str, path: str, comm) -> Tuple[str, ...]:
    """The usable paths after ``path`` that run the calls ``path`` declines (in order)."""
    impl = _IMPLS.get((op, path))
    walk = dict.fromkeys((*(impl.declines_to if impl else ()), "nccl", "reference"))
    return tuple(p for p in walk if p != path and _usable(op, p, comm) is None)


def _choose(op: str, comm, row: Row, nbytes: int) -> OpChoice:
    """The path ``op`` takes on ``comm`` at ``nbytes`` of activations: the forced one, or the table's preferred one,
    falling back to ``nccl`` then ``reference`` where it cannot run (and saying why)."""
    table_op = ROUTED_AS.get(op, op)
    preferred, lo, hi = row.pick(table_op, nbytes)
    rule = f"{_fmt_bytes(lo) if lo is not None else '0'} < {_fmt_bytes(nbytes)} <= {_fmt_bytes(hi)}"
    forced = comm.config.force_paths
    if table_op in forced:
        want = forced[table_op]
        reason = unavailable_reason(op, want, comm)
        if reason:  # only this op raises (when called): the others keep their plan
            msg = f"CommConfig.force_paths[{table_op!r}] = {want!r} cannot run here: {reason}"
            return OpChoice(op, want, preferred, rule, msg, error=msg)
        return OpChoice(op, want, preferred, rule, None if want == preferred else "forced by CommConfig",
                        on_decline=_decline_chain(op, want, comm))
    why = []
    for cand in dict.fromkeys((preferred, "nccl", "reference")):
        reason = _usable(op, cand, comm)
        if reason is None:
            return OpChoice(op, cand, preferred, rule, "; ".join(why) if cand != preferred else None,
                            on_decline=_decline_chain(op, cand, comm))
        why.append(reason)
    raise AssertionError("the reference path is always registered and available")


def make_plan(comm, num_tokens: int) -> Plan:
    """What every op does at ``num_tokens`` on ``comm`` (its table row, config, size, dtype and TP)."""
    row, hidden, tp = comm.row, comm.hidden_size, comm.tp
    nbytes = num_tokens * hidden * comm.dtype.itemsize
    ops = {op: _choose(op, comm, row, nbytes) for op in OPS}
    sp_min_tokens = comm.config.sp_min_tokens
    if sp_min_tokens is not None:
        sp = num_tokens >= sp_min_tokens
        mode_rule = f"tokens {num_tokens} {'>=' if sp else '<'} CommConfig.sp_min_tokens {sp_min_tokens}"
    else:
        sp = nbytes >= row.sp_min_bytes
        mode_rule = f"{_fmt_bytes(nbytes)} {'>=' if sp else '<'} sp_min_bytes {_fmt_bytes(row.sp_min_bytes)}"
    if tp == 1:
        sp, mode_rule = False, "TP=1: nothing to shard"
    return Plan(num_tokens=num_tokens, hidden=hidden, dtype=str(comm.dtype).replace("torch.", ""),
                activation_bytes=nbytes, tp=tp, arch=comm.arch, mode="sequence_parallel" if sp else "allreduce",
                mode_rule=mode_rule, ops=ops, table=f"{comm.table.path} row {row.index} [{row.key()}]")
