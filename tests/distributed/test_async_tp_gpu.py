"""GPU pair: the async-TP path (``tpfuse_async_tp``) of all_gather_matmul / matmul_reduce_scatter vs an fp64
oracle, uneven token counts, CUDA-graph replays with fresh data, and the path the dispatcher reports."""

import pytest
import torch

import tpfuse
from harness import run_on_ranks
from tpfuse.sharding import shard_range
from tpfuse.tolerance import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA GPUs (runs on the GPU pair)")]

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
    assert comm.async_tp is not None
    for i, t in enumerate([1, 2, 3, 7, 64, 1000, 4095, 4096]):
        x, w_n, x_k, w_k = _data(10 + i, world, t, dev)
        s, e = shard_range(t, world, rank)
        w_shard_n = w_n[rank * N_SHARD:(rank + 1) * N_SHARD].contiguous()
        y = comm.all_gather_matmul(x[s:e].contiguous(), w_shard_n, num_tokens=t)
        assert comm.last_path["all_gather_matmul"] == comm.plan(t).path("all_gather_matmul") == "tpfuse_async_tp"
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


def test_async_tp_ops_on_gpu_pair():
    assert run_on_ranks(_cases, 2, backend="nccl", timeout_s=300) == [True, True]


def _rs_ag_cases(rank, world):
    """tpfuse_rs (reduce-scatter + add + RMSNorm + quant), tpfuse_ag, and the fused row-parallel tail on the async
    path, vs the fp64 oracle: uneven T, every output format, outliers on the last rank."""
    from cases import QUANT_KINDS, make_inputs, make_spec, oracle
    from tpfuse.reference import rmsnorm_math
    from tpfuse.tolerance import assert_quant_close

    dev = torch.device("cuda", torch.cuda.current_device())
    force = dict(FORCE, reduce_scatter_rmsnorm="tpfuse_rs", all_gather="tpfuse_ag")
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
            assert comm.last_path["reduce_scatter_rmsnorm"] == "tpfuse_rs"
            what = f"tpfuse_rs T={t} {kind}"
            assert_close(res, ref_res[s:e], torch.bfloat16, what + " residual")
            if kind is None:
                assert_close(out, ref_out[s:e], torch.bfloat16, what)
                full = comm.all_gather(out, num_tokens=t)
                assert comm.last_path["all_gather"] == "tpfuse_ag"
                assert_close(full, ref_out, torch.bfloat16, f"tpfuse_ag T={t}")
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
        assert comm.last_path["matmul_reduce_scatter"] == "tpfuse_async_tp"
        assert_close(res, full[s:e], torch.bfloat16, f"fused tail T={t} residual")
        assert_close(out, rmsnorm_math(full, nw.double(), 1e-6)[s:e], torch.bfloat16, f"fused tail T={t}")
    torch.cuda.synchronize()
    comm.close()
    return True


def test_rs_ag_and_fused_tail_on_gpu_pair():
    assert run_on_ranks(_rs_ag_cases, 2, backend="nccl", timeout_s=300) == [True, True]
