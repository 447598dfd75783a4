"""The local SiLU * mul (+quant) kernel (``kernels/silu_mul.py``) through ``tpfuse.ops.silu_mul``, against the fp64
oracle and the CPU reference, with poisoned outputs (tests/local_cases.py). Compiled on a GPU; through the Triton
interpreter on CPU (the ``kernels`` fixture, tests/kernel_env.py). Every launch tiling gives the same bytes."""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, record_launches
from local_cases import (PAD_CONFIGS, TILE_CONFIGS, all_specs, as_bytes, assert_nvfp4_pads_zero, cfg_id,
                         check_quant_close, nvfp4_pad_case, randn, ref_silu_mul, spec_id)
from tpfuse import ops, reference
from tpfuse import quant as q
from tpfuse.kernels import local_configs as lc
from tpfuse.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("kernels", "poisoned_outputs")


@pytest.mark.parametrize("t,inter", [(1, 48), (3, 160), (2, 2176)])
def test_silu_mul(t, inter, gen):
    x = randn(gen, t, 2 * inter, dtype=torch.bfloat16, scale=2.0)
    x[0, 1] = 30.0
    x[-1, 0] = -30.0
    g, u = x.double().cpu().chunk(2, -1)
    oracle = torch.nn.functional.silu(g) * u
    out = ops.silu_mul(x)
    assert out.shape == (t, inter) and out.dtype == torch.bfloat16
    assert_close(out.cpu(), oracle, torch.bfloat16, "silu_mul")
    for spec in all_specs(oracle.abs().amax(), group_sizes=(128,)):
        if (isinstance(spec, q.FP8PerGroup) and inter % spec.group_size) or \
                (isinstance(spec, q.NVFP4) and inter % 16):
            continue
        what = f"silu_mul {spec_id(spec)} {t}x{inter}"
        qa = ops.silu_mul(x, quant=spec)
        assert qa.shape == (t, inter)
        check_quant_close(qa, oracle, what)
        ref_qa = ref_silu_mul(x, quant=spec)
        diff = (as_bytes(qa.data) != as_bytes(ref_qa.data)).float().mean().item()
        assert diff <= 0.01, f"{what}: {diff:.2%} of data bytes differ from the reference"


def test_silu_mul_nan_propagates():
    x = torch.ones(2, 64, device=DEVICE)
    x[0, 3] = float("nan")   # gate
    x[1, 40] = float("nan")  # up
    out = ops.silu_mul(x)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref_silu_mul(x)))
    assert torch.isnan(out[0, 3]) and torch.isnan(out[1, 8]) and int(torch.isnan(out).sum()) == 2


# --------------------------------------------------------------------------------------------------------------
# launch configurations (tpfuse.kernels.local_configs)


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=cfg_id)
def test_silu_mul_launch_configs(cfg, gen, kernels, monkeypatch):
    """SiLU*mul is elementwise (+ order-free amax): every tiling gives the default launch's bytes."""
    t, inter = 3, 640
    x = randn(gen, t, 2 * inter, dtype=torch.bfloat16, scale=2.0)
    rec = record_launches(monkeypatch, kernels.silu_mul, "_silu_mul_kernel")
    gs = torch.tensor(2.0, device=DEVICE)
    for spec in (None, q.FP8Static(torch.tensor(0.05, device=DEVICE)), q.FP8PerGroup(128), q.NVFP4(gs)):
        base = ops.silu_mul(x, quant=spec)
        with lc.forced(lc.LaunchConfig(**cfg)):
            got = ops.silu_mul(x, quant=spec)
        grid, kw = rec.launches[-1]
        assert (kw["BLOCK"], kw["ROWS"], kw["num_warps"]) == (cfg["block"], cfg.get("rows", 1), cfg["num_warps"])
        if spec is None:
            assert torch.equal(as_bytes(got), as_bytes(base))
        else:
            assert torch.equal(as_bytes(got.data), as_bytes(base.data)) and torch.equal(as_bytes(got.scale),
                                                                                     as_bytes(base.scale))


@pytest.mark.parametrize("cfg", PAD_CONFIGS, ids=str)
def test_silu_mul_nvfp4_swizzled_pad_columns_and_rows(cfg, gen):
    """H/16 = 10 scale columns (padded to 12) and 3 of 128 rows: both paddings zero under every launch shape."""
    x, r, _, _, spec = nvfp4_pad_case(gen)
    with lc.forced(None if cfg is None else lc.LaunchConfig(**cfg)):
        sq = ops.silu_mul(torch.cat([x, r], 1), quant=spec)
    assert_nvfp4_pads_zero(sq, x.shape[0], "silu_mul")


# --------------------------------------------------------------------------------------------------------------
# GPU only: large shapes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    @pytest.mark.parametrize("t", [1, 64, 2048])
    def test_silu_mul_large(self, t, gen):
        x = randn(gen, t, 2 * 14336, dtype=torch.bfloat16)
        ref32 = reference.silu_mul(x.cpu().float())
        assert_close(ops.silu_mul(x).cpu(), ref32, torch.bfloat16, "silu large")
        for spec in all_specs(ref32.abs().amax(), group_sizes=(128,)):
            check_quant_close(ops.silu_mul(x, quant=spec), ref32, f"silu large {spec_id(spec)}")
