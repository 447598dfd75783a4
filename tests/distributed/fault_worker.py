"""One rank of the dead-peer fault injection (``test_fault_gpu.py``): a plain process, not a harness rank, because
the peer that dies would take the harness's control group (and its pool) down with it.

Started by the test as ``python tests/distributed/fault_worker.py --op OP --path PATH --mode MODE --sync-dir DIR``
with the torchrun variables ``MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK`` (TP = WORLD_SIZE ranks;
NCCL with a GPU per rank, or one-GPU mode with ``TPFUSE_ONE_GPU=1``: :func:`tpfuse.init_distributed` decides).

``OP``: the fused all-reduce (``fused_add_rmsnorm``), the sequence-parallel exchange (``reduce_scatter_rmsnorm``,
``all_gather``) or an async-TP GEMM (``all_gather_matmul``, ``matmul_reduce_scatter`` and its fused tail
``matmul_reduce_scatter_rmsnorm``). Every rank first makes one call of ``OP`` on a communicator with the default
timeout and closes it (its kernels compiled and loaded before any wait is bounded by ``TIMEOUT_S``), then builds
``TPCommunicator(CommConfig(timeout_s=TIMEOUT_S, force_paths={OP: PATH}))`` (the tail's entry is
``matmul_reduce_scatter``'s) and makes
``GOOD_CALLS`` correct calls of ``OP`` (checked against the fp64 oracle, each followed by ``synchronize()``). Then
the last rank (the *victim*) leaves with ``os._exit(0)`` (no cleanup: no ``close()``, no process-group teardown,
as a crash would) and every other rank (a *survivor*) goes on calling ``OP`` + ``synchronize()``:

* ``--mode dead``: the survivors first wait until the victim's process is gone (``/proc/PID`` absent or a zombie),
  so every access of their next call to the dead peer's symmetric memory happens after the death;
* ``--mode dying``: rank 0 launches its call first (its kernels spin on the peer's flags), then lets the victim
  exit (a file in ``--sync-dir``), so the peer dies while rank 0's kernels are waiting for it.

What a survivor must see: the first call after the peer left raises :class:`~tpfuse.errors.TPFusePeerTimeout` at
the next check point, ``timeout_s`` after its kernel started (the bounded waits of :mod:`tpfuse.kernels.signals`),
not a hang and not a CUDA fault: the dead peer's buffers were imported into the survivor (cuMem handles from torch
symmetric memory), so the physical memory stays mapped and writable there until the survivor releases it, and the
pushes of that call land in memory nobody reads any more. Afterwards every call raises at once (the workspace is
broken) and the survivor's CUDA context still runs work.

Output: one line ``TPFUSE_FAULT_RESULT {json}`` per rank on stdout (the victim before it exits; a survivor at the
end, with ``failure`` holding a traceback if anything but the expected error happened), then ``os._exit(0)``: a
normal exit would tear down NCCL with a dead peer, which can hang. The test reads the lines; this script asserts
nothing about the fault itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

RESULT = "TPFUSE_FAULT_RESULT "
HIDDEN, TOKENS, MAX_TOKENS, EPS = 2048, 37, 64, 1e-6
TIMEOUT_S = 5.0       # CommConfig.timeout_s
GOOD_CALLS = 3
MAX_BAD_CALLS = 3     # rank 0 stops after this many calls that did not raise (the test then fails)
WAIT_S = 60.0         # how long a rank waits for the other's file / death before giving up
N_OUT = 256           # all_gather_matmul's output columns per rank
GEMM_OPS = ("all_gather", "all_gather_matmul", "matmul_reduce_scatter", "matmul_reduce_scatter_rmsnorm")
OPS = ("fused_add_rmsnorm", "reduce_scatter_rmsnorm") + GEMM_OPS


def _peer_gone(pid: int) -> bool:
    """True once ``pid`` has exited (its /proc entry is gone, or it is a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X", "x")


def _wait_for(pred, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > WAIT_S:
            raise TimeoutError(f"waited {WAIT_S:g} s for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def _op(comm, rank: int, world: int, op: str):
    """``(run, check)``: one call of ``op`` on fixed data (every rank builds every rank's inputs from one seed) and
    the comparison of its result with the fp64 oracle."""
    import torch
    from cases import make_inputs, oracle
    from tpfuse.sharding import shard_range
    from tpfuse.tolerance import assert_close

    inp = make_inputs(11, world, TOKENS, HIDDEN, torch.bfloat16, device=comm.device)
    if op in GEMM_OPS:
        return _gemm_op(comm, rank, world, op, inp)
    ref_out, ref_res = oracle(inp, EPS)
    if op == "fused_add_rmsnorm":
        def run():
            return comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, EPS)
        s, e = 0, TOKENS
    elif op == "reduce_scatter_rmsnorm":
        s, e = shard_range(TOKENS, world, rank)
        res_shard = inp.residual[s:e].contiguous()

        def run():
            return comm.reduce_scatter_rmsnorm(inp.xs[rank], res_shard, inp.weight, EPS)
    else:
        raise ValueError(f"unknown op {op}")

    def check(y):
        assert_close(y[0], ref_out[s:e], torch.bfloat16, f"{op} out")
        assert_close(y[1], ref_res[s:e], torch.bfloat16, f"{op} residual_out")

    return run, check


def _gemm_op(comm, rank: int, world: int, op: str, inp):
    """``(run, check)`` of the sequence-parallel exchange / async-TP ops: the all-gather, the column-parallel GEMM
    on gathered shards (weight ``[N_OUT, HIDDEN]``) and the row-parallel GEMM + reduce-scatter (+ add + RMSNorm;
    every rank's weight ``[HIDDEN, HIDDEN]``, scaled to keep the sums O(1))."""
    import torch
    from cases import make_inputs
    from tpfuse.reference import rmsnorm_math
    from tpfuse.sharding import shard_range
    from tpfuse.tolerance import assert_close

    bf = torch.bfloat16
    s, e = shard_range(TOKENS, world, rank)
    shard = inp.residual[s:e].contiguous()  # the gathered input, and the fused tail's residual shard
    if op == "all_gather":
        return (lambda: comm.all_gather(shard, num_tokens=TOKENS),
                lambda y: assert_close(y, inp.residual, bf, "all_gather"))
    if op == "all_gather_matmul":
        w = make_inputs(12, 1, N_OUT, HIDDEN, bf, device=comm.device).xs[0] / HIDDEN ** 0.5
        ref = inp.residual.double() @ w.double().t()
        return (lambda: comm.all_gather_matmul(shard, w, num_tokens=TOKENS),
                lambda y: assert_close(y, ref, bf, "all_gather_matmul"))
    ws = [w / (HIDDEN * world) ** 0.5 for w in make_inputs(13, world, HIDDEN, HIDDEN, bf, device=comm.device).xs]
    full = sum(x.double() @ w.double().t() for x, w in zip(inp.xs, ws))
    if op == "matmul_reduce_scatter":
        return (lambda: comm.matmul_reduce_scatter(inp.xs[rank], ws[rank]),
                lambda y: assert_close(y, full[s:e], bf, "matmul_reduce_scatter"))
    summed = full + inp.residual.double()
    ref_out = rmsnorm_math(summed, inp.weight.double(), EPS)

    def check(y):
        assert_close(y[0], ref_out[s:e], bf, f"{op} out")
        assert_close(y[1], summed[s:e], bf, f"{op} residual_out")

    return lambda: comm.matmul_reduce_scatter_rmsnorm(inp.xs[rank], ws[rank], shard, inp.weight, EPS), check


def _body(a, rank: int, world: int, res: dict) -> None:
    import torch

    import tpfuse
    from tpfuse.errors import TPFusePeerTimeout

    victim = world - 1
    pid_file = os.path.join(a.sync_dir, "victim.pid")
    launched, exiting = os.path.join(a.sync_dir, "rank0.launched"), os.path.join(a.sync_dir, "victim.exiting")
    if rank == victim:
        _touch(pid_file)
    res["backend"] = tpfuse.init_distributed(timeout_s=WAIT_S)  # NCCL, or gloo in one-GPU mode (TPFUSE_ONE_GPU=1)
    from tpfuse.dispatch import ROUTED_AS

    # the fused row-parallel tail follows matmul_reduce_scatter's entry (dispatch.ROUTED_AS)
    force = {ROUTED_AS.get(a.op, a.op): a.path}
    # first the op's kernels compiled and loaded on every rank under the default bound: a rank still JIT-compiling
    # (a cold cache, CPUs shared with another test run) must not look like a late peer to the TIMEOUT_S calls below
    with tpfuse.TPCommunicator(max_tokens=MAX_TOKENS, hidden_size=HIDDEN, dtype=torch.bfloat16,
                               config=tpfuse.CommConfig(force_paths=force)) as warm:
        run, _ = _op(warm, rank, world, a.op)
        run()
        warm.synchronize()
    cfg = tpfuse.CommConfig(timeout_s=TIMEOUT_S, force_paths=force)
    comm = tpfuse.TPCommunicator(max_tokens=MAX_TOKENS, hidden_size=HIDDEN, dtype=torch.bfloat16, config=cfg)
    run, check = _op(comm, rank, world, a.op)
    for _ in range(GOOD_CALLS):
        check(run())
        comm.synchronize()
        assert comm.last_path[a.op] == a.path, comm.last_path
    res["good_calls"], res["ran"] = GOOD_CALLS, comm.last_path[a.op]

    if rank == victim:  # leave as a crash would: no close(), no destroy_process_group(), no atexit handlers
        if a.mode == "dying":
            _wait_for(lambda: os.path.exists(launched), "rank 0 to launch its call")
        _touch(exiting)
        print(RESULT + json.dumps(res), flush=True)
        os._exit(0)

    _wait_for(lambda: os.path.exists(pid_file) and os.path.getsize(pid_file) > 0, "the victim's pid file")
    peer = int(open(pid_file).read())
    if a.mode == "dead":
        res["waited_for_death_s"] = round(_wait_for(lambda: _peer_gone(peer), f"the victim (pid {peer}) to exit"), 3)
    t0 = time.monotonic()
    calls, err = 0, None
    try:
        while calls < MAX_BAD_CALLS:
            calls += 1
            run()
            if a.mode == "dying" and calls == 1 and rank == 0:
                _touch(launched)  # the call's kernels are queued / spinning now: the victim may exit
            comm.synchronize()
    except TPFusePeerTimeout as e:
        err = e
    res["elapsed_s"] = round(time.monotonic() - t0, 3)
    res["calls_to_error"] = calls
    res["error_type"] = type(err).__name__ if err is not None else None
    res["message"] = str(err) if err is not None else None
    res["peer_exiting_at_error"] = os.path.exists(exiting)
    res["peer_gone_at_error"] = _peer_gone(peer)
    # broken for good: the next call raises before it launches anything
    t1 = time.monotonic()
    try:
        run()
        res["still_broken"] = False
    except TPFusePeerTimeout:
        res["still_broken"] = True
    res["rebreak_s"] = round(time.monotonic() - t1, 3)
    # the CUDA context is intact (no fault from touching the dead peer's memory): plain work still runs
    x = torch.arange(4, dtype=torch.float32, device=comm.device)
    res["cuda_ok"] = float((x + 1).sum().item()) == 10.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", required=True, choices=OPS)
    ap.add_argument("--path", required=True, help="the path CommConfig.force_paths pins OP to")
    ap.add_argument("--mode", required=True, choices=["dead", "dying"])
    ap.add_argument("--sync-dir", required=True, help="directory for the ranks' hand-shake files")
    a = ap.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    res = {"rank": rank, "op": a.op, "path": a.path, "mode": a.mode}
    try:
        _body(a, rank, world, res)
    except BaseException:  # noqa: BLE001 - report everything (a CUDA fault, a wrong error, a failed check)
        res["failure"] = traceback.format_exc()
    print(RESULT + json.dumps(res), flush=True)
    sys.stderr.flush()
    os._exit(0)  # never tear down NCCL with a dead peer (it can hang): the test bounds our lifetime anyway


if __name__ == "__main__":
    main()
