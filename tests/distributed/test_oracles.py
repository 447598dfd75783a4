"""The multi-rank tests' oracles against what a path may legally do (CPU, no process group).

``cases.norm_of_residual`` must accept the ``nccl`` path's quantized output whatever order NCCL / gloo add the bf16
partials in (its contract: the sum rounded to the input dtype, then the fused add + RMSNorm + quant of the local
stage), with an outlier on the last rank; the fp64 ``cases.oracle`` alone cannot (beyond TP=2 it fails them)."""

import random

import pytest
import torch

from cases import QUANT_KINDS, make_inputs, make_spec, norm_of_residual, oracle
from tpfuse import reference
from tpfuse.tolerance import assert_close, assert_quant_close

EPS = 1e-6


def _nccl_like(inp, world, seed, kind, gemma):
    """The nccl path's result with the partials added in bf16 in a shuffled order, as a ring or tree may."""
    order = list(range(world))
    random.Random(seed).shuffle(order)
    s = inp.xs[order[0]].clone()
    for r in order[1:]:
        s = (s.float() + inp.xs[r].float()).to(torch.bfloat16)
    spec = make_spec(kind, "cpu", oracle(inp, EPS, gemma=gemma)[0])
    return reference.add_rmsnorm(s, inp.residual, inp.weight, EPS, quant=spec, gemma=gemma)


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("kind", QUANT_KINDS[1:])
def test_norm_of_residual_accepts_any_order_of_bf16_adds(world, kind):
    for seed in range(4):
        for gemma in (False, True):
            inp = make_inputs(seed, world, 17, 2048, torch.bfloat16, outlier_rank=world - 1)
            out, res = _nccl_like(inp, world, seed, kind, gemma)
            assert_close(res, oracle(inp, EPS, gemma=gemma)[1], torch.bfloat16, "residual_out")
            assert_quant_close(out, norm_of_residual(res, inp.weight, EPS, gemma), f"{kind} TP={world}",
                               scale_rtol=2.0 ** -7)


def test_the_fp64_oracle_alone_rejects_them():
    """Why the nccl checks need norm_of_residual: at TP 4 the rounded sums are more than one e4m3 step off."""
    rejected = 0
    for seed in range(4):
        inp = make_inputs(seed, 4, 17, 2048, torch.bfloat16, outlier_rank=3)
        out, _ = _nccl_like(inp, 4, seed, "fp8_token", False)
        try:
            assert_quant_close(out, oracle(inp, EPS)[0], "fp64 oracle", scale_rtol=2.0 ** -7)
        except AssertionError:
            rejected += 1
    assert rejected == 4
