"""Bad input: a clear error on every rank, nothing hangs, and the communicator stays usable afterwards."""

import pytest
import torch

import tpfuse
from cases import assert_each_raises, make_comm, make_inputs, oracle
from harness import run_on_ranks
from tpfuse.errors import TPFuseClosedError, TPFuseError, TPFuseInputError, TPFuseMismatchError
from tpfuse.tolerance import assert_close

H = 64


def _bad_calls(x, r, w):
    """(name, call, expected message) for inputs every rank gets wrong the same way."""
    bf = torch.bfloat16
    return [
        ("wrong dtype", lambda c: c.fused_add_rmsnorm(x.float(), r, w), "dtype torch.float32"),
        ("non-contiguous", lambda c: c.fused_add_rmsnorm(torch.cat([x, x], 1)[:, ::2], r, w), "contiguous"),
        ("residual shape", lambda c: c.fused_add_rmsnorm(x, r[:1], w), "residual has shape"),
        ("weight shape", lambda c: c.fused_add_rmsnorm(x, r, w[:-1]), "weight has 63 elements"),
        ("hidden size", lambda c: c.fused_add_rmsnorm(torch.zeros(2, H + 1, dtype=bf), None, w),
         "hidden size 65"),
        ("too many tokens", lambda c: c.all_reduce(torch.zeros(9, H, dtype=bf)), "max_tokens=8"),
        ("wrong device", lambda c: c.all_reduce(torch.empty(2, H, dtype=bf, device="meta")), "is on meta"),
        ("1-D input", lambda c: c.all_reduce(x[0]), "must be 2-D"),
        ("not a tensor", lambda c: c.all_reduce([1.0]), "must be a torch.Tensor"),
        ("quant scale shape", lambda c: c.fused_add_rmsnorm(
            x, r, w, quant=tpfuse.FP8Static(torch.ones(2))), "scalar"),
        ("quant scale dtype", lambda c: c.fused_add_rmsnorm(
            x, r, w, quant=tpfuse.FP8Static(torch.tensor(1.0, dtype=torch.float64))), "float32"),
        ("quant scale device", lambda c: c.fused_add_rmsnorm(
            x, r, w, quant=tpfuse.FP8Static(torch.tensor(1.0, device="meta"))), "is on meta"),
        ("quant group", lambda c: c.fused_add_rmsnorm(x, r, w, quant=tpfuse.FP8PerGroup(128)), "hidden % 128"),
        ("negative eps", lambda c: c.fused_add_rmsnorm(x, r, w, -1.0), "eps must be"),
        ("residual_shard rows", lambda c: c.reduce_scatter_rmsnorm(x, r, w), "residual_shard has shape"),
        ("all_gather rows", lambda c: c.all_gather(x, num_tokens=3), "rows"),
        ("all_gather without num_tokens", lambda c: c.all_gather(x), "num_tokens is required"),
        ("all_gather_matmul weight", lambda c: c.all_gather_matmul(x, torch.zeros(4, H + 1, dtype=bf), num_tokens=8),
         "in-features"),
        ("matmul_reduce_scatter weight", lambda c: c.matmul_reduce_scatter(x, torch.zeros(H, 3, dtype=bf)),
         "out-features"),
        ("plan too large", lambda c: c.plan(9), "num_tokens"),
    ]


def _every_rank_raises(rank, world, debug):
    comm = make_comm(H, torch.bfloat16, 8, debug=debug)
    inp = make_inputs(3, world, 4, H, torch.bfloat16)
    x, r, w = inp.xs[rank], inp.residual, inp.weight

    def still_usable(name):  # a valid call right after gives the right answer on every rank
        out, res = comm.fused_add_rmsnorm(x, r, w)
        ref_out, _ = oracle(inp, 1e-6)
        assert_close(out, ref_out, torch.bfloat16, f"after {name}")

    assert_each_raises(comm, _bad_calls(x, r, w), still_usable)
    comm.close()
    comm.close()  # idempotent
    with pytest.raises(TPFuseClosedError):
        comm.all_reduce(x)
    with pytest.raises(TPFuseClosedError):
        comm.plan(1)
    return True


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_bad_input_raises_on_every_rank(debug):
    assert run_on_ranks(_every_rank_raises, 2, debug) == [True, True]


def _constructor_errors(rank, world):
    for kwargs, match in [(dict(max_tokens=0, hidden_size=8), "max_tokens"),
                          (dict(max_tokens=4, hidden_size=-1), "hidden_size"),
                          (dict(max_tokens=4, hidden_size=8, dtype=torch.int32), "dtype"),
                          (dict(max_tokens=4, hidden_size=8, config={"debug": True}), "CommConfig")]:
        with pytest.raises(TPFuseInputError, match=match):
            tpfuse.TPCommunicator(**kwargs)
    return True


def test_constructor_errors():
    assert run_on_ranks(_constructor_errors, 2) == [True, True]


def test_no_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(TPFuseError, match="not initialized"):
        tpfuse.TPCommunicator(max_tokens=4, hidden_size=8)


def _mismatch_detected(rank, world):
    """Debug mode: ranks that disagree (token count, op, one rank's bad input) all raise; none hangs."""
    comm = tpfuse.TPCommunicator(max_tokens=8, hidden_size=H, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(debug=True))
    inp = make_inputs(5, world, 8, H, torch.bfloat16)
    w = inp.weight
    # different token counts per rank
    t = 4 if rank == 0 else 3
    with pytest.raises(TPFuseMismatchError, match="different calls"):
        comm.fused_add_rmsnorm(inp.xs[rank][:t], inp.residual[:t], w)
    # different ops on different ranks
    with pytest.raises(TPFuseMismatchError, match="different calls"):
        if rank == 0:
            comm.all_reduce(inp.xs[rank])
        else:
            comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, w)
    # only the last rank passes a bad tensor: it raises its own error, the others a mismatch naming it
    bad = inp.xs[rank].float() if rank == world - 1 else inp.xs[rank]
    expected = TPFuseInputError if rank == world - 1 else TPFuseMismatchError
    with pytest.raises(expected):
        comm.fused_add_rmsnorm(bad, inp.residual, w)
    # and the communicator still works
    out, _ = comm.fused_add_rmsnorm(inp.xs[rank], inp.residual, w)
    assert_close(out, oracle(inp, 1e-6)[0], torch.bfloat16, "after mismatches")
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_debug_mode_detects_cross_rank_mismatch(world):
    assert run_on_ranks(_mismatch_detected, world) == [True] * world
