"""Run a function on N ranks: the one multi-rank helper of the test suite.

``run_on_ranks(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` in N processes that share an
initialised default process group, and returns the N results (rank order). Backends:

* ``"gloo"``: CPU tensors (always available);
* ``"nccl"``: one GPU per rank (the machine has >= N GPUs);
* ``"onegpu"``: tpfuse's one-GPU mode (:mod:`tpfuse.distributed`): N ranks on one CUDA device over a gloo group,
  torch symmetric memory with overlapping devices allowed (any machine with a GPU; proves correctness, not speed).

``backend=None`` picks the last of :func:`available_backends`.

Guarantees:
* a failure on any rank fails the call: after ``fn`` returns or raises, every rank all-reduces a failure flag on a
  gloo control group, so a rank whose own work succeeded still learns that a peer failed; the exception text of
  every failed rank is in the AssertionError;
* nothing hangs: the caller waits at most ``timeout_s``; then the ranks are killed and the call fails;
* no state leaks into the next test after a failure: a failed or timed-out pool is torn down (process groups
  destroyed in ``finally``) and the next call starts fresh ranks. Pools that succeed are reused, since spawning
  ranks that import torch costs seconds on a 2-core CI machine;
* a rank may be *meant* to die (fault injection): ``run_on_ranks(fn, N, ..., dies=(2,))`` expects rank 2 to end its
  process inside ``fn`` (``os._exit``) and returns ``None`` for it and the other ranks' results; the ranks skip the
  control all-reduce (the default group lost a member, so each rank reports for itself), leave without tearing
  the broken group down, and the pool is replaced by the next call. A rank listed in ``dies`` that returns fails
  the call.

``fn`` must be a module-level function (it is pickled by reference); results must be picklable (move tensors to
the CPU).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import rank_timing

GLOO_TIMEOUT_S = 45.0
_CALLS = itertools.count()  # run_on_ranks calls of this process, numbered (rank_timing's call column)


def available_backends(world_size: int) -> List[str]:
    """Backends a test should run on: gloo always, NCCL too when the machine has ``world_size`` GPUs, one-GPU mode
    for ``world_size >= 2`` on any machine with a GPU."""
    out = ["gloo"]
    if torch.cuda.is_available() and world_size >= 2:
        out.append("onegpu")
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        out.append("nccl")
    return out


def gpu_backend(world_size: int) -> Optional[str]:
    """The backend a GPU test runs ``world_size`` ranks on here: NCCL with a GPU per rank, else one-GPU mode, else
    ``None`` (no GPU)."""
    if not torch.cuda.is_available():
        return None
    return "nccl" if torch.cuda.device_count() >= world_size else "onegpu"


def device_of(backend: str) -> torch.device:
    """Where a rank's tensors live for ``backend`` (inside ``fn``)."""
    on_gpu = backend in ("nccl", "onegpu")
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def _worker(rank: int, world: int, backend: str, port: int, conn) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # N ranks on 2 cores: oversubscription makes gloo tests crawl
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        if backend == "onegpu":
            from tpfuse.distributed import enable_one_gpu_mode

            enable_one_gpu_mode()
        dist.init_process_group("gloo" if backend == "onegpu" else backend, init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=GLOO_TIMEOUT_S))
        ctrl = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
        if rank_timing.enabled():
            rank_timing.install()
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            fn, args, kwargs, solo, (test, call) = msg
            ok, payload = True, None
            mark = rank_timing.start()
            try:
                payload = fn(rank, world, *args, **kwargs)
            except BaseException:  # noqa: BLE001 - report everything, including assertion errors
                ok, payload = False, traceback.format_exc()
            if rank_timing.enabled():
                rank_timing.record(mark, test, call, getattr(fn, "__name__", str(fn)), world, rank)
            if solo:  # a peer died on purpose: no control all-reduce, no teardown of the broken group
                conn.send(("result", (ok, payload, not ok)))
                from tpfuse.distributed import exit_rank

                exit_rank(0)
            flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
            try:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctrl)
                any_failed = bool(flag.item())
            except BaseException:  # noqa: BLE001 - the control group itself broke: report as failure
                any_failed = True
                if ok:
                    ok, payload = False, "control all-reduce failed:\n" + traceback.format_exc()
            conn.send(("result", (ok, payload, any_failed)))
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("result", (False, traceback.format_exc(), True)))
        except Exception:
            pass
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (tpfuse.distributed's docstring); results are sent


class RankPool:
    """N spawned ranks with an initialised process group, reused across calls while they keep succeeding."""

    def __init__(self, world_size: int, backend: str, start_timeout_s: float = 120.0):
        from tpfuse.distributed import free_port

        self.world_size, self.backend = world_size, backend
        ctx = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        for r in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, world_size, backend, port, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        deadline = time.monotonic() + start_timeout_s
        for r, c in enumerate(self.conns):
            kind, payload = self._recv(c, deadline, r)
            if kind != "ready":
                self.close()
                raise AssertionError(f"rank {r} failed to start ({backend}):\n{payload[1]}")

    def _recv(self, conn, deadline: float, rank: int):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"rank {rank} gave no answer in time")
            if conn.poll(min(left, 0.5)):
                try:
                    return conn.recv()
                except EOFError:
                    raise RuntimeError(f"rank {rank} died (exit code {self.procs[rank].exitcode})") from None
            if not self.procs[rank].is_alive():
                raise RuntimeError(f"rank {rank} died (exit code {self.procs[rank].exitcode})")

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout_s: float,
            dies: Tuple[int, ...] = ()) -> Tuple[bool, List[Any]]:
        # for rank_timing: "<node id> (call)" -> the node id, and this call's number in the session
        label = (os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0], next(_CALLS))
        for c in self.conns:
            c.send((fn, args, kwargs, bool(dies), label))
        deadline = time.monotonic() + timeout_s
        results, problems = [], []
        for r, c in enumerate(self.conns):
            try:
                _, (ok, payload, any_failed) = self._recv(c, deadline, r)
            except RuntimeError as e:  # the process is gone
                if r not in dies:
                    problems.append(f"rank {r}: {e}")
                results.append(None)
                continue
            except TimeoutError as e:
                problems.append(f"rank {r}: {e}")
                results.append(None)
                continue
            if r in dies:
                problems.append(f"rank {r} was meant to die inside {getattr(fn, '__name__', fn)} but returned: "
                                f"{payload}")
            results.append(payload)
            if not ok:
                problems.append(f"rank {r} raised:\n{payload}")
            elif any_failed and not problems:
                pass  # the failing peer reports itself
        return (not problems), (results if not problems else problems)

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_POOLS: Dict[tuple, RankPool] = {}


def _pick_backend(world_size: int, backend: Optional[str]) -> str:
    if backend is None:
        return available_backends(world_size)[-1]
    if backend != "gloo" and backend not in available_backends(world_size):
        raise AssertionError(f"backend {backend} is not available for {world_size} ranks here")
    return backend


def run_on_ranks(fn: Callable, world_size: int, *args, backend: Optional[str] = "gloo", timeout_s: float = 180.0,
                 dies: Tuple[int, ...] = (), **kwargs) -> List[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return the per-rank results.

    ``dies``: ranks that end their process inside ``fn`` on purpose (module docstring); their result is ``None``.
    Raises AssertionError naming every failed rank (with its traceback) if any rank failed or hung."""
    backend = _pick_backend(world_size, backend)
    # the ranks inherit the environment when their pool starts: a test under the Triton interpreter (the kernels
    # fixture's variables) must not reuse a pool started without it, where the ops take their reference path
    key = (world_size, backend, os.environ.get("TRITON_INTERPRET"), os.environ.get("TPFUSE_TRITON_CPU"))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = RankPool(world_size, backend)
    ok, out = pool.run(fn, args, kwargs, timeout_s, tuple(dies))
    if dies:  # the pool's default group lost a member (and the survivors have left): never reuse it
        _POOLS.pop(key, None)
        pool.close()
    if not ok:
        if not dies:
            _POOLS.pop(key, None)
            pool.close()
        raise AssertionError(f"{getattr(fn, '__name__', fn)} failed on {world_size} ranks ({backend}):\n"
                             + "\n".join(out))
    return out


def shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
