"""FP8 (e4m3) GEMM ops of the communicator (:mod:`tpfuse.scaled_gemm`): ``all_gather_matmul``,
``matmul_reduce_scatter`` and ``matmul_reduce_scatter_rmsnorm`` with per-tensor and row-wise scales, vs an fp64
oracle from the dequantized operands, on TP 1/2/4/8 (gloo: the reference path; NCCL too where GPUs exist).
Also: QuantizedActivation inputs, uneven and empty shards, bad scales (every rank raises, the communicator stays
usable), and torch.compile(fullgraph=True). Operands: tests/distributed/fp8_cases.py."""

import pytest
import torch

import tpfuse
from cases import assert_each_raises, assert_path_ran, every_world, make_comm, norm_of_residual
from fp8_cases import KINDS, ag_case, rs_case
from harness import device_of, run_on_ranks
from tpfuse.errors import TPFuseInputError
from tpfuse.reference import rmsnorm_math
from tpfuse.sharding import shard_range
from tpfuse.tolerance import assert_close, assert_quant_close

BF = torch.bfloat16
H, N_SHARD, K_SHARD = 64, 32, 48


def _ran(comm, op, t):
    """The planned path ran; on gloo that is the reference path."""
    return assert_path_ran(comm, op, t, expect="reference" if comm.device.type == "cpu" else None)


def _fp8_cases(rank, world, backend):
    dev = device_of(backend)
    comm = tpfuse.TPCommunicator(max_tokens=40, hidden_size=H, dtype=BF)
    for i, t in enumerate([1, 7, 16, 33] + ([0] if backend == "gloo" else [])):  # T=0: an empty batch
        s, e = shard_range(t, world, rank)
        for kind in KINDS:
            what = f"T={t} TP={world} {kind}"
            # column-parallel: all_gather_matmul(x_shard e4m3, w_shard_n e4m3)
            c = ag_case(10 + i, world, t, H, N_SHARD, kind, dev)
            xq, xs = c.shard(rank, world)
            y = comm.all_gather_matmul(xq, c.wq[rank], num_tokens=t, x_scale=xs, w_scale=c.ws[rank])
            _ran(comm, "all_gather_matmul", t)
            assert y.dtype == BF and y.shape == (t, N_SHARD), what
            assert_close(y, c.oracle(rank), BF, "FP8 all_gather_matmul " + what)
            # the same activation as a QuantizedActivation (what reduce_scatter_rmsnorm(quant=...) returns)
            spec = tpfuse.FP8PerToken() if kind == "row" else tpfuse.FP8Static(xs)
            qa = tpfuse.QuantizedActivation(data=xq, scale=xs if kind == "row" else spec.scale, spec=spec,
                                            orig_dtype=BF, shape=xq.shape)
            y2 = comm.all_gather_matmul(qa, c.wq[rank], num_tokens=t, w_scale=c.ws[rank])
            assert torch.equal(y2, y), what + " QuantizedActivation input"
            # row-parallel: matmul_reduce_scatter(x_shard_k e4m3, w_shard_k e4m3)
            r = rs_case(20 + i, world, t, H, K_SHARD, kind, dev)
            y = comm.matmul_reduce_scatter(r.xq[rank], r.wq[rank], x_scale=r.xs[rank], w_scale=r.ws[rank])
            _ran(comm, "matmul_reduce_scatter", t)
            assert y.dtype == BF and y.shape == (e - s, H), what
            assert_close(y, r.total(s, e), BF, "FP8 matmul_reduce_scatter " + what)
    comm.close()
    return True


test_fp8_gemm_ops = every_world(_fp8_cases)


def test_fp8_gemm_ops_tp8():
    """TP=8: several ranks hold empty shards at these token counts."""
    assert run_on_ranks(_fp8_cases, 8, "gloo") == [True] * 8


def _fp8_row_parallel_norm(rank, world, backend):
    """matmul_reduce_scatter_rmsnorm with FP8 operands == the FP8 reduce-scatter, then add + RMSNorm (+ quant)."""
    dev = device_of(backend)
    comm = tpfuse.TPCommunicator(max_tokens=16, hidden_size=H, dtype=BF)
    for i, (t, kind, quant) in enumerate([(1, "row", None), (7, "tensor", None), (9, "row", "fp8_token")]):
        r = rs_case(70 + i, world, t, H, K_SHARD, kind, dev)
        g = torch.Generator().manual_seed(80 + i)
        res = torch.randn(t, H, generator=g).to(BF).to(dev)
        nw = (1 + 0.1 * torch.randn(H, generator=g)).to(BF).to(dev)
        s, e = shard_range(t, world, rank)
        rs = r.total()
        path = comm.plan(t).path("matmul_reduce_scatter_rmsnorm")
        if path == "nccl":  # every rank's _scaled_mm rounds its partial to bf16 before the collective sums them
            rs = r.total_of_rounded(BF)
        elif path != "tpfuse_async_tp":
            rs = rs.to(BF).double()  # the unfused paths round the reduce-scatter result, then add
        full = rs + res.double()
        ref_out = rmsnorm_math(full, nw.double(), 1e-6)[s:e]
        spec = tpfuse.FP8PerToken() if quant else None
        out, res_out = comm.matmul_reduce_scatter_rmsnorm(r.xq[rank], r.wq[rank], res[s:e].contiguous(), nw, 1e-6,
                                                          quant=spec, x_scale=r.xs[rank], w_scale=r.ws[rank])
        _ran(comm, "matmul_reduce_scatter_rmsnorm", t)
        assert_close(res_out, full[s:e], BF, f"T={t} {kind} residual")
        if spec is None:
            assert_close(out, ref_out, BF, f"T={t} {kind} out")
        elif path == "nccl":  # beyond TP=2 not NCCL's order of adds: check against the values it normalised
            assert_quant_close(out, norm_of_residual(res_out, nw, 1e-6), f"T={t} {kind} {quant}",
                               scale_rtol=2.0 ** -7)
        else:
            assert_quant_close(out, ref_out, f"T={t} {kind} {quant}")
    comm.close()
    return True


test_fp8_matmul_reduce_scatter_rmsnorm = every_world(_fp8_row_parallel_norm)


# ---------------------------------------------------------------------------------------------------------------
# bad input: every rank raises the same TPFuseInputError before any collective; the communicator stays usable


def _bad_fp8_calls(c, rank, world, t):
    xq, xs = c.shard(rank, world)
    wq, ws = c.wq[rank], c.ws[rank]
    f8 = torch.float8_e4m3fn
    pt = torch.ones((), dtype=torch.float32)
    agmm = lambda comm, *a, **k: comm.all_gather_matmul(*a, num_tokens=t, **k)  # noqa: E731
    return [
        ("bf16 weight", lambda comm: agmm(comm, xq, wq.to(BF), x_scale=xs, w_scale=ws), "weight has dtype"),
        ("e5m2 x", lambda comm: agmm(comm, xq.to(torch.float8_e5m2), wq, x_scale=xs, w_scale=ws), "float8_e4m3fn"),
        ("scales on bf16 operands", lambda comm: agmm(comm, xq.to(BF), wq.to(BF), x_scale=xs, w_scale=ws),
         "x_shard has dtype torch.bfloat16"),
        ("no w_scale", lambda comm: agmm(comm, xq, wq, x_scale=xs), "needs w_scale"),
        ("no x_scale", lambda comm: agmm(comm, xq, wq, w_scale=ws), "needs x_scale"),
        ("fp64 x_scale", lambda comm: agmm(comm, xq, wq, x_scale=xs.double(), w_scale=ws), "x_scale must be float32"),
        ("x_scale shape", lambda comm: agmm(comm, xq, wq, x_scale=torch.ones(xq.shape[0], 2), w_scale=ws),
         "x_scale has shape"),
        ("1-D w_scale", lambda comm: agmm(comm, xq, wq, x_scale=xs, w_scale=ws.reshape(-1)), "w_scale has shape"),
        ("mixed kinds", lambda comm: agmm(comm, xq, wq, x_scale=pt, w_scale=ws), "both per-tensor or both row-wise"),
        ("not a tensor", lambda comm: agmm(comm, xq, wq, x_scale=1.0, w_scale=ws), "must be a torch.Tensor"),
        ("w_scale device", lambda comm: agmm(comm, xq, wq, x_scale=xs, w_scale=ws.to("meta")), "is on meta"),
        ("per-group activation", lambda comm: agmm(comm, tpfuse.QuantizedActivation(
            data=xq, scale=xs, spec=tpfuse.FP8PerGroup(16), orig_dtype=BF, shape=xq.shape), wq, w_scale=ws),
         "FP8Static .per-tensor. or FP8PerToken"),
        ("QuantizedActivation + x_scale", lambda comm: agmm(comm, tpfuse.QuantizedActivation(
            data=xq, scale=xs, spec=tpfuse.FP8PerToken(), orig_dtype=BF, shape=xq.shape), wq, x_scale=xs,
            w_scale=ws), "x_scale must be None"),
        ("K not a multiple of 16", lambda comm: comm.matmul_reduce_scatter(
            torch.zeros(t, 24, dtype=f8), torch.zeros(H, 24, dtype=f8), x_scale=pt, w_scale=pt), "multiples of 16"),
        ("RS x_scale rows", lambda comm: comm.matmul_reduce_scatter(
            torch.zeros(t, 32, dtype=f8), torch.zeros(H, 32, dtype=f8), x_scale=torch.ones(t + 1, 1),
            w_scale=torch.ones(H, 1)), r"x_scale has shape \(%d, 1\)" % (t + 1)),
        ("RS weight shape", lambda comm: comm.matmul_reduce_scatter(
            torch.zeros(t, 32, dtype=f8), torch.zeros(H, 48, dtype=f8), x_scale=pt, w_scale=pt), "weight has shape"),
    ]


def _every_rank_raises(rank, world, debug):
    t = 2 * world + 1
    comm = make_comm(H, BF, 16, debug=debug)
    c = ag_case(5, world, t, H, N_SHARD, "row")
    xq, xs = c.shard(rank, world)

    def still_usable(name):
        y = comm.all_gather_matmul(xq, c.wq[rank], num_tokens=t, x_scale=xs, w_scale=c.ws[rank])
        assert_close(y, c.oracle(rank), BF, f"after {name}")

    assert_each_raises(comm, _bad_fp8_calls(c, rank, world, t), still_usable)
    comm.close()
    # an fp16 communicator cannot run FP8 GEMMs (row-wise _scaled_mm writes only bf16)
    comm16 = tpfuse.TPCommunicator(max_tokens=16, hidden_size=H, dtype=torch.float16)
    with pytest.raises(TPFuseInputError, match="FP8 GEMMs write bf16"):
        comm16.all_gather_matmul(xq, c.wq[rank], num_tokens=t, x_scale=xs, w_scale=c.ws[rank])
    comm16.close()
    return True


@pytest.mark.parametrize("debug", [False, True])
def test_bad_fp8_input_raises_on_every_rank(debug):
    assert run_on_ranks(_every_rank_raises, 2, debug) == [True, True]


def _per_tensor_scale_mismatch(rank, world):
    """Debug mode catches ranks passing different per-tensor x scales to all_gather_matmul (one scale is used)."""
    comm = tpfuse.TPCommunicator(max_tokens=16, hidden_size=H, dtype=BF, config=tpfuse.CommConfig(debug=True))
    c = ag_case(6, world, 4, H, N_SHARD, "tensor")
    xq, xs = c.shard(rank, world)
    with pytest.raises(tpfuse.TPFuseMismatchError, match="different calls"):
        comm.all_gather_matmul(xq, c.wq[rank], num_tokens=4, x_scale=xs * (1 + rank), w_scale=c.ws[rank])
    comm.close()
    return True


def test_debug_catches_per_tensor_scale_mismatch():
    assert run_on_ranks(_per_tensor_scale_mismatch, 2) == [True, True]


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


def _block(comm, qa, wq, ws, xk, xks, wk, wks, t):
    y = comm.all_gather_matmul(qa, wq, num_tokens=t, w_scale=ws)
    z = comm.matmul_reduce_scatter(xk, wk, x_scale=xks, w_scale=wks)
    return y, z


def _compiled_equals_eager(rank, world):
    torch._dynamo.reset()
    t = 6
    c = ag_case(31, world, t, H, N_SHARD, "row")
    r = rs_case(32, world, t, H, K_SHARD, "tensor")
    xq, xs = c.shard(rank, world)
    qa = tpfuse.QuantizedActivation(data=xq, scale=xs, spec=tpfuse.FP8PerToken(), orig_dtype=BF, shape=xq.shape)
    comm = tpfuse.TPCommunicator(max_tokens=16, hidden_size=H, dtype=BF)
    args = (qa, c.wq[rank], c.ws[rank], r.xq[rank], r.xs[rank], r.wq[rank], r.ws[rank], t)
    eager = _block(comm, *args)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(lambda *a: _block(comm, *a), fullgraph=True, backend=backend)(*args)
    for a, b in zip(eager, compiled):
        assert a.dtype == BF and torch.equal(a, b)
    for op in ("all_gather_matmul", "matmul_reduce_scatter"):
        assert any(f"tpfuse.comm_{op}" in s for s in seen), (op, seen)
    comm.close()
    return True


def test_fp8_compile_fullgraph():
    assert run_on_ranks(_compiled_equals_eager, 2, timeout_s=300) == [True, True]


# ---------------------------------------------------------------------------------------------------------------
# the GEMM helper of the nccl / async-TP paths (torch._scaled_mm), where this torch build runs it on the CPU


def _cpu_scaled_mm() -> bool:
    f8 = torch.float8_e4m3fn
    try:
        torch._scaled_mm(torch.zeros(16, 16, dtype=f8), torch.zeros(16, 16, dtype=f8).t(), torch.ones(()),
                         torch.ones(()), out_dtype=BF)
        return True
    except Exception:  # noqa: BLE001 - builds without a CPU FP8 GEMM
        return False


@pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch build has no CPU torch._scaled_mm for e4m3")
@pytest.mark.parametrize("kind", KINDS)
def test_scaled_gemm_mm_into_row_slices(kind):
    """``scaled_gemm.mm`` of token chunks (row slices of x and its scales, one starting off a 16-byte boundary)
    into row slices of one output, vs the fp64 oracle; empty chunks write nothing."""
    from fp8_cases import dequant
    from tpfuse import scaled_gemm

    r = rs_case(3, 1, 37, N_SHARD, K_SHARD, kind)
    x, xs, w, ws = r.xq[0], r.xs[0], r.wq[0], r.ws[0]
    out = torch.full((40, N_SHARD), float("nan"), dtype=BF)
    for start, n in [(0, 37), (5, 10), (17, 0)]:
        a_scale = xs if kind == "tensor" else xs[start:start + n]
        y = scaled_gemm.mm(x[start:start + n], w, a_scale, ws, out=out[2:2 + n])
        assert y.shape == (n, N_SHARD) and (n == 0 or y.data_ptr() == out[2].data_ptr())
        ref = dequant(x[start:start + n], a_scale) @ dequant(w, ws).t()
        assert_close(y, ref, BF, f"scaled_gemm.mm {kind} rows [{start}, {start + n})")
