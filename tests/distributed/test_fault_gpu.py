"""GPU, TP = 2 / 4 / 8 (``cases.GPU_TPS``; NCCL with a GPU per rank, else one-GPU mode): a rank that dies mid-run.
Every survivor must raise a clear :class:`~tpfuse.errors.TPFusePeerTimeout` within ``timeout_s`` (+ margin, always
< 30 s), not hang and not fault, and every process must be gone within a wall-clock bound.

The ranks are plain subprocesses running ``fault_worker.py`` (its docstring has the protocol; the last rank
dies), not harness ranks: a rank that exits would break the harness pool's control group. Cases: the fused all-reduce kernels
(``fused_add_rmsnorm`` forced to ``tpfuse_oneshot`` / ``tpfuse_twoshot`` / ``tpfuse_oneshot_pipe``) and the
sequence-parallel exchange (``reduce_scatter_rmsnorm`` forced to ``tpfuse_reduce_scatter``), each with the peer
already dead when the survivor calls (``dead``) and with the peer dying while the survivor's kernels wait for it
(``dying``); and every other SP / async-TP op (``all_gather``, ``all_gather_matmul``, ``matmul_reduce_scatter``,
``matmul_reduce_scatter_rmsnorm``) with the peer dying mid-call.

Environment of the workers, and why (nothing here changes what tpfuse does; it keeps torch's / NCCL's own failure
handling from killing the survivor first, which would say nothing about tpfuse):

* ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``: the survivor issues no NCCL collective after the peer died (the
  communicator's NCCL calls all happen at construction), so the ProcessGroupNCCL watchdog has no work to time out;
  but if NCCL reported an asynchronous error for the communicator (its proxy / RAS threads notice the dead peer's
  sockets), error handling mode 3 (the default) would abort the process from the watchdog thread;
* ``TORCH_NCCL_ENABLE_MONITORING=0``: the heartbeat monitor kills a process whose watchdog looks stuck, and polls
  the store for dump requests; neither belongs in a 30 s window around a deliberately dead peer;
* ``NCCL_RAS_ENABLE=0``: NCCL's RAS thread keeps sockets to every peer and logs when one dies; off, to keep the
  survivor's only reaction to the death tpfuse's own;
* ``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` (unless set): NVLink multicast stays off on the
  lent machines (as in ``bench/gpu_run.sh``);
* ``TPFUSE_ONE_GPU=1`` where the machine has fewer GPUs than ranks (one-GPU mode).

Rank 0 hosts the TCP store (``MASTER_ADDR``), so the dying rank takes no store down with it.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from cases import gpu_tp_params
from harness import gpu_backend

pytestmark = [pytest.mark.gpu]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")
RESULT = "TPFUSE_FAULT_RESULT "
TIMEOUT_S = 5.0           # fault_worker.TIMEOUT_S (CommConfig.timeout_s)
MARGIN_S = 5.0            # the survivor raises within timeout_s + this (one timeout per broken call)
START_LIMIT_S = 240.0     # both workers: imports, NCCL init, Triton compiles (cold cache), the good calls
AFTER_EXIT_LIMIT_S = 45.0  # a survivor after the victim exited: the timeout, the report, os._exit
WORKER_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "TORCH_NCCL_ENABLE_MONITORING": "0", "NCCL_RAS_ENABLE": "0",
              "PYTHONUNBUFFERED": "1"}
WORKER_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
KERNELS = [("fused_add_rmsnorm", "tpfuse_oneshot"), ("fused_add_rmsnorm", "tpfuse_twoshot"),
           ("fused_add_rmsnorm", "tpfuse_oneshot_pipe"), ("reduce_scatter_rmsnorm", "tpfuse_reduce_scatter")]
ASYNC_TP = [("all_gather", "tpfuse_all_gather"), ("all_gather_matmul", "tpfuse_async_tp"),
            ("matmul_reduce_scatter", "tpfuse_async_tp"), ("matmul_reduce_scatter_rmsnorm", "tpfuse_async_tp")]
# (op, path, mode): every kernel dead and dying; every SP / async-TP op dying (the peer exits mid-call)
CASES = ([(op, path, mode) for op, path in KERNELS for mode in ("dead", "dying")]
         + [(op, path, "dying") for op, path in ASYNC_TP])


def _launch(tp, op, path, mode, tmp_path):
    from tpfuse.distributed import ONE_GPU_ENV, free_port

    env = dict(os.environ)
    for k, v in WORKER_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    env.update(WORKER_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(tp),
               LOCAL_WORLD_SIZE=str(tp), PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    if gpu_backend(tp) == "onegpu":
        env[ONE_GPU_ENV] = "1"
    sync = tmp_path / "sync"
    sync.mkdir()
    procs, logs = [], []
    for rank in range(tp):
        log = tmp_path / f"rank{rank}.log"
        with open(log, "w") as f:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, "--op", op, "--path", path, "--mode", mode, "--sync-dir", str(sync)],
                cwd=ROOT, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=f, stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


def _wait(procs, logs):
    """Wait for every worker within the bounds; kill what is left and fail otherwise. Returns the longest time of a
    survivor from the victim's (the last rank's) exit to its own (seconds)."""
    t_start = time.monotonic()
    t_exit = [None] * len(procs)
    problem = None
    while any(t is None for t in t_exit):
        now = time.monotonic()
        for r, p in enumerate(procs):
            if t_exit[r] is None and p.poll() is not None:
                t_exit[r] = now
        if all(t is not None for t in t_exit):
            break
        if now - t_start > START_LIMIT_S:
            problem = f"the workers did not finish within {START_LIMIT_S:g} s"
        elif t_exit[-1] is not None and None in t_exit and now - t_exit[-1] > AFTER_EXIT_LIMIT_S:
            problem = (f"rank {t_exit.index(None)} still running {AFTER_EXIT_LIMIT_S:g} s after the victim exited "
                       f"(hang?)")
        if problem:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
            pytest.fail(problem + "\n" + _logs(logs))
        time.sleep(0.05)
    return max(t - t_exit[-1] for t in t_exit[:-1])


def _logs(logs) -> str:
    return "\n".join(f"--- rank {r} output (last 6000 chars):\n{log.read_text()[-6000:]}" for r, log in enumerate(logs))


def _result(log):
    lines = [ln[len(RESULT):] for ln in log.read_text().splitlines() if ln.startswith(RESULT)]
    return json.loads(lines[-1]) if lines else None


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("op,path,mode", CASES)
def test_dead_peer_raises_peer_timeout(tp, op, path, mode, tmp_path):
    procs, logs = _launch(tp, op, path, mode, tmp_path)
    after = _wait(procs, logs)
    results = [_result(log) for log in logs]
    ctx = "\n".join(f"rank {r}: {res}" for r, res in enumerate(results)) + "\n" + _logs(logs)
    assert [p.returncode for p in procs] == [0] * tp, ctx
    # the run before the fault was real: the forced path ran and matched the oracle on every rank
    for res in results:
        assert res is not None and "failure" not in res, ctx
        assert res["good_calls"] == 3 and res["ran"] == path, ctx
    for r0 in results[:-1]:  # every survivor
        _check_survivor(r0, mode, ctx)
    assert after < AFTER_EXIT_LIMIT_S, ctx


def _check_survivor(r0: dict, mode: str, ctx: str) -> None:
    # the fault: the first call after the peer left raised the clear error, one timeout later
    assert r0["error_type"] == "TPFusePeerTimeout" and r0["calls_to_error"] == 1, ctx
    assert "peer did not arrive within 5 s" in r0["message"] and "a peer died" in r0["message"], ctx
    assert TIMEOUT_S - 1.0 <= r0["elapsed_s"] < min(TIMEOUT_S + MARGIN_S, 30.0), ctx
    assert r0["peer_exiting_at_error"], ctx  # the peer was leaving (dying) or gone (dead) before rank 0 gave up
    if mode == "dead":
        assert "waited_for_death_s" in r0 and r0["peer_gone_at_error"], ctx
    # afterwards: broken for good (raises before launching anything), CUDA context intact, process ends promptly
    assert r0["still_broken"] and r0["rebreak_s"] < 1.0, ctx
    assert r0["cuda_ok"], ctx
