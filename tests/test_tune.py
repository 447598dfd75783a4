"""The threshold tuner: bucket choice from measurements (unit), and a real 2-rank run whose table the communicator
loads (integration, CPU/gloo: only the reference path exists there, so the table is trivial but real)."""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import tune  # noqa: E402
from tpfuse import thresholds  # noqa: E402
from tpfuse.communicator import detect_arch  # noqa: E402


def _res(series):
    """{path: {tokens: (us, correct, mode)}} from {path: [(us, correct), ...]} over tokens 1, 2, 4, ..."""
    return {p: {1 << i: (us, ok, "graph") for i, (us, ok) in enumerate(v)} for p, v in series.items()}


def test_choose_buckets_hysteresis_and_correctness():
    tokens = [1, 2, 4, 8, 16]
    res = _res({
        "oneshot": [(5, True), (6, True), (9, True), (20, True), (40, True)],
        "twoshot": [(9, True), (9, True), (10, True), (12, True), (21, True)],
        "broken": [(1, False), (1, False), (1, False), (1, False), (1, False)],  # fastest, but wrong: never chosen
    })
    buckets, winners = tune.choose(res, tokens, hidden=4, itemsize=2)
    assert winners == ["oneshot", "oneshot", "oneshot", "twoshot", "twoshot"]
    assert buckets == [{"max_bytes": 4 * 4 * 2, "path": "oneshot"}, {"max_bytes": None, "path": "twoshot"}]
    # a win by less than 3% does not flip the bucket
    res = _res({"a": [(10, True), (10, True), (10, True)], "b": [(11, True), (9.8, True), (11, True)]})
    assert tune.choose(res, [1, 2, 4], 4, 2)[1] == ["a", "a", "a"]
    # the reference path (the oracle) wins only by more than the hysteresis
    res = _res({"reference": [(10, True), (5, True)], "nccl": [(10.2, True), (9, True)]})
    assert tune.choose(res, [1, 2], 4, 2)[1] == ["nccl", "reference"]


def test_tuner_run_writes_a_loadable_table(tmp_path):
    out = tmp_path / "thr.json"
    p = subprocess.run(["bash", "launch/tune.sh", "-n", "2", "--hidden", "64", "--tokens", "1,8", "--replays", "2",
                        "--ops", "fused_add_rmsnorm,reduce_scatter_rmsnorm", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[  4/4 100%" in p.stdout and "chosen buckets" in p.stdout
    table = json.loads(out.read_text())
    row = table["rows"][0]
    # the ranks run on GPUs (NCCL) where the machine has two, else on the CPU (gloo)
    arch = detect_arch(torch.device("cuda", 0)) if torch.cuda.device_count() >= 2 else "cpu"
    assert (row["arch"], row["tp"], row["hidden"]) == (arch, 2, 64)
    assert row["source"]["kind"] == "measured" and row["source"]["commit"] and row["source"]["date"]
    meas = json.loads((tmp_path / "thr_measurements.json").read_text())
    # 2 ops x 2 token counts, once per path available here (only the reference path on CPU; more on GPUs)
    seen = {(r["op"], r["tokens"]) for r in meas["rows"]}
    assert seen == {(o, t) for o in ("fused_add_rmsnorm", "reduce_scatter_rmsnorm") for t in (1, 8)}, seen
    assert meas["header"]["device"] and all(r["correct"] for r in meas["rows"])
    assert {r["path"] for r in meas["rows"] if r["op"] == "fused_add_rmsnorm"} >= {"reference"}
    t = thresholds.load(str(out))
    assert t.lookup(arch, 2, "bfloat16", 64).source["kind"] == "measured"
    # another hidden size falls back to a row without a hidden size (the shipped table's), not the tuned row
    other = t.lookup(arch, 2, "bfloat16", 128)
    assert other.hidden is None and other.source != t.lookup(arch, 2, "bfloat16", 64).source
