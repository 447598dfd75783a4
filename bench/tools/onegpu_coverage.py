"""What the one-GPU suite has run, from every ``bench/results/onegpu_suite_*.json`` (``junit_summary.py`` output):
per TP size and test, the latest outcome and the commit / sharing (time-sliced or MPS) it ran under.

    python bench/tools/onegpu_coverage.py [--results bench/results] [--markdown]

Summaries written before the per-test list existed (``cases``) count per file only: they are listed by file.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re


def load(results: str):
    """``[(date, commit, sharing, tp, summary)]`` of every suite summary, oldest first."""
    out = []
    for path in glob.glob(os.path.join(results, "onegpu_suite_*.json")):
        d = json.load(open(path))
        h = d["header"]
        for tp, s in d["per_tp"].items():
            out.append((h.get("date", ""), h.get("commit", "?"), h.get("sharing", "timeslice"), int(tp), s))
    return sorted(out, key=lambda r: r[0])


def latest_per_test(runs):
    """``{tp: {test id without the TP parameter: (outcome, commit, sharing)}}``; a later run overrides."""
    out = collections.defaultdict(dict)
    for _, commit, sharing, tp, s in runs:
        for test, outcome, _secs in s.get("cases", []):
            out[tp][re.sub(r"-?tp\d+-onegpu|-onegpu", "", test)] = (outcome, commit, sharing)
    return out


def by_file_only(runs):
    """Runs without a per-test list: ``[(tp, commit, sharing, {file: {outcome: n}})]``."""
    return [(tp, commit, sharing, s["files"]) for _, commit, sharing, tp, s in runs if "cases" not in s]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("--markdown", action="store_true", help="one table row per TP and test file")
    args = ap.parse_args(argv)
    runs = load(args.results)
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
