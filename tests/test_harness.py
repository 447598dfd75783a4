"""The multi-rank helper itself: a failure on one rank fails the call, a hang is cut off, and the next call gets
fresh, working ranks."""

import time

import pytest
import torch
import torch.distributed as dist

from harness import run_on_ranks


def _ok(rank, world):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return rank, world, t.item()


def _fail_on_last(rank, world):
    if rank == world - 1:
        raise ValueError("boom on the last rank")
    return rank


def _hang_on_last(rank, world):
    if rank == world - 1:
        time.sleep(120)
    return rank


def test_runs_on_every_rank():
    assert run_on_ranks(_ok, 3) == [(r, 3, 6.0) for r in range(3)]


def test_failure_on_one_rank_fails_the_call():
    with pytest.raises(AssertionError, match="boom on the last rank"):
        run_on_ranks(_fail_on_last, 2)
    assert run_on_ranks(_ok, 2) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_hang_is_cut_off():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="gave no answer in time"):
        run_on_ranks(_hang_on_last, 2, timeout_s=5)
    assert time.monotonic() - t0 < 60
    assert run_on_ranks(_ok, 2)[0] == (0, 2, 3.0)


def _last_dies(rank, world):
    if rank == world - 1:
        import os

        os._exit(0)
    return rank


def _nobody_dies(rank, world):
    return rank


def test_a_rank_meant_to_die():
    # the survivors' results come back, the dead rank's is None, and the next call gets a fresh pool
    assert run_on_ranks(_last_dies, 2, dies=(1,), timeout_s=60) == [0, None]
    # a rank listed in `dies` that returns instead fails the call
    with pytest.raises(AssertionError, match="was meant to die"):
        run_on_ranks(_nobody_dies, 2, dies=(1,), timeout_s=60)
    assert run_on_ranks(_ok, 2)[1][:2] == (1, 2)
