"""Sum up ``TPFUSE_TEST_TIMING`` files (``tests/distributed/rank_timing.py``): per test, the slowest rank's seconds
and the seconds it spent compiling Triton kernels, slowest tests first, and the totals.

    python bench/tools/suite_timing.py timing_tp8.tsv [--top 20]
"""

from __future__ import annotations

import argparse
import collections


def summarise(lines):
    """``{test id: [seconds, compile seconds, compiles]}``: per call the slowest rank, summed over a test's calls."""
    calls = {}  # (test, call) -> the slowest rank's [seconds, compile seconds, compiles]
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 8:
            continue
        test, call, _fn, _world, _rank, secs, comp, n = parts
        c = calls.setdefault((test, call), [0.0, 0.0, 0])
        if float(secs) >= c[0]:
            c[:] = [float(secs), float(comp), int(n)]
    out = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for (test, _), (secs, comp, n) in calls.items():
        t = out[test]
        t[0], t[1], t[2] = t[0] + secs, t[1] + comp, t[2] + n
    return dict(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    lines = [ln for path in args.files for ln in open(path)]
    per_test = summarise(lines)
    rows = sorted(per_test.items(), key=lambda kv: -kv[1][0])
    print(f"{'seconds':>8} {'compile':>8} {'compiles':>8}  test")
    for test, (secs, comp, n) in rows[:args.top]:
        print(f"{secs:8.1f} {comp:8.1f} {n:8d}  {test}")
    total, comp = sum(v[0] for v in per_test.values()), sum(v[1] for v in per_test.values())
    print(f"{total:8.1f} {comp:8.1f} {'':8}  all {len(per_test)} tests (slowest rank per call; compile = Triton)")


if __name__ == "__main__":
    main()
