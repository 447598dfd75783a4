"""Where a multi-rank test's time goes, opt-in: with ``TPFUSE_TEST_TIMING=<file>`` every rank of
:mod:`harness` appends one tab-separated line per call it runs::

    test id    call    rank function    world    rank    seconds    compile seconds    compiles

``call`` numbers the ``run_on_ranks`` calls of the pytest process (a test may make several); ``compile seconds`` is
the time spent in Triton's ``compile`` during the call (on-disk cache hits included: they take milliseconds, a real
compile seconds). ``bench/gpu_run.sh``'s ``onegpu`` step sets it, so one device call tells a slow one-GPU test's
compiles from its kernels and its checks (``bench/tools/suite_timing.py`` sums it up).
"""

from __future__ import annotations

import os
import time

ENV = "TPFUSE_TEST_TIMING"
_compile = {"seconds": 0.0, "count": 0}


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def install() -> None:
    """Count the time of every Triton compile in this process (the JIT resolves ``triton.compiler.compile`` when it
    first compiles a kernel, so this wraps every later compile)."""
    try:
        import triton.compiler as tc
    except ImportError:  # no Triton: nothing compiles
        return
    original = tc.compile

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _compile["seconds"] += time.perf_counter() - t0
            _compile["count"] += 1

    tc.compile = timed


def start():
    """A mark to pass to :func:`record` after the call."""
    return time.perf_counter(), _compile["seconds"], _compile["count"]


def record(mark, test: str, call: int, fn_name: str, world: int, rank: int) -> None:
    t0, c0, n0 = mark
    line = "\t".join([test or "-", str(call), fn_name, str(world), str(rank), f"{time.perf_counter() - t0:.3f}",
                      f"{_compile['seconds'] - c0:.3f}", str(_compile["count"] - n0)])
    with open(os.environ[ENV], "a") as f:  # one short append per line: the ranks' lines do not interleave
        f.write(line + "\n")
