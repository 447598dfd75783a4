"""The sequence-parallel tail kernel (``kernels/reduce_slots.py``): sum of TP partial slots, optionally fused with
residual add + RMSNorm + quant, against the fp64 oracle and the reference quantizer. Runs compiled on a GPU, or
through the Triton interpreter on CPU (the ``kernels`` fixture, tests/kernel_env.py). Outputs are poisoned first."""

import pytest
import torch

import kernel_env
from cases import make_spec
from tpfuse import ops
from tpfuse.reference import rmsnorm_math
from tpfuse.tolerance import assert_close, assert_quant_close

rs = kernel_env.kernels().reduce_slots
DEVICE = kernel_env.DEVICE
pytestmark = pytest.mark.usefixtures("kernels")


def _slots(tp, s, rows, h, gen, outlier_slot=None):
    buf = torch.full((tp * s, h), float("nan"), dtype=torch.bfloat16)  # rows past `rows` must never be read
    for q in range(tp):
        buf[q * s: q * s + rows] = torch.randn(rows, h, generator=gen).to(torch.bfloat16)
    if outlier_slot is not None and rows:
        buf[outlier_slot * s + rows // 2, h // 3] = 200.0
    return buf.to(DEVICE)


@pytest.mark.parametrize("tp,rows,h", [(2, 1, 64), (2, 5, 33), (4, 3, 200), (8, 2, 128)])
def test_sum_slots(tp, rows, h, gen):
    s = rows + 2
    buf = _slots(tp, s, rows, h, gen, outlier_slot=tp - 1)
    out = torch.full((rows, h), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    rs.launch_reduce_slots(buf, tp, s * h, rows, out)
    oracle = sum(buf[q * s: q * s + rows].double() for q in range(tp))
    assert_close(out, oracle, torch.bfloat16, "sum of slots")


@pytest.mark.parametrize("kind", [None, "fp8_static", "fp8_token", "fp8_group64", "nvfp4", "nvfp4_linear"])
@pytest.mark.parametrize("with_res,gemma", [(True, False), (False, True)])
def test_sum_slots_add_rmsnorm(kind, with_res, gemma, gen):
    tp, rows, h = 2, 5, 128
    s = 6
    buf = _slots(tp, s, rows, h, gen, outlier_slot=1)
    res = torch.randn(rows, h, generator=gen).to(torch.bfloat16).to(DEVICE)
    w = (1 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16).to(DEVICE)
    total = sum(buf[q * s: q * s + rows].double() for q in range(tp)) + (res.double() if with_res else 0)
    oracle = rmsnorm_math(total, w.double(), 1e-6, gemma)
    spec = make_spec(kind, DEVICE, oracle)
    fmt, group, in_scale = ops.spec_to_args(spec)
    data, scale = ops.alloc_outputs(rows, h, fmt, group, DEVICE, torch.bfloat16)
    for t in (data, scale):
        t.view(torch.uint8).fill_(0xFF)
    res_out = torch.full((rows, h), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    rs.launch_reduce_slots_rmsnorm(buf, tp, s * h, rows, res if with_res else None, w, 1e-6, res_out, data, scale,
                                   in_scale, fmt, group, gemma)
    assert_close(res_out, total, torch.bfloat16, "residual_out")
    out = ops._wrap(data, scale, spec, res_out, (rows, h))
    if kind is None:
        assert_close(out, oracle, torch.bfloat16, "out")
    else:
        assert_quant_close(out, oracle, f"out {kind}")
        if kind == "nvfp4":  # swizzle padding written as zeros
            padded = scale.view(torch.uint8).flatten().cpu()
            assert (padded != 0xFF).all()
