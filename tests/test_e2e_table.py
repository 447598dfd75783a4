"""``bench/tools/e2e_table.py`` (the README's model table from an e2e JSON) on a small synthetic run."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "bench", "tools"))
import e2e_table  # noqa: E402


def _row(model, provider, us, batch, mode="decode", **kw):
    return dict(model=model, mode=mode, tokens=batch, context=1024, layers=kw.pop("layers", 32), provider=provider,
                us=us, **kw)


def _run(tmp_path):
    rows = [dict(model="tiny", mode="fp8_quality", tokens=64, provider="tpfuse_fp8", us=float("nan"))]
    for b, (t, floor, hf, f8, f8s) in {1: (6000, 5000, 7500, 3300, 3000), 64: (9000, 6000, None, 6300, 6000)}.items():
        rows += [_row("8B", "hf_eager", 40000, b), _row("8B", "tpfuse", t, b, max_batch=64, max_seq_len=1072),
                 _row("8B", "memory_floor", floor, b), _row("8B", "tpfuse_fp8", f8, b),
                 _row("8B", "tpfuse_fp8_static", f8s, b)]
        if hf:
            rows.append(_row("8B", "hf_compiled", hf, b))
        rows += [_row("8B", "tpfuse_capacity", t * 1.01, b, max_batch=256, max_seq_len=1152),
                 _row("8B", "tpfuse_capacity", t * 1.02, b, max_batch=64, max_seq_len=1152)]
    rows.append(_row("8B", "tpfuse_capacity", 6060, 1, max_batch=8, max_seq_len=32768))
    rows += [_row("8B", "tpfuse_smallm", 5700, 1, routed=8, table="sweep.json", pdl=False),
             _row("8B", "tpfuse_pdl", 5400, 1, routed=0, table="shipped", pdl=True),
             _row("8B", "tpfuse_smallm_pdl", 5100, 1, routed=8, table="sweep.json", pdl=True),
             _row("8B", "tpfuse_fp8_smallm", 2970, 1, routed=8, table="sweep.json", pdl=False),
             _row("8B", "tpfuse_smallm", 9450, 64, routed=3, table="sweep.json", pdl=False)]
    rows += [_row("8B", "tpfuse", 30000, 4096, mode="prefill"),
             _row("70B/tp8 shard", "tpfuse", 700, 1, layers=80, shard_of="70B", tp_shard=8),
             _row("70B/tp8 shard", "memory_floor", 560, 1, layers=80)]
    data = {"header": {"benchmark": "e2e", "device": "NVIDIA H100 80GB HBM3", "commit": "0123456789abcdef", "tp": 1,
                       "context": 1024, "copy_bandwidth_tb_s": 3.0,
                       "copy_bandwidth_ways_tb_s": {"graph": 2.4, "events": 3.0}},
            "rows": rows, "skipped": [dict(model="8B", max_batch=512, max_seq_len=32768, reason="needs 300 GiB")]}
    path = tmp_path / "e2e_tp1_h100_full.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_model_table(tmp_path):
    text = e2e_table.render([_run(tmp_path)])
    lines = text.splitlines()
    assert lines[0].startswith("*") and "NVIDIA H100 80GB HBM3" in lines[0] and "commit 0123456789" in lines[0]
    assert ("| model | layers | batch | tpfuse ms | floor ms | tpfuse / floor | HF compiled ms | tpfuse / HF compiled "
            "| FP8 / bf16 | FP8 static / bf16 |") in lines
    assert "| 8B | 32 | 1 | 6.00 | 5.00 | 1.20 | 7.50 | 0.80 | 0.55 | 0.50 |" in lines
    assert "| 8B | 32 | 64 | 9.00 | 6.00 | 1.50 | — | — | 0.70 | 0.67 |" in lines
    assert "| 70B/tp8 shard | 80 | 1 | 0.700 | 0.560 | 1.25 | — | — | — | — |" in lines
    assert not any("4096" in line for line in lines if line.startswith("| 8B"))  # decode rows only
    # capacity points: the run's own cache first, then each point in the order run, the spread over all of them
    assert "| model | batch | run's cache ms | 256x1152 ms | 64x1152 ms | 8x32768 ms | spread |" in lines
    assert "| 8B | 1 | 64x1072: 6.00 | 6.06 | 6.12 | 6.06 | 2.0% |" in lines
    assert "| 8B | 64 | 64x1072: 9.00 | 9.09 | 9.18 | — | 2.0% |" in lines
    assert "- skipped: 8B 512x32768: needs 300 GiB" in lines
    assert "floor at the measured copy bandwidth 3.0 TB/s (the faster of graph 2.4, events 3.0)" in lines[0]
    # the A/Bs of --small-m-table / --pdl (a run from before PDL was the default): their rows stay out of the model
    # table; per provider and batch the variant's step over the base step
    assert "Decode step under each variant over the same step without it (small-M table: sweep.json):" in lines
    assert ("| model | batch | provider | small-M table: with / without | PDL: with / without "
            "| small-M table + PDL: with / without "
            "| GEMM calls routed (small-M table / small-M table + PDL) |") in lines
    assert "| 8B | 1 | bf16 | 0.95 | 0.90 | 0.85 | 8 / 8 |" in lines
    assert "| 8B | 1 | FP8 | 0.90 | — | — | 8 |" in lines
    assert "| 8B | 64 | bf16 | 1.05 | — | — | 3 |" in lines


def test_columns_absent_from_the_run_are_left_out(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"header": {}, "rows": [_row("8B", "tpfuse", 650, 1, layers=4),
                                                        _row("8B", "memory_floor", 480, 1, layers=4)]}))
    out = tmp_path / "t.md"
    e2e_table.main([str(path), "--out", str(out)])
    lines = out.read_text().splitlines()
    assert "| model | layers | batch | tpfuse ms | floor ms | tpfuse / floor |" in lines
    assert "| 8B | 4 | 1 | 0.650 | 0.480 | 1.35 |" in lines
    assert not any("spread" in line for line in lines)



def test_fp8_cache_rows_get_their_own_ratio_columns(tmp_path):
    """``--kv-fp8`` rows (an e4m3 KV cache) are ratios over the bf16-cache step, never model-table base rows."""
    path = tmp_path / "e.json"
    rows = [_row("8B", "tpfuse", 9000, 64), _row("8B", "memory_floor", 7500, 64),
            _row("8B", "tpfuse_fp8", 7200, 64), _row("8B", "tpfuse_kv8", 7650, 64, kv_dtype="float8_e4m3fn"),
            _row("8B", "tpfuse_fp8_kv8", 4950, 64, kv_dtype="float8_e4m3fn")]
    path.write_text(json.dumps({"header": {}, "rows": rows}))
    lines = e2e_table.render([str(path)]).splitlines()
    assert ("| model | layers | batch | tpfuse ms | floor ms | tpfuse / floor | FP8 / bf16 | FP8 cache / bf16 "
            "| FP8 + FP8 cache / bf16 |") in lines
    assert "| 8B | 32 | 64 | 9.00 | 7.50 | 1.20 | 0.80 | 0.85 | 0.55 |" in lines


def test_refloor_puts_every_floor_at_the_runs_fastest_copy():
    """``bench_e2e.refloor``: the floors of a run at its fastest copy-bandwidth measurement, other rows untouched."""
    import bench_e2e

    rows = [dict(provider="memory_floor", bytes=3e9, us=1100.0), dict(provider="tpfuse", us=1200.0)]
    bench_e2e.refloor(rows, 3e12)
    assert rows == [dict(provider="memory_floor", bytes=3e9, us=1000.0), dict(provider="tpfuse", us=1200.0)]
