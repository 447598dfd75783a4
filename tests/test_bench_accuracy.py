"""``bench/bench_accuracy.py`` on CPU: the whole run on a tiny configuration (the 8B's rank-0 shard at TP 8 - hidden
size 4096, 4 q / 1 kv heads, intermediate 1792 - with 2 layers, vocab 512, batch 2, prompt 8, 4 decode steps)
writes its JSON and PNG with the three providers' metrics, and the metrics can fail: perturbed logits score worse."""

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_accuracy  # noqa: E402

TINY = ["--model", "8B/tp8", "--layers", "2", "--vocab", "512", "--batch", "2", "--prompt", "8", "--steps", "4"]


def test_tiny_run_writes_three_providers(tmp_path, monkeypatch):
    import torch.distributed as dist
    from tpfuse.distributed import free_port

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process (the run makes and ends its own)")
    monkeypatch.setenv("OUT", str(tmp_path))
    # the one-rank world's variables, set through monkeypatch so they are gone after the test
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    path = bench_accuracy.main(TINY)
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path) == "accuracy_tp1_cpu_8B-tp8_2L_v512_b2_p8_s4.json"
    with open(path) as fh:
        data = json.load(fh)
    hdr, rows = data["header"], {r["provider"]: r for r in data["rows"]}
    assert set(rows) == {"hf_bf16", "tpfuse", "tpfuse_fp8"}
    assert hdr["positions"] == "7..11" and hdr["kv_cache_defaults"]["fold_norms"] in (True, False)
    assert set(hdr["phases"]) == {"build bf16 model", "fp32 oracle", "hf_bf16", "tpfuse", "tpfuse_fp8"}
    for r in rows.values():
        assert r["finite"] and r["logit_rows"] == 2 * 5 and len(r["rel_err_by_step"]) == 5
        assert all(math.isfinite(x) and x > 0 for x in [r["rel_err"], r["max_abs_err"], *r["rel_err_by_step"]])
        assert 0.0 <= r["argmax_agreement"] <= 1.0
    # bf16 vs the fp32 oracle on CPU: ~1.1e-2 (tpfuse's plain-torch path) and ~1.2e-2 (HF) at this size
    assert rows["hf_bf16"]["rel_err"] < 0.03 and rows["tpfuse"]["rel_err"] < 0.03
    assert rows["tpfuse"]["rel_err"] <= 1.5 * rows["hf_bf16"]["rel_err"]
    assert rows["tpfuse_fp8"]["rel_err"] < 0.5  # e4m3 weights and activations: ~0.16 here
    assert isinstance(rows["tpfuse"]["within_target"], bool) and "within_target" not in rows["hf_bf16"]
    # the PNG where matplotlib is installed (CI's machine has none)
    assert bench_accuracy.common.pyplot() is None or os.path.getsize(path[:-len(".json")] + ".png") > 0


def test_plot_mode_redraws_from_json(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(provider=p, rel_err=e, argmax_agreement=a, rel_err_by_step=[e, e * 1.1, e * 0.9])
            for p, e, a in (("hf_bf16", 1e-2, 0.9), ("tpfuse", 9e-3, 0.95), ("tpfuse_fp8", 0.1, 0.7))]
    src = tmp_path / "accuracy_tp1_h100_8B_32L.json"
    src.write_text(json.dumps({"header": dict(model="8B", layers=32, vocab=128256, batch=4, prompt=256, steps=2,
                                              device="NVIDIA H100", commit="abc"), "rows": rows}))
    assert bench_accuracy.main(["--plot", str(src)]) is None
    assert (tmp_path / "accuracy_tp1_h100_8B_32L.png").stat().st_size > 0


def test_metrics_catch_a_corrupted_provider():
    """Logits perturbed beyond bf16's rounding score a larger rel_err and a lower agreement than a faithful copy,
    and the judgement against the baseline turns False."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 64, generator=g) * 3
    good = ref.to(torch.bfloat16).float()  # only bf16 rounding
    bad = good.clone()
    bad[:, 2] = torch.randn(2, 64, generator=g) * 3  # one position replaced: its argmax is (almost surely) lost
    m_good, m_bad = bench_accuracy.logit_metrics(good, ref), bench_accuracy.logit_metrics(bad, ref)
    assert m_good["argmax_agreement"] == 1.0 and m_good["rel_err"] < 5e-3
    assert m_bad["rel_err"] > 10 * m_good["rel_err"] and m_bad["argmax_agreement"] <= 0.8
    assert max(m_bad["rel_err_by_step"]) == m_bad["rel_err_by_step"][2] > 0.5
    assert m_good["max_abs_err"] < m_bad["max_abs_err"]
    rows = bench_accuracy.judge([dict(provider="hf_bf16", **m_good), dict(provider="tpfuse", **m_bad),
                                 dict(provider="same", **m_good)])
    assert rows[1]["within_target"] is False and rows[1]["rel_err_vs_hf_bf16"] > 10
    assert rows[1]["rel_err_within_hf_bf16"] is False and rows[1]["argmax_within_hf_bf16"] is False
    assert rows[2]["within_target"] is True and rows[2]["rel_err_vs_hf_bf16"] == 1.0
    nan = bad.clone()
    nan[0, 0, 0] = float("nan")
    m_nan = bench_accuracy.logit_metrics(nan, ref)
    assert not m_nan["finite"]
    assert bench_accuracy.judge([dict(provider="hf_bf16", **m_good), dict(provider="x", **m_nan)])[1][
        "within_target"] is False
