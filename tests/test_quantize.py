"""The standalone quantizer kernel (``kernels/quantize.py``) through ``tpfuse.ops.quantize``: byte for byte the
reference quantizer (data, scales, swizzle padding) for every format, NaN / Inf included, with poisoned outputs
(tests/local_cases.py). Compiled on a GPU; through the Triton interpreter on CPU (the ``kernels`` fixture,
tests/kernel_env.py). Every launch tiling / rows-per-program stays byte-identical."""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, record_launches
from local_cases import (TILE_CONFIGS, all_specs, as_bytes, assert_quant_bitexact, cfg_id, hard_input,
                          ref_quantize, spec_id)
from tpfuse import ops
from tpfuse import quant as q
from tpfuse.kernels import local_configs as lc

pytestmark = pytest.mark.usefixtures("kernels", "poisoned_outputs")


QUANT_CASES = [  # (tokens, hidden): 1 token, hidden not a multiple of the tile, several tiles, > 128 rows
    (1, 256), (3, 192), (5, 1088),
]


@pytest.mark.parametrize("t,h", QUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_bitexact_all_formats(t, h, dtype, gen):
    x = hard_input(gen, t, h, dtype)
    for spec in all_specs(x.abs().amax()):
        if isinstance(spec, q.FP8PerGroup) and h % spec.group_size:
            continue
        qa = ops.quantize(x, spec)
        assert qa.orig_dtype == dtype and qa.shape == (t, h)
        assert_quant_bitexact(qa, ref_quantize(x, spec), f"quantize {spec_id(spec)} {t}x{h} {dtype}")


def test_quantize_swizzled_many_rows_and_padding(gen):
    # 130 rows: two 128-row tiles, 126 padding rows; H/16 = 10 scale columns, padded to 12
    x = hard_input(gen, 130, 160)
    spec = q.NVFP4(torch.tensor(3.0, device=DEVICE), "swizzled128x4")
    qa = ops.quantize(x, spec)
    assert qa.scale.shape == (256, 12)
    assert_quant_bitexact(qa, ref_quantize(x, spec), "nvfp4 swizzled 130x160")


def test_quantize_nan_inf(gen):
    x = hard_input(gen, 4, 128)
    x[1, 17] = float("nan")
    x[2, 40] = float("inf")
    x[3, 41] = float("-inf")
    for spec in all_specs(torch.tensor(100.0)):
        qa, ref_qa = ops.quantize(x, spec), ref_quantize(x, spec)
        assert_quant_bitexact(qa, ref_qa, f"nan/inf {spec_id(spec)}", allow_nan_payload=True)
        if isinstance(spec, q.FP8Static):  # NaN stays NaN, +-Inf saturates
            assert torch.isnan(qa.data[1, 17].float()) and qa.data[2, 40].float() == 448
        if isinstance(spec, q.FP8PerToken):  # a bad row never looks clean
            assert not torch.isfinite(qa.scale[1:].float()).all(dim=1).any()


def test_quantize_kernel_actually_differs_when_wrong(gen):
    """Guard against a vacuous comparison: a 7% change of the input must change some output byte."""
    x = hard_input(gen, 2, 256)
    spec = q.FP8Static(torch.tensor(0.05, device=DEVICE))
    a = ops.quantize(x, spec)
    b = ops.quantize(x * 1.07, spec)
    assert not torch.equal(as_bytes(a.data), as_bytes(b.data))


# --------------------------------------------------------------------------------------------------------------
# launch configurations (tpfuse.kernels.local_configs)


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=cfg_id)
def test_quantize_launch_configs_bitexact(cfg, gen, kernels, monkeypatch):
    """The standalone quantizer stays byte-identical to the reference under every tiling / rows-per-program."""
    t, h = 5, 640  # 640 = 5 x 128: the last tile of 256 / 512 is partly outside the row
    x = hard_input(gen, t, h, torch.bfloat16)
    rec = record_launches(monkeypatch, kernels.quantize, "_quantize_kernel")
    for spec in all_specs(x.abs().amax(), group_sizes=(64, 128)):
        with lc.forced(lc.LaunchConfig(**cfg)):
            qa = ops.quantize(x, spec)
        grid, kw = rec.launches[-1]
        block = 1024 if isinstance(spec, q.FP8PerToken) else cfg["block"]  # per-token: one whole-row tile
        assert (kw["BLOCK"], kw["ROWS"]) == (block, cfg.get("rows", 1))
        assert grid == (-(-h // block) * -(-t // cfg.get("rows", 1)),)
        assert_quant_bitexact(qa, ref_quantize(x, spec), f"quantize {cfg} {spec_id(spec)}")


# --------------------------------------------------------------------------------------------------------------
# GPU only: large shapes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    @pytest.mark.parametrize("t,h", [(1, 4096), (333, 8192), (4096, 4096)])
    def test_quantize_bitexact_large(self, t, h, gen):
        x = hard_input(gen, t, h, torch.bfloat16)
        for spec in all_specs(x.abs().amax()):
            assert_quant_bitexact(ops.quantize(x, spec), ref_quantize(x, spec), f"gpu quantize {spec_id(spec)}")
