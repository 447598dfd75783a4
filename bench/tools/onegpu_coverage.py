"""What the one-GPU suite has run, from every ``bench/results/onegpu_suite_*.json`` (``junit_summary.py`` output):
per TP size and test, the latest outcome and the commit / sharing (time-sliced or MPS) it ran under.

    python bench/tools/onegpu_coverage.py [--results bench/results] [--markdown]
    pytest --collect-only -q ... | python bench/tools/onegpu_coverage.py --todo 4 [--after 2026-12-06T13:00]

``--todo TP`` reads collected test ids (``pytest --collect-only -q`` at that TP) and prints, shell-quoted, those
whose latest outcome at that TP is not ``passed`` (failed, or never run; with ``--after``, only runs from that date
on count): what ``bench/gpu_run.sh``'s ``onegpu`` step runs with ``ONEGPU_TODO=1``.

Summaries written before the per-test list existed (``cases``) count per file only: they are listed by file.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shlex
import sys


def load(results: str):
    """``[(date, commit, sharing, tp, summary)]`` of every suite summary, oldest first."""
    out = []
    for path in glob.glob(os.path.join(results, "onegpu_suite_*.json")):
        d = json.load(open(path))
        h = d["header"]
        for tp, s in d["per_tp"].items():
            out.append((h.get("date", ""), h.get("commit", "?"), h.get("sharing", "timeslice"), int(tp), s))
    return sorted(out, key=lambda r: r[0])


def _key(test: str) -> str:
    """A test id without its TP / one-GPU parameter (the same test at every TP)."""
    return re.sub(r"(?:(?<=\[)tp\d+-|-tp\d+-|-)onegpu(?=\]$)", "", test)


def _tp_of(test: str) -> int:
    """The TP size a collected one-GPU test runs at: its ``tp<N>`` parameter; 2 without one (the fault catalog runs
    with the TP=2 suite, ``test_fault_catalog.py``)."""
    m = re.search(r"(?:\[|-)tp(\d+)-onegpu\]$", test)
    return int(m.group(1)) if m else 2


def latest_per_test(runs):
    """``{tp: {test id without the TP parameter: (outcome, commit, sharing)}}``; a later run overrides."""
    out = collections.defaultdict(dict)
    for _, commit, sharing, tp, s in runs:
        for test, outcome, _secs in s.get("cases", []):
            out[tp][_key(test)] = (outcome, commit, sharing)
    return out


def by_file_only(runs):
    """Runs without a per-test list: ``[(tp, commit, sharing, {file: {outcome: n}})]``."""
    return [(tp, commit, sharing, s["files"]) for _, commit, sharing, tp, s in runs if "cases" not in s]


def todo(collected, runs, tp: int, after: str = ""):
    """The collected test ids (one-GPU parameters) whose latest outcome at ``tp`` in ``runs`` (those dated from
    ``after`` on) is not ``passed``, in collection order. A test skipped there counts as not passed (it is tried
    again: its reason may be gone)."""
    latest = latest_per_test([r for r in runs if r[0] >= after]).get(tp, {})
    mine = [t for t in collected if "::" in t and _tp_of(t) == tp]
    return [t for t in mine if latest.get(_key(t), ("",))[0] != "passed"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("--markdown", action="store_true", help="one table row per TP and test file")
    ap.add_argument("--todo", type=int, metavar="TP", help="print the collected ids (stdin) not yet passed at TP")
    ap.add_argument("--after", default="", help="with --todo: count only runs dated from this ISO date on")
    args = ap.parse_args(argv)
    runs = load(args.results)
    if args.todo is not None:
        # the ids pytest --collect-only -q prints (a warnings summary may repeat one, indented or not: kept once)
        collected = list(dict.fromkeys(line.rstrip("\n") for line in sys.stdin
                                       if "::" in line and "onegpu" in line and not line[:1].isspace()))
        for t in todo(collected, runs, args.todo, args.after):
            print(shlex.quote(t))
        return
    latest = latest_per_test(runs)
    for tp in sorted(latest):
        per_file = collections.defaultdict(collections.Counter)
        for test, (outcome, commit, sharing) in sorted(latest[tp].items()):
            per_file[test.split("::")[0]][outcome] += 1
            if not args.markdown:
                print(f"TP={tp}  {outcome:7s} {commit} {sharing:9s} {test}")
        if args.markdown:
            for f, c in sorted(per_file.items()):
                print(f"| {tp} | `{os.path.basename(f)}` | {c.get('passed', 0)} | {c.get('failed', 0)} |")
    for tp, commit, sharing, files in by_file_only(runs):
        print(f"(by file only) TP={tp} {commit} {sharing}: {json.dumps(files)}")


if __name__ == "__main__":
    main()
