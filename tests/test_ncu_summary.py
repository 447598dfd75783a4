"""bench/tools/ncu_summary.py: the committed Nsight Compute summary is what the tool derives from the committed raw
page (nothing typed by hand), and the parser's number / text handling on a small page of its own."""

import csv
import gzip
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "bench", "tools"))

import ncu_summary  # noqa: E402


def test_committed_summary_is_the_raw_page_summarized(tmp_path):
    res = os.path.join(ROOT, "bench", "results")
    with open(os.path.join(res, "ncu_decode_h100_8Btp2_b1_1b1ce8a.json")) as fh:
        committed = json.load(fh)
    raw = os.path.join(res, "logs", "ncu_1b1ce8a", "8B-tp2_b1.csv.gz")
    out = tmp_path / "s.json"
    h = committed["header"]
    ncu_summary.main([raw, str(out), "--commit", h["commit"], "--model", h["model"], "--batch", str(h["batch"]),
                      "--device", h["device"], "--date", h["date"], "--raw", h["raw"]])
    again = json.loads(out.read_text())
    assert again == committed
    kernels = {r["kernel"] for r in committed["rows"]}
    assert {"_rope_split_hoist_kernel", "_combine_kernel", "_small_m_gemm_kernel"} <= kernels


def test_rows_parse_numbers_and_keep_text(tmp_path):
    path = tmp_path / "p.csv.gz"
    head = ["ID", "Kernel Name", "Grid Size", "Block Size", "Device", "Section Name", "Metric Name", "Metric Unit",
            "Metric Value"]
    recs = [["1", "k_b(int)", "(2, 1, 1)", "(64, 1, 1)", "0", "GPU Speed Of Light Throughput", "Elapsed Cycles",
             "cycle", "12,345"],
            ["1", "k_b(int)", "(2, 1, 1)", "(64, 1, 1)", "0", "Launch Statistics", "Function Cache Configuration", "",
             "CachePreferShared"],
            ["0", "k_a(float*)", "(1, 1, 1)", "(32, 1, 1)", "0", "GPU Speed Of Light Throughput", "Duration", "us",
             "3.5"]]
    with gzip.open(path, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        w.writerows(recs)
    rows = ncu_summary.rows_of(str(path))
    assert [r["launch"] for r in rows] == [0, 1] and [r["kernel"] for r in rows] == ["k_a", "k_b"]
    assert rows[0]["duration_us"] == 3.5 and rows[0]["elapsed_cycles"] is None
    assert rows[1]["elapsed_cycles"] == 12345.0 and rows[1]["cache_config"] == "CachePreferShared"
