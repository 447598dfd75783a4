"""GPU, TP = 2 / 4 / 8 (``cases.GPU_TPS``; NCCL with a GPU per rank, else one-GPU mode): the async-TP path (``tpfuse_async_tp``) of all_gather_matmul / matmul_reduce_scatter vs an fp64
oracle, uneven token counts, CUDA-graph replays with fresh data, and the path the dispatcher reports; bf16 and FP8
(e4m3 with per-tensor and row-wise scales, :mod:`tpfuse.scaled_gemm`) on every path (reference, nccl, async TP) at
Llama-3.1-8B / 70B shard shapes; bounded waits: a late peer is fine, a skipped call of any async-TP / SP op raises
TPFusePeerTimeout within ``timeout_s`` on every other rank and a new communicator works afterwards (the CUDA
context is intact)."""

import time

import pytest
import torch
import torch.distributed as dist

import tpfuse
from cases import assert_path_ran, gpu_tp_params, run_gpu
from fp8_cases import ag_case, rs_case
from kernel_env import capture
from tpfuse.errors import TPFusePeerTimeout
from tpfuse.sharding import shard_range
from tpfuse.tolerance import assert_close

pytestmark = [pytest.mark.gpu]

H, N_SHARD, K_SHARD = 1024, 768, 512
FORCE = {"all_gather_matmul": "tpfuse_async_tp", "matmul_reduce_scatter": "tpfuse_async_tp"}


def _data(seed, world, t, dev):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(torch.bfloat16).to(dev)
    w_n = (torch.randn(N_SHARD * world, H, generator=g) / H ** 0.5).to(torch.bfloat16).to(dev)
    x_k = torch.randn(t, K_SHARD * world, generator=g).to(torch.bfloat16).to(dev)
    w_k = (torch.randn(H, K_SHARD * world, generator=g) / K_SHARD ** 0.5).to(torch.bfloat16).to(dev)
    return x, w_n, x_k, w_k


def _cases(rank, world):
    dev = torch.device("cuda", torch.cuda.current_device())
    comm = tpfuse.TPCommunicator(max_tokens=4096, hidden_size=H, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(force_paths=FORCE))
    assert "async_tp" in comm.workspaces
    for i, t in enumerate([1, 2, 3, 7, 64, 1000, 4095, 4096]):
        x, w_n, x_k, w_k = _data(10 + i, world, t, dev)
        s, e = shard_range(t, world, rank)
        w_shard_n = w_n[rank * N_SHARD:(rank + 1) * N_SHARD].contiguous()
        y = comm.all_gather_matmul(x[s:e].contiguous(), w_shard_n, num_tokens=t)
        assert_path_ran(comm, "all_gather_matmul", t, expect="tpfuse_async_tp")
        assert_close(y, x.double() @ w_shard_n.double().t(), torch.bfloat16, f"all_gather_matmul T={t}")
        x_shard_k = x_k[:, rank * K_SHARD:(rank + 1) * K_SHARD].contiguous()
        w_shard_k = w_k[:, rank * K_SHARD:(rank + 1) * K_SHARD].contiguous()
        y = comm.matmul_reduce_scatter(x_shard_k, w_shard_k)
        assert y.shape == (e - s, H)
        assert_close(y, (x_k.double() @ w_k.double().t())[s:e], torch.bfloat16, f"matmul_reduce_scatter T={t}")
    # CUDA graph: 2 calls of each op captured, 200 replays with fresh activations (weights are static, as in a
    # model); every 20th replay checked
    t = 1000
    s, e = shard_range(t, world, rank)
    _, w_n, _, w_k = _data(99, world, t, dev)
    w_shard_n = w_n[rank * N_SHARD:(rank + 1) * N_SHARD].contiguous()
    w_shard_k = w_k[:, rank * K_SHARD:(rank + 1) * K_SHARD].contiguous()
    x, _, x_k, _ = _data(98, world, t, dev)
    sx, sxk = x[s:e].contiguous(), x_k[:, rank * K_SHARD:(rank + 1) * K_SHARD].contiguous()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        comm.all_gather_matmul(sx, w_shard_n, num_tokens=t)
        comm.matmul_reduce_scatter(sxk, w_shard_k)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ya = comm.all_gather_matmul(sx, w_shard_n, num_tokens=t)
        yb = comm.matmul_reduce_scatter(sxk, w_shard_k)
        ya = comm.all_gather_matmul(sx, w_shard_n, num_tokens=t)
        yb = comm.matmul_reduce_scatter(sxk, w_shard_k)
    for it in range(200):
        x, _, x_k, _ = _data(1000 + it, world, t, dev)
        sx.copy_(x[s:e])
        sxk.copy_(x_k[:, rank * K_SHARD:(rank + 1) * K_SHARD])
        graph.replay()
        if it % 20 == 0:
            assert_close(ya, x.double() @ w_shard_n.double().t(), torch.bfloat16, f"graph replay {it} AG")
            assert_close(yb, (x_k.double() @ w_k.double().t())[s:e], torch.bfloat16, f"graph replay {it} RS")
    torch.cuda.synchronize()
    comm.close()
    return True


@pytest.mark.parametrize("tp", gpu_tp_params())
def test_async_tp_ops(tp):
    assert run_gpu(_cases, tp, timeout_s=300) == [True] * tp


def _rs_ag_cases(rank, world):
    """tpfuse_reduce_scatter (reduce-scatter + add + RMSNorm + quant), tpfuse_all_gather, and the fused row-parallel
    tail on the async path, vs the fp64 oracle: uneven T, every output format, outliers on the last rank."""
    from cases import QUANT_KINDS, make_inputs, make_spec, oracle
    from tpfuse.reference import rmsnorm_math
    from tpfuse.tolerance import assert_quant_close

    dev = torch.device("cuda", torch.cuda.current_device())
    force = dict(FORCE, reduce_scatter_rmsnorm="tpfuse_reduce_scatter", all_gather="tpfuse_all_gather")
    comm = tpfuse.TPCommunicator(max_tokens=4096, hidden_size=H, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(force_paths=force))
    for i, t in enumerate([1, 3, 64, 1001, 4096]):
        for kind in QUANT_KINDS:
            inp = make_inputs(300 + i, world, t, H, torch.bfloat16, outlier_rank=world - 1, device=dev)
            ref_out, ref_res = oracle(inp, 1e-6)
            s, e = shard_range(t, world, rank)
            spec = make_spec(kind, dev, ref_out)
            out, res = comm.reduce_scatter_rmsnorm(inp.xs[rank], inp.residual[s:e].contiguous(), inp.weight,
                                                   quant=spec)
            assert comm.last_path["reduce_scatter_rmsnorm"] == "tpfuse_reduce_scatter"
            what = f"tpfuse_reduce_scatter T={t} {kind}"
            assert_close(res, ref_res[s:e], torch.bfloat16, what + " residual")
            if kind is None:
                assert_close(out, ref_out[s:e], torch.bfloat16, what)
                full = comm.all_gather(out, num_tokens=t)
                assert comm.last_path["all_gather"] == "tpfuse_all_gather"
                assert_close(full, ref_out, torch.bfloat16, f"tpfuse_all_gather T={t}")
            else:
                assert_quant_close(out, ref_out[s:e], what)
        # fused row-parallel tail (async-TP path): sum in fp32, no intermediate rounding
        x, _, x_k, w_k = _data(400 + i, world, t, dev)
        res_full = torch.randn(t, H, device=dev).to(torch.bfloat16)
        nw = (1 + 0.1 * torch.randn(H, device=dev)).to(torch.bfloat16)
        full = x_k.double() @ w_k.double().t() + res_full.double()
        s, e = shard_range(t, world, rank)
        out, res = comm.matmul_reduce_scatter_rmsnorm(x_k[:, rank * K_SHARD:(rank + 1) * K_SHARD].contiguous(),
                                                      w_k[:, rank * K_SHARD:(rank + 1) * K_SHARD].contiguous(),
                                                      res_full[s:e].contiguous(), nw, 1e-6)
        assert comm.last_path["matmul_reduce_scatter_rmsnorm"] == "tpfuse_async_tp"
        assert_close(res, full[s:e], torch.bfloat16, f"fused tail T={t} residual")
        assert_close(out, rmsnorm_math(full, nw.double(), 1e-6)[s:e], torch.bfloat16, f"fused tail T={t}")
    torch.cuda.synchronize()
    comm.close()
    return True


@pytest.mark.parametrize("tp", gpu_tp_params())
def test_rs_ag_and_fused_tail(tp):
    assert run_gpu(_rs_ag_cases, tp, timeout_s=300) == [True] * tp


# ---------------------------------------------------------------------------------------------------------------
# bf16 and FP8 GEMM ops on every path at Llama shapes

MODELS = {"8B": (4096, 14336), "70B": (8192, 28672)}  # hidden, intermediate (K / N shards = I / TP)


def _gemm_tokens(tp: int):
    # every rank builds every rank's operands (the fp64 oracle): past TP=2 the 16k-token case would hold
    # TP x TP shards per GPU in one-GPU mode
    return [1, 7, 256, 4097, 16384] if tp == 2 else [1, 7, 256, 4097]
GEMM_PATHS = ("reference", "nccl", "tpfuse_async_tp")
DTYPES = ("bf16", "tensor", "row")  # bf16, FP8 per-tensor scales, FP8 row-wise scales


def _bf16_ag(seed, world, t, h, n_shard, rank, dev):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(t, h, generator=g, device=dev).to(torch.bfloat16)
    w = (torch.randn(n_shard * world, h, generator=g, device=dev) / h ** 0.5).to(torch.bfloat16)
    w = w[rank * n_shard:(rank + 1) * n_shard].contiguous()
    s, e = shard_range(t, world, rank)
    return (x[s:e].contiguous(), w, {}), x.double() @ w.double().t()


def _bf16_rs(seed, world, t, h, k_shard, rank, dev):
    g = torch.Generator(device=dev).manual_seed(seed)
    xs = [torch.randn(t, k_shard, generator=g, device=dev).to(torch.bfloat16) for _ in range(world)]
    ws = [(torch.randn(h, k_shard, generator=g, device=dev) / (k_shard * world) ** 0.5).to(torch.bfloat16)
          for _ in range(world)]
    s, e = shard_range(t, world, rank)
    return (xs[rank], ws[rank], {}), sum(x[s:e].double() @ w.double().t() for x, w in zip(xs, ws))


def _gemm_sweep(rank, world, model):
    tokens = _gemm_tokens(world)
    h, inter = MODELS[model]
    i_s = inter // world
    dev = torch.device("cuda", torch.cuda.current_device())
    comms = {p: tpfuse.TPCommunicator(max_tokens=max(tokens), hidden_size=h, dtype=torch.bfloat16,
                                      config=tpfuse.CommConfig(force_paths={"all_gather_matmul": p,
                                                                            "matmul_reduce_scatter": p}))
             for p in GEMM_PATHS}
    n = 0
    for i, t in enumerate(tokens):
        for dt in DTYPES:
            seed = 1000 * i + 10 * DTYPES.index(dt)
            if dt == "bf16":
                (x, w, kw), ref = _bf16_ag(seed, world, t, h, i_s, rank, dev)
            else:
                c = ag_case(seed, world, t, h, i_s, dt, dev)
                xq, xs = c.shard(rank, world)
                (x, w, kw), ref = (xq, c.wq[rank], {"x_scale": xs, "w_scale": c.ws[rank]}), c.oracle(rank)
                del c
            for p, comm in comms.items():
                y = comm.all_gather_matmul(x, w, num_tokens=t, **kw)
                assert comm.last_path["all_gather_matmul"] == p
                assert y.dtype == torch.bfloat16 and y.shape == (t, i_s)
                assert_close(y, ref, torch.bfloat16, f"{model} AG {dt} T={t} {p}")
                n += 1
            del x, w, kw, ref, y
            s, e = shard_range(t, world, rank)
            if dt == "bf16":
                (x, w, kw), ref = _bf16_rs(seed + 1, world, t, h, i_s, rank, dev)
            else:
                r = rs_case(seed + 1, world, t, h, i_s, dt, dev)
                (x, w, kw), ref = ((r.xq[rank], r.wq[rank], {"x_scale": r.xs[rank], "w_scale": r.ws[rank]}),
                                   r.total(s, e))
                del r
            for p, comm in comms.items():
                y = comm.matmul_reduce_scatter(x, w, **kw)
                assert comm.last_path["matmul_reduce_scatter"] == p
                assert y.dtype == torch.bfloat16 and y.shape == (e - s, h)
                assert_close(y, ref, torch.bfloat16, f"{model} RS {dt} T={t} {p}")
                n += 1
            del x, w, kw, ref, y
            torch.cuda.empty_cache()
    torch.cuda.synchronize()
    for comm in comms.values():
        comm.synchronize()
        comm.close()
    return n


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("model", list(MODELS))
def test_gemm_ops_bf16_fp8_every_path(tp, model):
    n = len(_gemm_tokens(tp)) * len(DTYPES) * 2 * len(GEMM_PATHS)
    assert run_gpu(_gemm_sweep, tp, model, timeout_s=600) == [n] * tp


def _fp8_graph(rank, world):
    """FP8 ops captured in a CUDA graph (row-wise AG, per-tensor RS, the fused RS tail), replayed with fresh
    activations copied into the static inputs (weights static, as in a model)."""
    from tpfuse.reference import rmsnorm_math

    dev = torch.device("cuda", torch.cuda.current_device())
    comm = tpfuse.TPCommunicator(max_tokens=4096, hidden_size=H, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(force_paths=FORCE))
    t = 1001
    s, e = shard_range(t, world, rank)
    c = ag_case(1, world, t, H, N_SHARD, "row", dev, w_seed=7)
    r = rs_case(2, world, t, H, K_SHARD, "tensor", dev, w_seed=8)
    sx, sxs = [a.clone() for a in c.shard(rank, world)]
    sxk, sxks = r.xq[rank].clone(), r.xs[rank].clone()
    res = torch.randn(e - s, H, device=dev).to(torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(H, device=dev)).to(torch.bfloat16)

    def calls():
        ya = comm.all_gather_matmul(sx, c.wq[rank], num_tokens=t, x_scale=sxs, w_scale=c.ws[rank])
        yb = comm.matmul_reduce_scatter(sxk, r.wq[rank], x_scale=sxks, w_scale=r.ws[rank])
        yc, rc = comm.matmul_reduce_scatter_rmsnorm(sxk, r.wq[rank], res, nw, 1e-6, x_scale=sxks, w_scale=r.ws[rank])
        return ya, yb, yc, rc

    def two_calls():
        calls()
        return calls()

    graph, (ya, yb, yc, rc) = capture(two_calls)
    checked = 0
    for it in range(100):
        ci = ag_case(100 + it, world, t, H, N_SHARD, "row", dev, w_seed=7)
        ri = rs_case(200 + it, world, t, H, K_SHARD, "tensor", dev, w_seed=8)
        xq, xs = ci.shard(rank, world)
        sx.copy_(xq)
        sxs.copy_(xs)
        sxk.copy_(ri.xq[rank])
        sxks.copy_(ri.xs[rank])
        graph.replay()
        if it % 10 == 0:
            assert_close(ya, ci.oracle(rank), torch.bfloat16, f"graph replay {it} FP8 AG")
            total = ri.total(s, e)
            assert_close(yb, total, torch.bfloat16, f"graph replay {it} FP8 RS")
            full = total + res.double()
            assert_close(rc, full, torch.bfloat16, f"graph replay {it} FP8 fused tail residual")
            assert_close(yc, rmsnorm_math(full, nw.double(), 1e-6), torch.bfloat16, f"graph replay {it} tail")
            checked += 1
    torch.cuda.synchronize()
    comm.synchronize()
    comm.close()
    return checked


@pytest.mark.parametrize("tp", gpu_tp_params())
def test_fp8_ops_in_cuda_graph(tp):
    assert run_gpu(_fp8_graph, tp, timeout_s=300) == [10] * tp


# ---------------------------------------------------------------------------------------------------------------
# bounded waits: a late peer, a skipped call

SKIP_OPS = ["all_gather_matmul", "all_gather_matmul_fp8", "matmul_reduce_scatter", "matmul_reduce_scatter_fp8",
            "matmul_reduce_scatter_rmsnorm", "reduce_scatter_rmsnorm", "all_gather"]
TIMEOUT_S = 5.0


def _op_call(comm, rank, world, op, t=37):
    """``(run, check)``: one call of ``op`` on fixed data and its fp64 oracle check."""
    from cases import make_inputs, oracle
    from tpfuse.reference import rmsnorm_math

    dev = comm.device
    s, e = shard_range(t, world, rank)
    x, w_n, x_k, w_k = _data(5, world, t, dev)
    w_shard_n = w_n[rank * N_SHARD:(rank + 1) * N_SHARD].contiguous()
    x_shard_k = x_k[:, rank * K_SHARD:(rank + 1) * K_SHARD].contiguous()
    w_shard_k = w_k[:, rank * K_SHARD:(rank + 1) * K_SHARD].contiguous()
    rs_ref = (x_k.double() @ w_k.double().t())[s:e]
    if op == "all_gather_matmul":
        return (lambda: comm.all_gather_matmul(x[s:e].contiguous(), w_shard_n, num_tokens=t),
                lambda y: assert_close(y, x.double() @ w_shard_n.double().t(), torch.bfloat16, op))
    if op == "all_gather_matmul_fp8":
        c = ag_case(6, world, t, H, N_SHARD, "row", dev)
        xq, xs = c.shard(rank, world)
        return (lambda: comm.all_gather_matmul(xq, c.wq[rank], num_tokens=t, x_scale=xs, w_scale=c.ws[rank]),
                lambda y: assert_close(y, c.oracle(rank), torch.bfloat16, op))
    if op == "matmul_reduce_scatter":
        return (lambda: comm.matmul_reduce_scatter(x_shard_k, w_shard_k),
                lambda y: assert_close(y, rs_ref, torch.bfloat16, op))
    if op == "matmul_reduce_scatter_fp8":
        r = rs_case(7, world, t, H, K_SHARD, "tensor", dev)
        return (lambda: comm.matmul_reduce_scatter(r.xq[rank], r.wq[rank], x_scale=r.xs[rank], w_scale=r.ws[rank]),
                lambda y: assert_close(y, r.total(s, e), torch.bfloat16, op))
    inp = make_inputs(8, world, t, H, torch.bfloat16, device=dev)
    if op == "matmul_reduce_scatter_rmsnorm":
        full = rs_ref + inp.residual[s:e].double()
        return (lambda: comm.matmul_reduce_scatter_rmsnorm(x_shard_k, w_shard_k, inp.residual[s:e].contiguous(),
                                                           inp.weight, 1e-6),
                lambda y: assert_close(y[0], rmsnorm_math(full, inp.weight.double(), 1e-6), torch.bfloat16, op))
    if op == "reduce_scatter_rmsnorm":
        ref_out, _ = oracle(inp, 1e-6)
        return (lambda: comm.reduce_scatter_rmsnorm(inp.xs[rank], inp.residual[s:e].contiguous(), inp.weight, 1e-6),
                lambda y: assert_close(y[0], ref_out[s:e], torch.bfloat16, op))
    assert op == "all_gather"
    return (lambda: comm.all_gather(inp.residual[s:e].contiguous(), num_tokens=t),
            lambda y: assert_close(y, inp.residual.double(), torch.bfloat16, op))


def _skip_call(rank, world, op):
    force = dict(FORCE, reduce_scatter_rmsnorm="tpfuse_reduce_scatter", all_gather="tpfuse_all_gather")
    # compile every kernel of the op first under the default 30 s bound (a rank still JIT-compiling must not look
    # like a late peer), then the same op under a 5 s bound
    warm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=H, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(force_paths=force))
    run, check = _op_call(warm, rank, world, op)
    check(run())
    warm.synchronize()
    warm.close()
    cfg = tpfuse.CommConfig(force_paths=force, timeout_s=TIMEOUT_S)
    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=H, dtype=torch.bfloat16, config=cfg)
    run, check = _op_call(comm, rank, world, op)
    for late in (False, True):  # on time, then rank 1 ~0.1 s late: every rank correct, no timeout
        if late and rank == 1:
            torch.cuda._sleep(200_000_000)
        check(run())
        comm.synchronize()
    if rank == 1:
        result = "skipped"  # rank 1 skips the next call: the others must give up within timeout_s, not hang
    else:
        t0 = time.monotonic()
        run()
        with pytest.raises(TPFusePeerTimeout, match="peer did not arrive within 5 s"):
            comm.synchronize()
        waited = time.monotonic() - t0
        # one timeout per broken call (later waits see the error flag and return at once), not one per wait
        assert TIMEOUT_S - 1.0 <= waited < TIMEOUT_S + 4.0, waited
        with pytest.raises(TPFusePeerTimeout):  # stays broken
            run()
        result = round(waited, 2)
    # the CUDA context is intact (no aborted kernel): the ranks meet again (rank 1 kept its buffers alive until
    # the others gave up) and a new communicator works
    dist.barrier()
    comm.close()
    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=H, dtype=torch.bfloat16, config=cfg)
    run, check = _op_call(comm, rank, world, op)
    check(run())
    comm.synchronize()
    comm.close()
    return result


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("op", SKIP_OPS)
def test_skipped_call_raises_peer_timeout(tp, op):
    res = run_gpu(_skip_call, tp, op, timeout_s=120)
    assert res[1] == "skipped" and all(isinstance(w, float) for r, w in enumerate(res) if r != 1), res
