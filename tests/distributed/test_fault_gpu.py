"""GPU pair: a rank that dies mid-run (issue #4 item 5). The survivor must raise a clear
:class:`~tpfuse.errors.TPFusePeerTimeout` within ``timeout_s`` (+ margin, always < 30 s), not hang and not fault,
and both processes must be gone within a wall-clock bound.

The ranks are two plain subprocesses running ``fault_worker.py`` (its docstring has the protocol), not harness
ranks: a rank that exits would break the harness pool's control group. Cases: the fused all-reduce kernels
(``fused_add_rmsnorm`` forced to ``tpfuse_oneshot`` / ``tpfuse_twoshot`` / ``tpfuse_oneshot_pipe``) and the
sequence-parallel exchange (``reduce_scatter_rmsnorm`` forced to ``tpfuse_reduce_scatter``), each with the peer
already dead when the survivor calls (``dead``) and with the peer dying while the survivor's kernels wait for it (``dying``).

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
  lent machines (as in ``bench/gpu_run.sh``).

Rank 0 hosts the TCP store (``MASTER_ADDR``), so the dying rank takes no store down with it.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA GPUs (runs on the GPU pair)")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")
RESULT = "TPFUSE_FAULT_RESULT "
TIMEOUT_S = 5.0           # fault_worker.TIMEOUT_S (CommConfig.timeout_s)
MARGIN_S = 5.0            # the survivor raises within timeout_s + this (one timeout per broken call)
START_LIMIT_S = 240.0     # both workers: imports, NCCL init, Triton compiles (cold cache), the good calls
AFTER_EXIT_LIMIT_S = 45.0  # rank 0 after rank 1 exited: the timeout, the report, os._exit
WORKER_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "TORCH_NCCL_ENABLE_MONITORING": "0", "NCCL_RAS_ENABLE": "0",
              "PYTHONUNBUFFERED": "1"}
WORKER_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
CASES = [("fused_add_rmsnorm", "tpfuse_oneshot"), ("fused_add_rmsnorm", "tpfuse_twoshot"),
         ("fused_add_rmsnorm", "tpfuse_oneshot_pipe"), ("reduce_scatter_rmsnorm", "tpfuse_reduce_scatter")]


def _launch(op, path, mode, tmp_path):
    from tpfuse.distributed import free_port

    env = dict(os.environ)
    for k, v in WORKER_ENV_DEFAULTS.items():
        env.setdefault(k, v)
    env.update(WORKER_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2", PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    sync = tmp_path / "sync"
    sync.mkdir()
    procs, logs = [], []
    for rank in (0, 1):
        log = tmp_path / f"rank{rank}.log"
        with open(log, "w") as f:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, "--op", op, "--path", path, "--mode", mode, "--sync-dir", str(sync)],
                cwd=ROOT, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=f, stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


def _wait(procs, logs):
    """Wait for both workers within the bounds; kill what is left and fail otherwise. Returns rank 0's time from
    rank 1's exit to its own (seconds)."""
    t_start = time.monotonic()
    t_exit = [None, None]
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
        elif t_exit[1] is not None and t_exit[0] is None and now - t_exit[1] > AFTER_EXIT_LIMIT_S:
            problem = f"rank 0 still running {AFTER_EXIT_LIMIT_S:g} s after rank 1 exited (hang?)"
        if problem:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
            pytest.fail(problem + "\n" + _logs(logs))
        time.sleep(0.05)
    return t_exit[0] - t_exit[1]


def _logs(logs) -> str:
    return "\n".join(f"--- rank {r} output (last 6000 chars):\n{log.read_text()[-6000:]}" for r, log in enumerate(logs))


def _result(log):
    lines = [ln[len(RESULT):] for ln in log.read_text().splitlines() if ln.startswith(RESULT)]
    return json.loads(lines[-1]) if lines else None


@pytest.mark.parametrize("mode", ["dead", "dying"])
@pytest.mark.parametrize("op,path", CASES)
def test_dead_peer_raises_peer_timeout(op, path, mode, tmp_path):
    procs, logs = _launch(op, path, mode, tmp_path)
    after = _wait(procs, logs)
    r0, r1 = _result(logs[0]), _result(logs[1])
    ctx = f"rank 0: {r0}\nrank 1: {r1}\n{_logs(logs)}"
    assert [p.returncode for p in procs] == [0, 0], ctx
    # the run before the fault was real: the forced path ran and matched the oracle on both ranks
    assert r1 is not None and "failure" not in r1 and r1["good_calls"] == 3 and r1["ran"] == path, ctx
    assert r0 is not None and "failure" not in r0, ctx
    assert r0["good_calls"] == 3 and r0["ran"] == path, ctx
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
    assert after < AFTER_EXIT_LIMIT_S, ctx
