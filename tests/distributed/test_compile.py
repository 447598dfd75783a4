"""torch.compile(fullgraph=True) of a block that calls every communicator op: no graph break, same results as
eager (the ops are custom ops with fake impls; see tpfuse/compile_ops.py)."""

import pytest
import torch

import tpfuse
from cases import make_inputs
from harness import run_on_ranks
from tpfuse.sharding import shard_range


def _block(comm, static, x, residual, w, w_n, x_k, w_k, t):
    out, res = comm.fused_add_rmsnorm(x, residual, w, 1e-6)
    q, _ = comm.fused_add_rmsnorm(x, res, w, 1e-6, quant=tpfuse.FP8PerToken())
    qs, _ = comm.fused_add_rmsnorm(x, res, w, 1e-6, quant=static)  # a number-built scale (placed by check_spec)
    s, e = shard_range(t, comm.tp, comm.rank)
    out_s, res_s = comm.reduce_scatter_rmsnorm(x, residual[s:e], w, 1e-6)
    full = comm.all_gather(out_s, num_tokens=t)
    y = comm.all_gather_matmul(out_s, w_n, num_tokens=t)
    z = comm.matmul_reduce_scatter(x_k, w_k)
    zq, zres = comm.matmul_reduce_scatter_rmsnorm(x_k, w_k, residual[s:e], w, 1e-6, quant=tpfuse.FP8PerToken())
    return (out + full, res, q.data.float() * q.scale, res_s, y, z, comm.all_reduce(x), zq.data.float() * zq.scale,
            zres, qs.data.float())


def _compiled_equals_eager(rank, world):
    torch._dynamo.reset()
    t, h = 6, 32
    inp = make_inputs(21, world, t, h, torch.float32)
    g = torch.Generator().manual_seed(3)
    w_n, x_k, w_k = torch.randn(8, h, generator=g), torch.randn(t, 4, generator=g), torch.randn(h, 4, generator=g)
    comm = tpfuse.TPCommunicator(max_tokens=16, hidden_size=h, dtype=torch.float32)
    args = (inp.xs[rank], inp.residual, inp.weight, w_n, x_k, w_k, t)
    static = tpfuse.FP8Static(0.05)
    eager = _block(comm, static, *args)
    seen = []

    def backend(gm, example_inputs):  # records the graph Dynamo hands over, then runs it as is
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(lambda *a: _block(comm, static, *a), fullgraph=True, backend=backend)(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    for op in ("fused_add_rmsnorm", "reduce_scatter_rmsnorm", "all_gather", "all_gather_matmul",
               "matmul_reduce_scatter", "all_reduce", "matmul_reduce_scatter_rmsnorm"):
        assert any(f"tpfuse.comm_{op}" in s for s in seen), (op, seen)
    comm.close()
    return True


@pytest.mark.parametrize("world", [2])
def test_compile_fullgraph(world):
    assert run_on_ranks(_compiled_equals_eager, world, timeout_s=300) == [True] * world
