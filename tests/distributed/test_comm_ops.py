"""Every communicator op vs a single-process fp64 oracle, on TP 1, 2, 4 (gloo; NCCL too where GPUs exist).

Adversarial inputs: odd hidden sizes, 1 token, token counts TP does not divide, an outlier on the last (non-zero)
rank, every quantized output form, Gemma weights, an fp32 norm weight with bf16 activations. Each case also checks
that the path that ran is the path ``plan()`` reported.
"""

import pytest
import torch
import torch.distributed as dist

import tpfuse
from cases import QUANT_KINDS, assert_path_ran, every_world, make_inputs, make_spec, norm_of_residual, oracle
from harness import device_of, run_on_ranks
from tpfuse.reference import rmsnorm_math
from tpfuse.sharding import shard_range
from tpfuse.tolerance import REL_ERR, assert_close, assert_quant_close, rel_err

# (tokens, hidden, dtype, quant, with_residual, gemma, weight_dtype)
FUSED_CASES = [
    (1, 64, torch.bfloat16, None, True, False, None),
    (7, 33, torch.float16, None, False, True, None),
    (5, 96, torch.float32, None, True, False, None),
    (3, 128, torch.bfloat16, None, True, False, torch.float32),   # fp32 norm weight, bf16 activations
    (0, 64, torch.bfloat16, None, True, False, None),             # an empty batch is legal
] + [(9, 256, torch.bfloat16, k, True, False, None) for k in QUANT_KINDS[1:]] + [
    (1, 128, torch.bfloat16, "nvfp4", False, True, None),
]


def _fused_cases(rank, world, backend):
    dev = device_of(backend)
    for i, (t, h, dtype, kind, with_res, gemma, wdt) in enumerate(FUSED_CASES):
        inp = make_inputs(100 + i, world, t, h, dtype, weight_dtype=wdt, outlier_rank=world - 1, device=dev)
        ref_out, ref_res = oracle(inp, 1e-5, with_residual=with_res, gemma=gemma)
        spec = make_spec(kind, dev, ref_out)
        what = f"case {i} (T={t} H={h} {dtype} quant={kind} residual={with_res} gemma={gemma})"
        with tpfuse.TPCommunicator(max_tokens=16, hidden_size=h, dtype=dtype) as comm:
            out, res = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual if with_res else None, inp.weight, 1e-5,
                                              quant=spec, gemma=gemma)
            assert_path_ran(comm, "fused_add_rmsnorm", t)
            assert res.dtype == dtype and res.shape == (t, h), what
            assert_close(res, ref_res, dtype, what + " residual_out")
            if kind is None:
                assert out.dtype == dtype, what
                assert_close(out, ref_out, dtype, what + " out")
            else:
                assert isinstance(out, tpfuse.QuantizedActivation) and out.orig_dtype == dtype, what
                if comm.plan(t).path("fused_add_rmsnorm") == "nccl":  # the sum was rounded to dtype
                    assert_quant_close(out, norm_of_residual(res, inp.weight, 1e-5, gemma), what, scale_rtol=2.0 ** -7)
                else:
                    assert_quant_close(out, ref_out, what)

            # the sequence-parallel form gives this rank's token range of the same result
            start, end = shard_range(t, world, rank)
            res_shard = inp.residual[start:end] if with_res else None
            out_s, res_s = comm.reduce_scatter_rmsnorm(inp.xs[rank], res_shard, inp.weight, 1e-5, quant=spec,
                                                       gemma=gemma)
            assert_path_ran(comm, "reduce_scatter_rmsnorm", t)
            assert res_s.shape == (end - start, h), what
            assert_close(res_s, ref_res[start:end], dtype, what + " SP residual")
            if kind is None:
                assert_close(out_s, ref_out[start:end], dtype, what + " SP out")
                # SP then all-gather == AR form (same fp32 sum; at most rare last-bit differences)
                full = comm.all_gather(out_s, num_tokens=t)
                assert_path_ran(comm, "all_gather", t)
                assert full.shape == out.shape
                # the nccl path sums the partials in the input dtype (one more rounding than the fp32-accumulating
                # kernels and the reference): then SP and AR agree only to the dtype's budget
                plan = comm.plan(t)
                rounded = "nccl" in (plan.path("fused_add_rmsnorm"), plan.path("reduce_scatter_rmsnorm"))
                assert rel_err(full, out) <= REL_ERR[dtype] / (1 if rounded else 8), what + " SP != AR"
            else:
                if comm.plan(t).path("reduce_scatter_rmsnorm") == "nccl":  # the sum was rounded to dtype
                    assert_quant_close(out_s, norm_of_residual(res_s, inp.weight, 1e-5, gemma), what + " SP",
                                       scale_rtol=2.0 ** -7)
                else:
                    assert_quant_close(out_s, ref_out[start:end], what + " SP")
    return True


test_fused_add_rmsnorm_and_sp_form = every_world(_fused_cases)


def _collective_cases(rank, world, backend):
    dev = device_of(backend)
    for i, (t, h, dtype) in enumerate([(1, 64, torch.bfloat16), (5, 33, torch.float32), (11, 40, torch.float16),
                                       (2, 16, torch.bfloat16)]):
        inp = make_inputs(7 + i, world, t, h, dtype, outlier_rank=world - 1, device=dev)
        comm = tpfuse.TPCommunicator(max_tokens=32, hidden_size=h, dtype=dtype)
        what = f"T={t} H={h} {dtype}"
        # all_reduce
        y = comm.all_reduce(inp.xs[rank])
        assert_path_ran(comm, "all_reduce", t)
        assert_close(y, inp.total(), dtype, "all_reduce " + what)
        assert torch.equal(inp.xs[rank], make_inputs(7 + i, world, t, h, dtype, outlier_rank=world - 1,
                                                     device=dev).xs[rank]), "inputs must not be written"
        # all_gather of uneven and even shards; num_tokens=None only at TP=1 (a shard does not tell T)
        start, end = shard_range(t, world, rank)
        full = comm.all_gather(inp.residual[start:end].contiguous(), num_tokens=t)
        assert torch.equal(full, inp.residual), "all_gather " + what
        if world == 1:
            assert torch.equal(comm.all_gather(inp.residual[start:end].contiguous()), inp.residual)
        # column-parallel: all_gather_matmul with w_shard_n [N/TP, H]
        n = 8 * world
        g = torch.Generator().manual_seed(50 + i)
        w_full = torch.randn(n, h, generator=g).to(dtype).to(dev)
        w_shard_n = w_full[rank * 8:(rank + 1) * 8].contiguous()
        y = comm.all_gather_matmul(inp.residual[start:end].contiguous(), w_shard_n, num_tokens=t)
        assert_path_ran(comm, "all_gather_matmul", t)
        assert y.shape == (t, 8)
        assert_close(y, inp.residual.double() @ w_shard_n.double().t(), dtype, "all_gather_matmul " + what)
        # row-parallel: matmul_reduce_scatter with x_shard_k [T, K/TP] and w_shard_k [H, K/TP]
        k = 6 * world
        x_full = torch.randn(t, k, generator=g).to(dtype).to(dev)
        w2 = torch.randn(h, k, generator=g).to(dtype).to(dev)
        x_shard_k = x_full[:, rank * 6:(rank + 1) * 6].contiguous()
        w_shard_k = w2[:, rank * 6:(rank + 1) * 6].contiguous()
        y = comm.matmul_reduce_scatter(x_shard_k, w_shard_k)
        assert_path_ran(comm, "matmul_reduce_scatter", t)
        assert y.shape == (end - start, h)
        assert_close(y, (x_full.double() @ w2.double().t())[start:end], dtype, "matmul_reduce_scatter " + what)
        comm.close()
    return True


test_collectives_and_async_tp_ops = every_world(_collective_cases)


def _late_peer_and_reuse(rank, world, backend):
    """A peer arriving late, and one communicator reused for many calls with fresh data each time."""
    import time

    dev = device_of(backend)
    comm = tpfuse.TPCommunicator(max_tokens=8, hidden_size=64, dtype=torch.bfloat16)
    for it in range(40):
        inp = make_inputs(1000 + it, world, 1 + it % 8, 64, torch.bfloat16, outlier_rank=world - 1, device=dev)
        if it % 10 == 0 and rank == world - 1:
            time.sleep(0.2)
        out, res = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, inp.weight)
        ref_out, ref_res = oracle(inp, 1e-6)
        assert_close(out, ref_out, torch.bfloat16, f"iteration {it}")
        assert_close(res, ref_res, torch.bfloat16, f"iteration {it} residual")
    dist.barrier()
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_late_peer_and_buffer_reuse(world):
    assert run_on_ranks(_late_peer_and_reuse, world, "gloo") == [True] * world


def _fused_row_parallel(rank, world, backend):
    """matmul_reduce_scatter_rmsnorm == matmul_reduce_scatter then add_rmsnorm, vs fp64 (incl. uneven T, quant)."""
    dev = device_of(backend)
    h, k = 64, 5
    comm = tpfuse.TPCommunicator(max_tokens=16, hidden_size=h, dtype=torch.bfloat16)
    for i, (t, kind) in enumerate([(1, None), (7, None), (9, "fp8_group64"), (4, "nvfp4")]):
        g = torch.Generator().manual_seed(70 + i)
        x = torch.randn(t, k * world, generator=g).to(torch.bfloat16).to(dev)
        w = torch.randn(h, k * world, generator=g).to(torch.bfloat16).to(dev)
        res = torch.randn(t, h, generator=g).to(torch.bfloat16).to(dev)
        nw = (1 + 0.1 * torch.randn(h, generator=g)).to(torch.bfloat16).to(dev)
        s, e = shard_range(t, world, rank)
        rs = x.double() @ w.double().t()
        path = comm.plan(t).path("matmul_reduce_scatter_rmsnorm")
        assert path == comm.plan(t).path("matmul_reduce_scatter")  # routed as the plain op
        if path == "nccl":
            # nccl's contract: each rank's GEMM partial rounded to bf16, summed by the bf16 reduce-scatter (exact
            # at TP=2; beyond, NCCL's / gloo's order of adds differs: cases.norm_of_residual)
            parts = [(x[:, q * k:(q + 1) * k].double() @ w[:, q * k:(q + 1) * k].double().t()).to(torch.bfloat16)
                     for q in range(world)]
            rs = sum(p_.double() for p_ in parts).to(torch.bfloat16).double()
        elif path != "tpfuse_async_tp":
            rs = rs.to(torch.bfloat16).double()  # contract of the unfused paths: RS result rounded, then the add
        full = rs + res.double()
        ref_out = rmsnorm_math(full, nw.double(), 1e-6)[s:e]
        spec = make_spec(kind, dev, ref_out)
        out, r = comm.matmul_reduce_scatter_rmsnorm(x[:, rank * k:(rank + 1) * k].contiguous(),
                                                    w[:, rank * k:(rank + 1) * k].contiguous(),
                                                    res[s:e].contiguous(), nw, 1e-6, quant=spec)
        assert_path_ran(comm, "matmul_reduce_scatter_rmsnorm", t)
        assert_close(r, full[s:e], torch.bfloat16, f"T={t} residual")
        if kind is None:
            assert_close(out, ref_out, torch.bfloat16, f"T={t} out")
        elif path == "nccl":  # beyond TP=2 the model above is not NCCL's rounding order: the values it normalised
            assert_quant_close(out, norm_of_residual(r, nw, 1e-6), f"T={t} {kind}", scale_rtol=2.0 ** -7)
        else:
            assert_quant_close(out, ref_out, f"T={t} {kind}")
    return True


test_matmul_reduce_scatter_rmsnorm = every_world(_fused_row_parallel)


def test_tp8_fused_sp_and_row_parallel():
    """TP=8 on gloo: the fused AR and SP forms (token counts leave several ranks with empty shards) and the fused
    row-parallel tail, against the fp64 oracle."""
    assert run_on_ranks(_fused_cases, 8, "gloo") == [True] * 8
    assert run_on_ranks(_fused_row_parallel, 8, "gloo") == [True] * 8
