"""The FlashInfer paths (:mod:`tpfuse.backends.flashinfer`) on a CPU machine: registered, never imported by
``import tpfuse`` or by gloo plans, the availability reasons in order, the planner's fallback to nccl / reference
with the reason, a forced FlashInfer path raising the clear error, the workspace sizing rule, the per-call fallback
reporting the path that ran, and vLLM's policy table (``bench/policies/vllm_sm90_tp2.json``) as data."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import re

import pytest
import torch

import tpfuse
from cases import make_inputs, make_spec, oracle
from harness import run_on_ranks
from tpfuse import dispatch, thresholds
from tpfuse.backends import flashinfer as fib
from tpfuse.errors import TPFuseError
from tpfuse.tolerance import assert_close, assert_quant_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICY = os.path.join(ROOT, "bench", "policies", "vllm_sm90_tp2.json")
FI = ("flashinfer_oneshot", "flashinfer_twoshot")
MiB = 1 << 20

# fused_add_rmsnorm / all_reduce prefer FlashInfer below 4 KiB / 64 KiB, then NCCL
TABLE = {"schema": 1, "rows": [
    {"arch": "sm90", "tp": "*", "dtype": "*", "source": {"kind": "test"}, "sp_min_bytes": 1 << 40,
     "paths": {op: ([{"max_bytes": 4096, "path": "flashinfer_oneshot"}, {"max_bytes": 65536, "path": "flashinfer_twoshot"},
                     {"max_bytes": None, "path": "nccl"}] if op in ("fused_add_rmsnorm", "all_reduce")
                    else [{"max_bytes": None, "path": "nccl"}]) for op in thresholds.OPS}},
    {"arch": "*", "tp": "*", "dtype": "*", "source": {"kind": "test"}, "sp_min_bytes": 1 << 40,
     "paths": {op: [{"max_bytes": None, "path": "reference"}] for op in thresholds.OPS}}]}


def test_paths_registered_for_both_ops():
    for op in ("fused_add_rmsnorm", "all_reduce"):
        assert set(FI) <= set(dispatch.registered_paths(op)), op
    for op in ("reduce_scatter_rmsnorm", "all_gather", "all_gather_matmul", "matmul_reduce_scatter"):
        assert not set(FI) & set(dispatch.registered_paths(op)), op
    assert all(p in dispatch.PATH_DOCS for p in FI)


def test_import_tpfuse_does_not_import_flashinfer():
    code = ("import sys, torch, tpfuse\n"
            "from tpfuse.backends import flashinfer as f\n"
            "assert f.static_reason is not None and 'flashinfer' not in sys.modules, sorted(sys.modules)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------------
# availability reasons, in order (fake communicators: no process group needed)


def _fake(backend="nccl", tp=2, dtype=torch.bfloat16, hidden=4096, max_tokens=8192, ws=None, row=None, **cfg):
    return SimpleNamespace(backend=backend, tp=tp, dtype=dtype, hidden_size=hidden, max_tokens=max_tokens,
                           device=torch.device("cpu"), workspaces={} if ws is None else {fib.NAME: ws},
                           config=tpfuse.CommConfig(**cfg),
                           row=row or thresholds.load(POLICY).lookup("sm90", 2, "bfloat16"))


@pytest.fixture
def fi_env(monkeypatch):
    """FlashInfer 'installed' and importable, an sm90 device: the fake communicators reach every later check."""
    monkeypatch.setattr(fib, "_installed_reason", lambda: None)
    monkeypatch.setattr(fib, "_import_reason", lambda: None)
    monkeypatch.setattr(fib, "_capability", lambda device: (9, 0))
    return monkeypatch


def test_reason_not_installed(monkeypatch):
    monkeypatch.setattr(fib.importlib.util, "find_spec", lambda name: None)
    reason = fib._available(_fake())
    assert reason.startswith("flashinfer not importable: not installed"), reason


def test_reasons_in_order(fi_env):
    r = fib._available
    assert "needs an NCCL group" in r(_fake(backend="gloo")) and "gloo" in r(_fake(backend="gloo"))
    assert r(_fake(tp=1)) == "TP=1: nothing to reduce"
    assert "TP=3 unsupported" in r(_fake(tp=3))
    fi_env.setattr(fib, "_capability", lambda device: (8, 0))
    assert "needs sm90+" in r(_fake()) and "sm80" in r(_fake())
    fi_env.setattr(fib, "_capability", lambda device: (9, 0))
    assert "dtype float32 unsupported" in r(_fake(dtype=torch.float32))
    assert "hidden 2880 unsupported" in r(_fake(hidden=2880))
    assert "hidden 100 unsupported" in r(_fake(hidden=100))
    fi_env.setattr(fib, "_import_reason", lambda: "flashinfer not importable: ImportError: boom")
    assert r(_fake()) == "flashinfer not importable: ImportError: boom"
    fi_env.setattr(fib, "_import_reason", lambda: None)
    assert r(_fake()).startswith("no FlashInfer workspace")
    assert r(_fake(ws=SimpleNamespace(reason="FlashInfer workspace not built: rank 1: x"))).endswith("rank 1: x")
    assert r(_fake(ws=SimpleNamespace(reason=None))) is None


@pytest.mark.parametrize("hidden,ok", [(4096, True), (8192, True), (5120, True), (7168, True), (2048, True),
                                       (3584, True), (16384, True), (2880, False), (100, False), (128, False),
                                       (8 * 1025, False), (1 << 17, False)])
def test_hidden_rule(hidden, ok):
    # FlashInfer 0.6's launcher: 16-byte vectors, clusters of <= 8 blocks, whole warps per block, <= 1024 threads
    assert (fib.hidden_reason(hidden, 2) is None) == ok, fib.hidden_reason(hidden, 2)


def test_workspace_rows():
    row_bytes = 8192 * 2
    # the policy table routes up to 64 MiB to FlashInfer: vLLM's sizing, max_size // (hidden * itemsize)
    assert fib.rows_needed(_fake(hidden=8192, max_tokens=16384)) == (64 * MiB) // row_bytes == 4096
    assert fib.rows_needed(_fake(hidden=8192, max_tokens=100)) == 100
    assert fib.rows_needed(_fake(hidden=8192, max_tokens=16384, force_paths={"all_reduce": "flashinfer_twoshot"})) \
        == 16384
    assert fib.rows_needed(_fake(hidden=8192, max_tokens=16384, all_workspaces=True)) == 16384
    # never past FlashInfer's Lamport limit (TP * rows * H * 2 <= MAX_COMM_BYTES)
    big = fib.rows_needed(_fake(hidden=8192, tp=8, max_tokens=1 << 20, all_workspaces=True))
    assert 8 * big * row_bytes <= fib.MAX_COMM_BYTES < 8 * (big + 1) * row_bytes
    # a table without FlashInfer: nothing
    shipped = thresholds.load().lookup("sm90", 2, "bfloat16", 8192)
    assert fib.rows_needed(_fake(hidden=8192, row=shipped)) == 0


def test_call_reasons():
    from tpfuse import quant as q

    bf = torch.bfloat16
    kw = dict(weight_dtype=bf, dtype=bf)
    assert fib.call_reason(64, 2, 3, True, **kw) is None
    assert fib.call_reason(64, 2, 3, False, quant=q.FP8Static(1.0), **kw) is None
    assert fib.call_reason(64, 2, 0, True, **kw) == "no tokens"
    assert "exceed" in fib.call_reason(64, 2, 65, True, **kw)
    assert "two-shot needs more tokens than ranks" in fib.call_reason(64, 2, 2, False, **kw)
    assert fib.call_reason(64, 2, 2, True, **kw) is None
    assert "NVFP4" in fib.call_reason(64, 2, 3, True, quant=q.NVFP4(1.0), **kw)
    assert "dynamic FP8" in fib.call_reason(64, 2, 3, True, quant=q.FP8PerToken(), **kw)
    assert "dynamic FP8" in fib.call_reason(64, 2, 3, True, quant=q.FP8PerGroup(128), **kw)
    assert "gemma" in fib.call_reason(64, 2, 3, True, gemma=True, **kw)
    assert "norm weight float32" in fib.call_reason(64, 2, 3, True, weight_dtype=torch.float32, dtype=bf)
    assert fib.call_reason(64, 2, 3, False, norm=False) is None  # all_reduce: no norm arguments


# ------------------------------------------------------------------------------------------------------------------
# the planner and the communicator on gloo


def _gloo_plans(rank, world, table_path):
    comm = tpfuse.TPCommunicator(max_tokens=1024, hidden_size=64, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(arch="sm90", thresholds_path=table_path))
    assert fib.NAME not in comm.workspaces
    fi_reason = fib.static_reason(comm)
    out = {}
    for t in (1, 32, 33, 512, 513):  # 128 B per token: FlashInfer one-shot <= 32 tokens, two-shot <= 512
        c = comm.plan(t)["fused_add_rmsnorm"]
        out[t] = (c.preferred, c.path, c.fallback)
    inp = make_inputs(5, world, 7, 64, torch.bfloat16)
    got, res = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, 1e-6)
    ref_out, ref_res = oracle(inp, 1e-6)
    assert_close(res, ref_res, torch.bfloat16, "residual_out")
    assert_close(got, ref_out, torch.bfloat16, "out")
    ran = comm.last_path["fused_add_rmsnorm"]
    comm.close()
    return out, fi_reason, ran, "flashinfer" in sys.modules


def test_plan_falls_back_to_reference_with_reason(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TABLE))
    res = run_on_ranks(_gloo_plans, 2, str(path))
    assert res[0][0] == res[1][0], "plans must be identical on every rank"
    plans, fi_reason, ran, imported = res[0]
    assert fi_reason and ("not importable" in fi_reason or "needs an NCCL group" in fi_reason), fi_reason
    assert [plans[t][0] for t in (1, 32, 33, 512, 513)] == ["flashinfer_oneshot"] * 2 + ["flashinfer_twoshot"] * 2 + \
        ["nccl"]
    for t, (preferred, path_, why) in plans.items():
        assert path_ == "reference", (t, path_)
        if preferred in FI:
            # the FlashInfer reason, then why nccl could not take it either
            assert why.startswith(fi_reason) and "needs an NCCL group, or one-GPU mode (this one is gloo" in why, why
    assert ran == "reference" and not imported


def _forced(rank, world, path):
    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=64, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(force_paths={"fused_add_rmsnorm": path}))
    msgs = []
    err = comm.plan(4)["fused_add_rmsnorm"].error
    assert re.match(rf"CommConfig.force_paths\['fused_add_rmsnorm'\] = '{path}' cannot run here: ", err), err
    msgs.append(err)
    inp = make_inputs(1, world, 4, 64, torch.bfloat16)
    with pytest.raises(TPFuseError, match="cannot run here") as e:  # raised before any collective, on every rank
        comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight)
    msgs.append(str(e.value))
    comm.close()
    return msgs


@pytest.mark.parametrize("path", FI)
def test_forced_flashinfer_raises_on_cpu(path):
    msgs = run_on_ranks(_forced, 2, path)[0]
    want = fib.static_reason(_fake(backend="gloo"))
    assert want and all(m.endswith(want) for m in msgs), (msgs, want)


class _WS:
    """Stands in for a FlashInfer workspace whose calls all go to the fallback."""

    def __init__(self, tp):
        self.rows, self.tp = 64, tp


def _fallback_reports(rank, world, kind, gemma):
    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=64, dtype=torch.bfloat16)
    comm.workspaces[fib.NAME] = _WS(world)
    inp = make_inputs(3, world, 5, 64, torch.bfloat16)
    ref_out, ref_res = oracle(inp, 1e-6, gemma=gemma)
    spec = make_spec(kind, "cpu", ref_out)
    # the route the plan would hold on a GPU pair whose table picks FlashInfer (on gloo it never does)
    op, planned = "fused_add_rmsnorm", "flashinfer_oneshot"
    comm._routes[(op, 5)] = (planned, dispatch.implementation(op, planned), dispatch._decline_chain(op, planned, comm))
    out, res = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, 1e-6, quant=spec, gemma=gemma)
    assert_close(res, ref_res, torch.bfloat16, "residual_out")
    if spec is None:
        assert_close(out, ref_out, torch.bfloat16, "out")
    else:
        assert_quant_close(out, ref_out, f"{kind} out")
    ran, why = comm.last_path[op], comm.last_fallback[op]
    del comm.workspaces[fib.NAME]
    comm.close()
    return ran, why


@pytest.mark.parametrize("kind,gemma,word", [("nvfp4", False, "NVFP4"), ("fp8_token", False, "dynamic FP8"),
                                             (None, True, "gemma")])
def test_fallback_reports_the_path_that_ran(kind, gemma, word):
    # on gloo neither tpfuse_oneshot nor nccl can run: the chain ends at the reference path, and last_path says so
    ran, why = run_on_ranks(_fallback_reports, 2, kind, gemma)[0]
    assert ran == "reference" and why.startswith("flashinfer_oneshot -> reference: ") and word in why, (ran, why)


# ------------------------------------------------------------------------------------------------------------------
# vLLM's policy as a thresholds table


def test_vllm_policy_table_is_valid_and_cites_vllm():
    table = thresholds.load(POLICY)
    for row in table.rows:
        assert row.source.get("kind") and row.source.get("project") == "vLLM" and row.source.get("commit"), row.key()
    row = table.lookup("sm90", 2, "bfloat16", 8192)
    assert row.key() == "sm90/tp2/*"
    assert row.paths["fused_add_rmsnorm"] == [(32 * MiB, "flashinfer_oneshot"), (64 * MiB, "flashinfer_twoshot"),
                                              (None, "nccl")]
    assert all(b == [(None, "nccl")] for op, b in row.paths.items() if op != "fused_add_rmsnorm")
    assert table.lookup("sm90", 4, "bfloat16").arch == "*"  # only TP=2 is modelled
    assert table.lookup("sm100", 2, "bfloat16").arch == "*"


def _policy_plans(rank, world):
    comm = tpfuse.TPCommunicator(max_tokens=16384, hidden_size=8192, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(arch="sm90", thresholds_path=POLICY))
    out = {t: (comm.plan(t)["fused_add_rmsnorm"].preferred, comm.plan(t).mode) for t in (1, 2048, 2049, 4096, 4097,
                                                                                      16384)}
    comm.close()
    return out


def test_vllm_policy_plans():
    # hidden 8192 bf16 = 16 KiB per token: one-shot up to 2048 tokens (32 MiB), two-shot up to 4096 (64 MiB)
    plans = run_on_ranks(_policy_plans, 2)[0]
    assert {t: p for t, (p, _) in plans.items()} == {1: "flashinfer_oneshot", 2048: "flashinfer_oneshot",
                                                     2049: "flashinfer_twoshot", 4096: "flashinfer_twoshot",
                                                     4097: "nccl", 16384: "nccl"}
    assert {m for _, m in plans.values()} == {"allreduce"}  # vLLM's default: no sequence parallelism
