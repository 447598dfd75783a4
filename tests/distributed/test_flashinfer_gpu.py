"""GPU pair: FlashInfer's trtllm fused kernel as tpfuse paths (``flashinfer_oneshot`` / ``flashinfer_twoshot``,
:mod:`tpfuse.backends.flashinfer`) forced through ``CommConfig.force_paths``: bf16 and FP8-static outputs vs the fp64
oracle at 1..2048 tokens (power-of-two and other hidden sizes), a missing residual, the plain all-reduce, the calls
FlashInfer cannot do (NVFP4, dynamic FP8, gemma, fp32 norm weight, two-shot with T <= TP) reported as the tpfuse
kernel that ran, a hidden size its launcher cannot handle refused with the reason, CUDA-graph replays, and close().

Needs FlashInfer (``pip install "tpfuse[flashinfer]"``; on the lent machines the carried wheels, see gpu_run.sh). The
first workspace JIT-builds FlashInfer's comm module (~100 s on a fresh machine)."""

import importlib.util
import os

import pytest
import torch

import tpfuse
from cases import fused_ar_graph_replays, make_comm, make_inputs, make_spec, oracle
from harness import run_on_ranks
from tpfuse.tolerance import REL_ERR_FP8, assert_close, assert_quant_close, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA GPUs (runs on the GPU pair)"),
              pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                                 reason='needs FlashInfer (pip install "tpfuse[flashinfer]")')]

DT = torch.bfloat16
EPS = 1e-6
PATHS = ("flashinfer_oneshot", "flashinfer_twoshot")
POLICY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench", "policies",
                      "vllm_sm90_tp2.json")
TIMEOUT = 500  # the first FlashInfer workspace of a fresh machine JIT-builds for ~100 s


def _comm(path, hidden, max_tokens=2048):
    return make_comm(hidden, DT, max_tokens, force=path)


def _expected(path, t, world):
    """What must run: FlashInfer, except its two-shot at T <= TP, which goes to tpfuse's two-shot."""
    return path if path == "flashinfer_oneshot" or t > world else "tpfuse_twoshot"


def _fi_model(xs, residual, weight, eps):
    """FlashInfer's documented roundings on the exact inputs (fp64 otherwise): the fp32 sum of the ranks rounded to
    the input dtype, the residual added in that dtype, the normalised value rounded to it before quantizing."""
    s = sum(x.float() for x in xs).to(DT)
    if residual is not None:
        s = (s.float() + residual.float()).to(DT)
    sd = s.double()
    return (sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(DT).double()


def _assert_fp8_static(out, xs, residual, weight, ref_out, tag, flashinfer):
    """FP8-static output vs the fp64 oracle. tpfuse's kernels: every element within one e4m3 step of the oracle.
    FlashInfer rounds the sum to bf16 before adding the residual, so where sum and residual cancel its error is
    bf16-sized relative to the sum, not to the (small) result, and can exceed one e4m3 step there; it is held to
    (1) the FP8 relative-norm budget against the fp64 oracle (saturated values compared at +-448 * scale) and
    (2) one e4m3 step of its own rounding model (:func:`_fi_model`), which is itself within the bf16 budget of the
    oracle."""
    if not flashinfer:
        assert_quant_close(out, ref_out, tag)
        return
    lim = 448.0 * float(out.spec.scale)
    err = rel_err(out.dequantize(torch.float32).double(), ref_out.clamp(-lim, lim))
    assert err <= REL_ERR_FP8, f"{tag}: relative error {err:.3e} > {REL_ERR_FP8} vs the fp64 oracle"
    model = _fi_model(xs, residual, weight, EPS)
    assert_close(model, ref_out, DT, tag + " FlashInfer's rounding model vs oracle")
    assert_quant_close(out, model, tag + " vs FlashInfer's rounding model")


def _check(comm, rank, world, seed, t, h, expect, *, kind=None, with_res=True, gemma=False, weight_dtype=None,
           outlier=None, what=""):
    inp = make_inputs(seed, world, t, h, DT, weight_dtype=weight_dtype, outlier_rank=outlier, device=comm.device)
    ref_out, ref_res = oracle(inp, EPS, with_residual=with_res, gemma=gemma)
    spec = make_spec(kind, comm.device, ref_out)
    comm.last_fallback.clear()  # what this call declines (if anything) is all that is left in it
    out, res = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual if with_res else None, inp.weight, EPS,
                                      quant=spec, gemma=gemma)
    tag = f"{what} T={t} H={h} quant={kind} res={with_res} gemma={gemma} w={weight_dtype}"
    ran, why = comm.last_path["fused_add_rmsnorm"], comm.last_fallback.get("fused_add_rmsnorm")
    assert ran == expect, f"{tag}: ran {ran}, expected {expect} ({why})"
    planned = comm.plan(t).path("fused_add_rmsnorm")
    if ran == planned:
        assert why is None, tag
    else:
        assert why.startswith(f"{planned} -> {ran}: "), (tag, why)
    assert_close(res, ref_res, DT, tag + " residual_out")
    if spec is None:
        assert out.dtype == DT and out.shape == (t, h)
        assert_close(out, ref_out, DT, tag + " out")
    elif kind == "fp8_static":
        _assert_fp8_static(out, inp.xs, inp.residual if with_res else None, inp.weight, ref_out, tag + " out",
                           ran.startswith("flashinfer"))
    else:
        assert_quant_close(out, ref_out, tag + " out")


def _sweep(rank, world, path, hidden, tokens):
    comm = _comm(path, hidden)
    ws = comm.workspaces.get("flashinfer")
    assert ws is not None and ws.reason is None and ws.rows == 2048, (ws and ws.reason)
    assert "fused_allreduce" in comm.workspaces  # tpfuse's kernels, for the fallback
    for i, t in enumerate(tokens):
        exp = _expected(path, t, world)
        for kind in (None, "fp8_static"):
            _check(comm, rank, world, 100 + i, t, hidden, exp, kind=kind, what=path)
        _check(comm, rank, world, 200 + i, t, hidden, exp, with_res=False, what=path)  # zero residual
        _check(comm, rank, world, 300 + i, t, hidden, exp, kind="fp8_static", outlier=1, what=path + " outlier")
        inp = make_inputs(400 + i, world, t, hidden, DT, device=comm.device)
        y = comm.all_reduce(inp.xs[rank])
        assert comm.last_path["all_reduce"] == exp, (t, comm.last_path)
        assert_close(y, inp.total(), DT, f"{path} all_reduce T={t}")
    torch.cuda.synchronize()
    comm.close()
    return len(tokens)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hidden,tokens", [(4096, [1, 2, 3, 7, 64, 127, 128, 1000, 2048]),
                                           (8192, [1, 5, 333, 2048]),
                                           (5120, [1, 3, 17, 1500])])  # not a power of two (FlashInfer launches it)
def test_flashinfer_bf16_fp8_vs_oracle(path, hidden, tokens):
    assert run_on_ranks(_sweep, 2, path, hidden, tokens, backend="nccl", timeout_s=TIMEOUT) == [len(tokens)] * 2


def _fallbacks(rank, world, path):
    comm = _comm(path, 4096)
    shots = "tpfuse_oneshot" if path == "flashinfer_oneshot" else "tpfuse_twoshot"
    cases = [dict(kind="nvfp4"), dict(kind="nvfp4_linear"), dict(kind="fp8_token"), dict(kind="fp8_group128"),
             dict(gemma=True), dict(weight_dtype=torch.float32), dict(kind="nvfp4", with_res=False)]
    ran = []
    for i, kw in enumerate(cases):
        for t in (3, 200):
            _check(comm, rank, world, 500 + i, t, 4096, shots, what=f"{path} fallback", **kw)
            ran.append(comm.last_fallback["fused_add_rmsnorm"])
            # the next call FlashInfer can do runs on FlashInfer again (and says so)
            _check(comm, rank, world, 600 + i, t, 4096, path, what=f"{path} after fallback")
    torch.cuda.synchronize()
    comm.close()
    return ran


@pytest.mark.parametrize("path", PATHS)
def test_unsupported_calls_report_the_tpfuse_kernel(path):
    whys = run_on_ranks(_fallbacks, 2, path, backend="nccl", timeout_s=TIMEOUT)[0]
    assert all(w.startswith(f"{path} -> tpfuse_") for w in whys), whys
    text = " ".join(whys)
    assert "NVFP4" in text and "dynamic FP8" in text and "gemma" in text and "norm weight float32" in text


def _unsupported_hidden(rank, world):
    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=2880, dtype=DT,
                                 config=tpfuse.CommConfig(force_paths={"fused_add_rmsnorm": "flashinfer_oneshot"}))
    assert "flashinfer" not in comm.workspaces  # never allocated for a hidden size FlashInfer cannot launch
    assert "flashinfer_oneshot' cannot run here: hidden 2880 unsupported" in comm.plan(8)["fused_add_rmsnorm"].error
    comm.close()
    # a table preferring FlashInfer (vLLM's policy) falls back to NCCL there, saying why, and runs NCCL
    pol = tpfuse.TPCommunicator(max_tokens=64, hidden_size=2880, dtype=DT,
                                config=tpfuse.CommConfig(thresholds_path=POLICY))
    c = pol.plan(8)["fused_add_rmsnorm"]
    assert (c.preferred, c.path) == ("flashinfer_oneshot", "nccl") and "hidden 2880 unsupported" in c.fallback, c
    inp = make_inputs(11, world, 8, 2880, DT, device=pol.device)
    out, res = pol.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, EPS)
    ref_out, ref_res = oracle(inp, EPS)
    assert pol.last_path["fused_add_rmsnorm"] == "nccl"
    assert_close(res, ref_res, DT, "nccl fallback residual_out")
    assert_close(out, ref_out, DT, "nccl fallback out")
    pol.close()
    # on a supported one, every static check passes here (sm90+, NCCL, TP 2, bf16, FlashInfer importable)
    ok = tpfuse.TPCommunicator(max_tokens=64, hidden_size=4096, dtype=DT)
    from tpfuse.backends import flashinfer as fib

    reason = fib.static_reason(ok)
    ok.close()
    return reason


def test_unsupported_hidden_is_refused_with_reason():
    assert run_on_ranks(_unsupported_hidden, 2, backend="nccl", timeout_s=TIMEOUT) == [None, None]


def _graph(rank, world, path, t):
    h = 4096
    comm = _comm(path, h)
    checked = fused_ar_graph_replays(
        comm, rank, world, t, h, DT, EPS, replays=300, check_every=37,
        check_out2=lambda out2, res1, w, ref2, what: _assert_fp8_static(out2, [res1] * world, res1, w, ref2, what,
                                                                         True))
    assert comm.last_path["fused_add_rmsnorm"] == path
    torch.cuda.synchronize()
    comm.close()
    return checked


@pytest.mark.parametrize("path,t", [("flashinfer_oneshot", 5), ("flashinfer_twoshot", 301)])
def test_graph_replays(path, t):
    assert run_on_ranks(_graph, 2, path, t, backend="nccl", timeout_s=TIMEOUT) == [10, 10]


def _close_and_rebuild(rank, world):
    sizes = []
    for i in range(3):  # the IPC buffers are freed by close() and a new communicator builds its own
        comm = _comm("flashinfer_oneshot", 4096, max_tokens=256)
        sizes.append(comm.workspaces["flashinfer"].rows)
        _check(comm, rank, world, 900 + i, 17, 4096, "flashinfer_oneshot", what="rebuild")
        ws = comm.workspaces["flashinfer"]
        comm.close()
        assert ws.ipc is None and ws.reason == "closed" and "flashinfer" not in comm.workspaces
        comm.close()  # idempotent
    return sizes


def test_close_releases_and_rebuilds():
    assert run_on_ranks(_close_and_rebuild, 2, backend="nccl", timeout_s=TIMEOUT) == [[256] * 3] * 2
