"""The local reference math against an fp64 oracle, including the input forms the fused kernels must accept."""

import pytest
import torch

from tpfuse import ops, reference
from tpfuse import quant as q
from tpfuse.tolerance import assert_close, assert_quant_close


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [1, 33, 257])
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rmsnorm_vs_fp64(dtype, hidden, gemma, gen):
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    r = torch.randn(5, hidden, generator=gen).to(dtype)
    w = torch.randn(hidden, generator=gen).to(dtype)
    out, res = ops.add_rmsnorm(x, r, w, 1e-6, gemma=gemma)
    s = x.double() + r.double()
    assert out.dtype == dtype and res.dtype == dtype
    assert_close(res, s, dtype, "residual")
    assert_close(out, reference.rmsnorm_math(s, w.double(), 1e-6, gemma), dtype, "out")


def test_fp32_weight_with_bf16_input_is_computed_in_fp32(gen):
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    w32 = 1 + torch.rand(64, generator=gen) * 1e-3  # differences bf16 cannot hold
    out, _ = ops.add_rmsnorm(x, None, w32, 1e-6)
    oracle = reference.rmsnorm_math(x.double(), w32.double(), 1e-6)
    assert_close(out, oracle, torch.bfloat16, "fp32 weight")


def test_add_rmsnorm_quantized_outputs(gen):
    x = torch.randn(6, 256, generator=gen).to(torch.bfloat16)
    w = torch.randn(256, generator=gen).to(torch.bfloat16)
    s = x.double()
    oracle = reference.rmsnorm_math(s, w.double(), 1e-5)
    for spec in (q.FP8Static(torch.tensor(0.05)), q.FP8PerToken(), q.FP8PerGroup(128), q.FP8PerGroup(64),
                 q.NVFP4(q.nvfp4_global_scale(oracle.abs().amax())), q.NVFP4(1.0, layout="linear")):
        out, _ = ops.add_rmsnorm(x, None, w, 1e-5, quant=spec)
        assert out.orig_dtype == torch.bfloat16
        assert_quant_close(out, oracle, type(spec).__name__)


def test_silu_mul_vs_fp64(gen):
    x = torch.randn(3, 2 * 48, generator=gen).to(torch.bfloat16)
    out = ops.silu_mul(x)
    g, u = x.double().chunk(2, -1)
    oracle = torch.nn.functional.silu(g) * u
    assert out.shape == (3, 48)
    assert_close(out, oracle, torch.bfloat16, "silu_mul")
    assert_quant_close(ops.silu_mul(x, quant=q.FP8PerToken()), oracle, "silu_mul fp8")


def test_nan_and_inf_propagate():
    x = torch.ones(3, 16)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    out, res = ops.add_rmsnorm(x, None, torch.ones(16), 1e-6)
    assert not torch.isnan(out[0]).any()
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).any()
    assert torch.isnan(res[1, 2]) and torch.isinf(res[2, 0])
