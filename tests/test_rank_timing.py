"""tests/distributed/rank_timing.py (``TPFUSE_TEST_TIMING``) and bench/tools/suite_timing.py: the compile time of a
call is counted, the slowest rank of each call is what a test costs."""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "distributed"))
sys.path.insert(0, os.path.join(HERE, "..", "bench", "tools"))

import rank_timing  # noqa: E402
import suite_timing  # noqa: E402


def test_compiles_are_counted_and_recorded(tmp_path, monkeypatch):
    import triton.compiler as tc

    monkeypatch.setattr(tc, "compile", lambda *a, **k: time.sleep(0.02) or "kernel")
    monkeypatch.setattr(rank_timing, "_compile", {"seconds": 0.0, "count": 0})
    monkeypatch.setenv(rank_timing.ENV, str(tmp_path / "t.tsv"))
    rank_timing.install()
    mark = rank_timing.start()
    assert tc.compile("src") == "kernel" and tc.compile("src") == "kernel"
    rank_timing.record(mark, "tests/x.py::test_a[tp2-onegpu]", 7, "_fn", 2, 1)
    test, call, fn, world, rank, secs, comp, n = (tmp_path / "t.tsv").read_text().rstrip("\n").split("\t")
    assert (test, call, fn, world, rank, n) == ("tests/x.py::test_a[tp2-onegpu]", "7", "_fn", "2", "1", "2")
    assert float(comp) >= 0.04 and float(secs) >= float(comp)


def test_summary_takes_the_slowest_rank_per_call_and_sums_the_calls():
    lines = ["t1\t0\tf\t2\t0\t1.0\t0.5\t3\n", "t1\t0\tf\t2\t1\t2.0\t0.1\t1\n",   # call 0: rank 1 is slowest
             "t1\t1\tg\t2\t1\t0.5\t0.0\t0\n", "t1\t1\tg\t2\t0\t0.25\t0.0\t0\n",  # call 1: rank 1
             "t2\t2\tf\t2\t0\t4.0\t3.0\t9\n", "a truncated line\n"]
    assert suite_timing.summarise(lines) == {"t1": [2.5, 0.1, 1], "t2": [4.0, 3.0, 9]}
