"""Summarise pytest JUnit XML files into one JSON: counts per TP size and per test file, the failures' first lines,
with the run's header (device, commit, versions). Used by ``bench/gpu_run.sh``'s ``onegpu`` step.

    python bench/tools/junit_summary.py --out OUT.json --tp 4 8 8 -- junit_tp4.xml junit_tp8_a.xml junit_tp8_b.xml
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402


def _outcome(case: ET.Element) -> str:
    for tag in ("failure", "error"):
        if case.find(tag) is not None:
            return "failed"
    return "skipped" if case.find("skipped") is not None else "passed"


def summarise(path: str) -> dict:
    """``{"files": {file: {outcome: count}}, "failures": [...], "seconds": float, "interrupted": bool, "cases":
    [[test id, outcome, seconds], ...], "properties": {test id: {name: value}}}`` of one JUnit XML file
    (``interrupted``: the run was stopped before its last test; what ran is counted; ``properties``: what a test
    recorded with pytest's ``record_property``, e.g. the soak's replay count and worst error)."""
    files = collections.defaultdict(collections.Counter)
    failures, seconds = [], 0.0
    interrupted, cases, properties = False, [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name"):  # pytest stopped by SIGINT (a step's time limit) writes one nameless testcase
            interrupted = True
            continue
        name = case.get("classname", "").replace(".", "/") + ".py"
        out = _outcome(case)
        files[name][out] += 1
        cases.append([f"{name}::{case.get('name')}", out, round(float(case.get("time", 0) or 0), 2)])
        recorded = {p.get("name"): p.get("value") for p in case.iter("property")}  # pytest's record_property
        if recorded:
            properties[f"{name}::{case.get('name')}"] = recorded
        seconds += float(case.get("time", 0) or 0)
        if out == "failed":
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            failures.append({"test": f"{name}::{case.get('name')}", "message": (node.get("message") or "")[:300]})
    return {"files": {k: dict(v) for k, v in sorted(files.items())}, "failures": failures,
            "seconds": round(seconds, 1), "interrupted": interrupted, "cases": cases, "properties": properties}


def merge(a: dict, b: dict) -> dict:
    """One TP size's summary from two XML files of it (test runs that shared the GPU at once): counts per file
    added, failures / cases / properties joined, ``seconds`` summed (test time, not wall time), ``interrupted`` if
    either was, ``missing`` lists the files that were not there (always a list)."""
    files = collections.defaultdict(collections.Counter)
    for part in (a, b):
        for name, counts in part.get("files", {}).items():
            files[name].update(counts)
    out = {"files": {k: dict(v) for k, v in sorted(files.items())},
           "failures": a.get("failures", []) + b.get("failures", []),
           "seconds": round(a.get("seconds", 0.0) + b.get("seconds", 0.0), 1),
           "interrupted": bool(a.get("interrupted") or b.get("interrupted")),
           "cases": a.get("cases", []) + b.get("cases", []),
           "properties": {**a.get("properties", {}), **b.get("properties", {})}}
    missing = a.get("missing", []) + b.get("missing", [])
    if missing:
        out["missing"] = missing
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--tp", required=True, type=int, nargs="+", help="the TP size of each XML file, in order")
    ap.add_argument("--sharing", default="timeslice", help="how the ranks shared the GPU (timeslice: no MPS)")
    ap.add_argument("xml", nargs="+", help="pytest --junitxml files (several of one TP size are merged)")
    args = ap.parse_args()
    if len(args.tp) != len(args.xml):
        ap.error("give one --tp value per XML file")
    per_tp = {}
    for tp, path in zip(args.tp, args.xml):
        s = summarise(path) if os.path.exists(path) else {"files": {}, "failures": [], "missing": [path]}
        per_tp[str(tp)] = merge(per_tp[str(tp)], s) if str(tp) in per_tp else s
    for s in per_tp.values():
        s["totals"] = dict(sum((collections.Counter(v) for v in s["files"].values()), collections.Counter()))
    common.write_json(args.out, common.header("onegpu_suite", mode="one-GPU (TORCH_SYMM_MEM_ALLOW_OVERLAPPING_"
                                              "DEVICES=1, gloo group)", sharing=args.sharing), None, per_tp=per_tp)
    for tp, s in per_tp.items():
        print(f"TP={tp}: {s['totals']}  ({len(s['failures'])} failed)")


if __name__ == "__main__":
    main()
