"""GPU, TP = 2 / 4 / 8 (``cases.GPU_TPS``; NCCL with a GPU per rank, else one-GPU mode): tpfuse's fused all-reduce +
add + RMSNorm (+quant) kernels (``tpfuse_oneshot`` / ``tpfuse_twoshot`` / ``tpfuse_oneshot_pipe``,
:mod:`tpfuse.backends.fused_allreduce`) vs the fp64 oracle; the path the dispatcher reports; CUDA-graph replays
with fresh data; a late peer; NaN propagation; FP8 outliers on a non-zero rank; a skipped call raising
TPFusePeerTimeout; the dispatcher's Decline walk onto these kernels (and NCCL)."""

import time

import pytest
import torch

from cases import (assert_path_ran, fused_ar_graph_replays, gpu_tp_params, make_comm, make_inputs, make_spec,
                   norm_of_residual, oracle, run_gpu)
from harness import gpu_backend
from tpfuse.distributed import ranks_per_device
from tpfuse.errors import TPFusePeerTimeout
from tpfuse.tolerance import assert_close, assert_quant_close

pytestmark = [pytest.mark.gpu]

DT = torch.bfloat16
EPS = 1e-6
PATHS = ("tpfuse_oneshot", "tpfuse_twoshot", "tpfuse_oneshot_pipe")


def _comm(path, hidden, max_tokens=8192, **cfg):
    return make_comm(hidden, DT, max_tokens, force=path, **cfg)


def _check(comm, rank, world, seed, t, h, *, kind=None, with_res=True, gemma=False, outlier=None, what=""):
    dev = comm.device
    inp = make_inputs(seed, world, t, h, DT, outlier_rank=outlier, device=dev)
    ref_out, ref_res = oracle(inp, EPS, with_residual=with_res, gemma=gemma)
    spec = make_spec(kind, dev, ref_out)
    out, res = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual if with_res else None, inp.weight, EPS,
                                      quant=spec, gemma=gemma)
    assert_path_ran(comm, "fused_add_rmsnorm", t, what)
    tag = f"{what} T={t} H={h} quant={kind} res={with_res} gemma={gemma}"
    assert_close(res, ref_res, DT, tag + " residual_out")
    if spec is None:
        assert out.dtype == DT and out.shape == (t, h)
        assert_close(out, ref_out, DT, tag + " out")
    else:
        assert_quant_close(out, ref_out, tag + " out")


def _sweep(rank, world, path, hidden, tokens, kinds):
    comm = _comm(path, hidden)
    # one program per SM; in one-GPU mode half the SMs divided among the processes sharing the GPU (this test's
    # ranks, or every concurrent job's with TPFUSE_ONE_GPU_PROCESSES)
    sms = torch.cuda.get_device_properties(comm.device).multi_processor_count
    want = sms // (2 * ranks_per_device()) if gpu_backend(world) == "onegpu" else sms
    assert gpu_backend(world) != "onegpu" or ranks_per_device() >= -(-world // torch.cuda.device_count())
    assert comm.workspaces["fused_allreduce"].grid == want, (comm.workspaces["fused_allreduce"].grid, want)
    n = 0
    for i, t in enumerate(tokens):
        for kind in kinds:
            _check(comm, rank, world, 100 + i, t, hidden, kind=kind, what=path)
            n += 1
        _check(comm, rank, world, 200 + i, t, hidden, with_res=False, what=path)
        _check(comm, rank, world, 300 + i, t, hidden, gemma=True, what=path)
        # plain all-reduce through the same kernels
        inp = make_inputs(400 + i, world, t, hidden, DT, device=comm.device)
        y = comm.all_reduce(inp.xs[rank])
        assert comm.last_path["all_reduce"] == path
        assert_close(y, inp.total(), DT, f"{path} all_reduce T={t}")
    torch.cuda.synchronize()
    comm.close()
    return n


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hidden,tokens", [(4096, [1, 2, 3, 7, 64, 127, 1000, 2049, 8192]),
                                           (5120, [1, 5, 333]), (2880, [1, 17, 4095]), (2048, [3, 8191]),
                                           (8192, [1, 129, 2048])])
def test_fused_ar_bf16_fp8(tp, path, hidden, tokens):
    assert run_gpu(_sweep, tp, path, hidden, _tokens_at(tp, tokens), [None, "fp8_static"], timeout_s=400)


def _tokens_at(tp: int, tokens):
    """The sweep's token counts at TP ``tp``: all at TP=2; every other one (the smallest kept) from TP=4, where
    every rank builds TP x the inputs for the oracle and, in one-GPU mode, each call costs several time slices."""
    return list(tokens) if tp == 2 else list(tokens)[::2]


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("path", PATHS)
def test_fused_ar_other_formats(tp, path):
    kinds = ["fp8_token", "fp8_group128", "fp8_group64", "nvfp4", "nvfp4_linear"]
    assert run_gpu(_sweep, tp, path, 4096, [1, 3, 200, 1025], kinds, timeout_s=400)


def _outliers_nan(rank, world, path):
    comm = _comm(path, 4096)
    last = world - 1  # outliers on the last rank: its pushes land last in rank-ordered sums
    for kind in ("fp8_static", "fp8_token", "fp8_group128", "nvfp4"):
        for t in (1, 33, 600):
            _check(comm, rank, world, 7, t, 4096, kind=kind, outlier=last, what=f"{path} outlier rank {last}")
    # NaN / Inf on a non-zero rank propagate to every rank's output
    inp = make_inputs(8, world, 9, 4096, DT, device=comm.device)
    inp.xs[last][2, 5] = float("nan")
    inp.xs[last][4, 7] = float("inf")
    ref_out, ref_res = oracle(inp, EPS)
    out, res = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, EPS)
    assert torch.isnan(out[2]).all() and torch.isnan(res[2, 5]) and torch.isinf(res[4, 7])
    fin = torch.isfinite(ref_res)
    assert torch.equal(torch.isfinite(res), fin) and torch.equal(torch.isnan(res), torch.isnan(ref_res))
    assert_close(res[fin], ref_res[fin], DT, "NaN/Inf residual_out (finite part)")
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out))  # rows 2 and 4 (Inf -> Inf/Inf = NaN) are NaN
    ok = ~torch.isnan(ref_out)
    assert_close(out[ok], ref_out[ok], DT, "NaN out (other rows)")
    torch.cuda.synchronize()
    comm.close()
    return True


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("path", PATHS)
def test_outliers_and_nan(tp, path):
    assert run_gpu(_outliers_nan, tp, path, timeout_s=300) == [True] * tp


def _graph_late_auto(rank, world, path, t, replays):
    h = 4096
    comm = _comm(path, h)
    # late peer: the last rank arrives ~100 ms late
    for i in range(3):
        if rank == world - 1:
            torch.cuda._sleep(200_000_000)
        _check(comm, rank, world, 50 + i, t, h, kind="fp8_static" if i == 2 else None, what=f"{path} late peer")
    # CUDA graph of two calls, replayed with fresh data copied into the static inputs
    checked = fused_ar_graph_replays(
        comm, rank, world, t, h, DT, EPS, replays=replays, check_every=97,
        check_out2=lambda out2, res1, w, ref2, what: assert_quant_close(out2, ref2, what))
    torch.cuda.synchronize()
    comm.synchronize()
    comm.close()
    return checked


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("path,t", [("tpfuse_oneshot", 5), ("tpfuse_twoshot", 301), ("tpfuse_oneshot_pipe", 1500)])
def test_graph_replays_and_late_peer(tp, path, t):
    replays = 1000 if tp == 2 else 300  # one-GPU mode: each replay's waits cost time slices that grow with TP
    checked = len(range(0, replays, 97)) + ((replays - 1) % 97 != 0)
    assert run_gpu(_graph_late_auto, tp, path, t, replays, timeout_s=400) == [checked] * tp


def _auto(rank, world):
    comm = _comm(None, 4096)
    ran, planned = [], []
    for i, t in enumerate([1, 64, 256, 257, 1024, 4096, 8192]):
        _check(comm, rank, world, 70 + i, t, 4096, what="auto")
        ran.append(comm.last_path["fused_add_rmsnorm"])
        planned.append(comm.plan(t).path("fused_add_rmsnorm"))
    torch.cuda.synchronize()
    comm.close()
    return ran, planned


@pytest.mark.parametrize("tp", gpu_tp_params())
def test_auto_dispatch_reports_the_path_that_ran(tp):
    # whatever the shipped table picks at each size (it is retuned), the path that ran is the one plan() reports,
    # identically on every rank, and never the reference (TP 4/8 rows route to NCCL until tuned: in one-GPU mode
    # that is the same math on the gloo group)
    res = run_gpu(_auto, tp, timeout_s=300)
    ran, planned = res[0]
    assert ran == planned and all(r == res[0] for r in res), res
    fused = {"tpfuse_oneshot", "tpfuse_twoshot", "tpfuse_oneshot_pipe", "nccl"}
    assert set(ran) <= fused, res
    assert tp != 2 or "tpfuse_oneshot" in ran, res  # the shipped sm90 TP=2 row: one-shot at small sizes


def _skip_call(rank, world, path):
    with _comm(path, 2048, max_tokens=64) as warm:  # the kernel compiled on every rank under the default bound
        inp = make_inputs(1, world, 8, 2048, DT, device=warm.device)
        warm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, EPS)
        warm.synchronize()
    comm = _comm(path, 2048, max_tokens=64, timeout_s=5.0)
    comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, EPS)
    comm.synchronize()
    if rank == 1:
        return "skipped"  # rank 1 skips the next call: the others must give up within timeout_s, not hang
    t0 = time.monotonic()
    comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, EPS)
    with pytest.raises(TPFusePeerTimeout, match="peer did not arrive within 5 s"):
        comm.synchronize()
    waited = time.monotonic() - t0
    assert 4.0 <= waited < 30.0, waited
    with pytest.raises(TPFusePeerTimeout):  # stays broken
        comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, EPS)
    comm.close()
    return round(waited, 2)


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("path", PATHS)
def test_skipped_call_raises_peer_timeout(tp, path):
    res = run_gpu(_skip_call, tp, path, timeout_s=120)
    assert res[1] == "skipped" and all(isinstance(w, float) for r, w in enumerate(res) if r != 1), res


def _two_comms_rebuild_subgroups(rank, world):
    """Two communicators on one group, calls interleaved; one closed while the other goes on; a rebuilt one; then
    DP x TP: the world split into two TP groups of ``world / 2`` ranks (from TP=4), each with its own communicator
    and its own data, so cross-talk between the groups' buffers would show in the other group's results."""
    import torch.distributed as dist

    h, t = 2048, 17
    a, b = _comm("tpfuse_oneshot", h, max_tokens=64), _comm("tpfuse_twoshot", h, max_tokens=64)
    for i in range(3):
        _check(a, rank, world, 900 + i, t, h, what="comm a")
        _check(b, rank, world, 910 + i, t, h, what="comm b")
    a.close()
    _check(b, rank, world, 920, t, h, what="comm b after a closed")
    a = _comm("tpfuse_oneshot", h, max_tokens=64)
    _check(a, rank, world, 930, t, h, what="comm a rebuilt")
    for c in (a, b):
        c.synchronize()
        c.close()
    if world < 4:
        return 1
    tp = world // 2
    groups = [dist.new_group(list(range(g * tp, (g + 1) * tp))) for g in range(2)]  # every rank makes every group
    mine = rank // tp
    sub = make_comm(h, DT, 64, group=groups[mine], force="tpfuse_oneshot")
    assert sub.tp == tp and sub.rank == rank % tp
    for i in range(3):
        _check(sub, sub.rank, tp, 940 + 10 * mine + i, t, h, what=f"TP group {mine}")
    sub.synchronize()
    sub.close()
    return 2


@pytest.mark.parametrize("tp", gpu_tp_params())
def test_two_communicators_rebuild_and_subgroups(tp):
    assert run_gpu(_two_comms_rebuild_subgroups, tp, timeout_s=300) == [1 if tp < 4 else 2] * tp


class _DecliningFlashInfer:
    """Stands in for a FlashInfer workspace (none exists without NCCL): the call forms below are ones FlashInfer's
    kernels cannot produce, so the planned FlashInfer path declines each call (its own ``call_reason``)."""

    def __init__(self, tp):
        self.rows, self.tp = 64, tp


DECLINED_FORMS = (("nvfp4", False, "NVFP4"), ("fp8_token", False, "dynamic FP8"), (None, True, "gemma"))


def _decline_walk(rank, world, planned, force, allowed):
    """The dispatcher's Decline walk with real kernels behind it: a route planned to FlashInfer (planted, as a
    GPU pair's table would plan it) declines; the call runs on the first usable path of its chain, vs the oracle."""
    import tpfuse.backends.flashinfer as fib
    from tpfuse import dispatch

    op, t, h = "fused_add_rmsnorm", 17, 2048
    comm = _comm(force, h, max_tokens=64, **({"allowed_paths": allowed} if allowed else {}))
    comm.workspaces[fib.NAME] = _DecliningFlashInfer(world)
    comm._routes[(op, t)] = (planned, dispatch.implementation(op, planned), dispatch._decline_chain(op, planned, comm))
    walked, to_nccl = [], allowed is not None  # the nccl path sums in bf16 (cases.norm_of_residual)
    for i, (kind, gemma, word) in enumerate(DECLINED_FORMS):
        inp = make_inputs(500 + i, world, t, h, DT, outlier_rank=world - 1, device=comm.device)
        ref_out, ref_res = oracle(inp, EPS, gemma=gemma)
        spec = make_spec(kind, comm.device, ref_out)
        out, res = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight, EPS, quant=spec, gemma=gemma)
        ran, why = comm.last_path[op], comm.last_fallback[op]
        assert_close(res, ref_res, DT, f"declined {kind} residual_out")
        if spec is None:
            assert_close(out, ref_out, DT, f"declined gemma={gemma} out")
        elif to_nccl:
            assert_quant_close(out, norm_of_residual(res, inp.weight, EPS, gemma),
                               f"declined {kind} out", scale_rtol=2.0 ** -7)
        else:
            assert_quant_close(out, ref_out, f"declined {kind} out")
        assert why.startswith(f"{planned} -> {ran}: ") and word in why, why
        walked.append(ran)
    del comm.workspaces[fib.NAME]
    comm.synchronize()
    comm.close()
    return walked


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("planned,force,allowed,expect", [
    ("flashinfer_oneshot", "tpfuse_oneshot", None, "tpfuse_oneshot"),  # its registered declines_to
    ("flashinfer_twoshot", "tpfuse_twoshot", None, "tpfuse_twoshot"),
    ("flashinfer_oneshot", None, ("nccl",), "nccl"),  # declines_to not allowed: the next link (host-staged here)
])
def test_declined_call_walks_to_the_next_path(tp, planned, force, allowed, expect):
    assert run_gpu(_decline_walk, tp, planned, force, allowed, timeout_s=200) == [[expect] * 3] * tp
