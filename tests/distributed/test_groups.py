"""Communicators on subgroups: 4 ranks as DP x TP (TP groups {0,1}, {2,3}) and as PP x TP with strided TP groups
({0,2}, {1,3}). Each group reduces its own data; a cross-talk or a wrong rendezvous would mix the groups' sums."""

import pytest
import torch
import torch.distributed as dist

import tpfuse
from cases import make_inputs, oracle
from tpfuse.sharding import shard_range
from harness import run_on_ranks
from tpfuse.tolerance import assert_close


def _subgroups(rank, world, layout):
    assert world == 4
    groups = [[0, 1], [2, 3]] if layout == "dp_x_tp" else [[0, 2], [1, 3]]
    handles = [dist.new_group(g) for g in groups]  # every rank creates every group, in the same order
    gid = next(i for i, g in enumerate(groups) if rank in g)
    comm = tpfuse.TPCommunicator(handles[gid], max_tokens=16, hidden_size=48, dtype=torch.bfloat16)
    assert comm.tp == 2 and comm.rank == groups[gid].index(rank)
    # different data per group; the group with more tokens goes first on purpose
    t = 7 if gid == 0 else 5
    inp = make_inputs(500 + gid, 2, t, 48, torch.bfloat16, outlier_rank=1)
    x = inp.xs[comm.rank]
    for _ in range(3):
        out, res = comm.fused_add_rmsnorm(x, inp.residual, inp.weight)
        ref_out, ref_res = oracle(inp, 1e-6)
        assert_close(out, ref_out, torch.bfloat16, f"group {gid} out")
        assert_close(res, ref_res, torch.bfloat16, f"group {gid} residual")
        s, e = shard_range(t, 2, comm.rank)
        out_s, _ = comm.reduce_scatter_rmsnorm(x, inp.residual[s:e], inp.weight)
        assert_close(out_s, ref_out[s:e], torch.bfloat16, f"group {gid} SP")
        assert torch.equal(comm.all_gather(out_s, num_tokens=t)[s:e], out_s)
    # a world-wide collective still works afterwards (nothing left pending on the default group)
    flag = torch.ones(1)
    dist.all_reduce(flag)
    assert flag.item() == 4
    return gid


@pytest.mark.parametrize("layout", ["dp_x_tp", "pp_x_tp"])
def test_subgroups_no_cross_talk(layout):
    gids = run_on_ranks(_subgroups, 4, layout)
    assert gids == ([0, 0, 1, 1] if layout == "dp_x_tp" else [0, 1, 0, 1])
