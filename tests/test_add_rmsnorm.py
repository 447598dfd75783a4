"""The local add + RMSNorm (+quant) kernel (``kernels/add_rmsnorm.py``) through ``tpfuse.ops.add_rmsnorm``, against
the fp64 oracle and the CPU reference, with poisoned outputs (tests/local_cases.py says what is compared how).
Compiled on a GPU; through the Triton interpreter on CPU (the ``kernels`` fixture, tests/kernel_env.py).
Launch configurations (tpfuse.kernels.local_configs): multi-row programs and split rows keep the results."""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, record_launches
from local_cases import (PAD_CONFIGS, all_specs, as_bytes, assert_bytes_equal, assert_nvfp4_pads_zero, cfg_id,
                         check_quant_close, cpu_qa, hard_input, nvfp4_pad_case, oracle_norm, randn,
                         ref_add_rmsnorm, spec_id)
from tpfuse import ops, reference
from tpfuse import quant as q
from tpfuse.kernels import local_configs as lc
from tpfuse.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("kernels", "poisoned_outputs")


@pytest.mark.parametrize("t,h", [(1, 33), (3, 257), (2, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rmsnorm_dense(t, h, dtype, gemma, gen):
    x, r, w = randn(gen, t, h, dtype=dtype), randn(gen, t, h, dtype=dtype), randn(gen, h, dtype=dtype)
    out, res = ops.add_rmsnorm(x, r, w, 1e-6, gemma=gemma)
    ref_out, ref_res = ref_add_rmsnorm(x, r, w, 1e-6, gemma=gemma)
    assert out.dtype == dtype and res.dtype == dtype and out.shape == x.shape
    assert torch.equal(res.cpu(), ref_res.cpu()), "residual_out = fp32 add rounded once: must be bit-exact"
    s, oracle = oracle_norm(x, r, w, 1e-6, gemma)
    assert_close(out.cpu(), oracle, dtype, "out")
    assert_close(out.cpu(), ref_out.cpu(), dtype, "out vs reference", factor=0.5)


def test_add_rmsnorm_no_residual_fp32_weight(gen):
    x = randn(gen, 3, 320, dtype=torch.bfloat16)
    w32 = (1 + torch.rand(320, generator=gen) * 1e-2).to(DEVICE)  # differences bf16 cannot hold
    out, res = ops.add_rmsnorm(x, None, w32, 1e-6)
    assert torch.equal(res.cpu(), x.cpu())
    _, oracle = oracle_norm(x, None, w32, 1e-6, False)
    _, oracle_bf16w = oracle_norm(x, None, w32.to(torch.bfloat16), 1e-6, False)
    want = oracle.to(torch.bfloat16)
    # the check is sensitive: reading the weight as bf16 would change many rounded outputs
    assert (oracle_bf16w.to(torch.bfloat16) != want).float().mean() > 0.1
    assert (out.cpu() == want).float().mean() > 0.98
    assert_close(out.cpu(), oracle, torch.bfloat16, "fp32 weight")


def test_add_rmsnorm_residual_inplace(gen):
    x, r, w = (randn(gen, 4, 96, dtype=torch.bfloat16), randn(gen, 4, 96, dtype=torch.bfloat16),
               randn(gen, 96, dtype=torch.bfloat16))
    r_before = r.clone()
    ref_out, ref_res = ref_add_rmsnorm(x, r_before, w, 1e-6)
    out, res = ops.add_rmsnorm(x, r, w, 1e-6, residual_inplace=True)
    assert res.data_ptr() == r.data_ptr()
    assert torch.equal(r.cpu(), ref_res.cpu())
    assert_close(out.cpu(), ref_out.cpu(), torch.bfloat16, "in-place out", factor=0.5)
    # quantized output with in-place residual
    r2 = r_before.clone()
    qa, res2 = ops.add_rmsnorm(x, r2, w, 1e-6, quant=q.FP8PerToken(), residual_inplace=True)
    assert torch.equal(r2.cpu(), ref_res.cpu()) and res2.data_ptr() == r2.data_ptr()
    _, oracle = oracle_norm(x, r_before, w, 1e-6, False)
    check_quant_close(qa, oracle, "in-place + per-token")


@pytest.mark.parametrize("t,h", [(1, 256), (3, 384), (130, 128)])
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rmsnorm_quantized(t, h, gemma, gen):
    x = hard_input(gen, t, h, torch.bfloat16)
    r = randn(gen, t, h, dtype=torch.bfloat16)
    w = randn(gen, h, dtype=torch.bfloat16)
    s, oracle = oracle_norm(x, r, w, 1e-5, gemma)
    for spec in all_specs(oracle.abs().amax()):
        if isinstance(spec, q.FP8PerGroup) and h % spec.group_size:
            continue
        what = f"add_rmsnorm {spec_id(spec)} {t}x{h} gemma={gemma}"
        qa, res = ops.add_rmsnorm(x, r, w, 1e-5, quant=spec, gemma=gemma)
        assert qa.orig_dtype == torch.bfloat16 and qa.shape == (t, h)
        check_quant_close(qa, oracle, what)
        ref_qa, ref_res = ref_add_rmsnorm(x, r, w, 1e-5, quant=spec, gemma=gemma)
        assert torch.equal(res.cpu(), ref_res.cpu())
        # few-ulp differences of the fp32 norm may flip a rounding: allow <= 1% of the bytes to differ
        diff = (as_bytes(qa.data) != as_bytes(ref_qa.data)).float().mean().item()
        assert diff <= 0.01, f"{what}: {diff:.2%} of data bytes differ from the reference"
        if isinstance(spec, q.NVFP4) and spec.layout == "swizzled128x4":
            pad = q.unswizzle_128x4(qa.scale, qa.scale.shape[0], qa.scale.shape[1] * 16)  # whole padded buffer
            assert torch.equal(as_bytes(pad[t:]), torch.zeros_like(as_bytes(pad[t:]))), "swizzle pad rows not zero"


def test_add_rmsnorm_nan_inf_propagate():
    x = torch.ones(4, 64, device=DEVICE)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    x[3, 9] = float("-inf")
    w = torch.ones(64, device=DEVICE)
    r = torch.zeros(4, 64, device=DEVICE)
    out, res = ops.add_rmsnorm(x, r, w, 1e-6)
    ref_out, ref_res = ref_add_rmsnorm(x, r, w, 1e-6)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref_out.cpu()))
    assert torch.isnan(out[1]).all() and torch.isnan(out[2, 0]) and not torch.isnan(out[0]).any()
    assert torch.equal(torch.isnan(res.cpu()), torch.isnan(ref_res.cpu())) and torch.equal(res.cpu().nan_to_num(), ref_res.cpu().nan_to_num())
    for spec in (q.FP8Static(torch.tensor(0.1, device=DEVICE)), q.FP8PerToken(), q.FP8PerGroup(64),
                 q.NVFP4(torch.tensor(100.0, device=DEVICE)), q.NVFP4(torch.tensor(100.0, device=DEVICE), "linear")):
        qa, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
        ref_qa, _ = ref_add_rmsnorm(x, r, w, 1e-6, quant=spec)
        what = f"nan/inf {spec_id(spec)}"
        # rows 1..3 hold only NaN / 0 after the norm on both sides: bit-exact up to NaN payloads. Row 0 is
        # rsqrt(1 + eps), which the GPU's approximate rsqrt may round one ulp away: it is left to the other tests.
        assert_bytes_equal(qa.data[1:], ref_qa.data[1:], what + " data", allow_nan_payload=True)
        if isinstance(spec, q.NVFP4) and spec.layout == "swizzled128x4":
            sf, sf_ref = q.unswizzle_128x4(qa.scale.cpu(), 4, 64), q.unswizzle_128x4(ref_qa.scale, 4, 64)
            assert_bytes_equal(sf[1:], sf_ref[1:], what + " scale", allow_nan_payload=True)
        elif not isinstance(spec, q.FP8Static):
            assert_bytes_equal(qa.scale[1:], ref_qa.scale[1:], what + " scale", allow_nan_payload=True)
        deq = cpu_qa(qa).dequantize(torch.float32)
        assert torch.equal(torch.isnan(deq), torch.isnan(ref_qa.dequantize(torch.float32))), what
        assert torch.isnan(deq[1]).all() and not torch.isnan(deq[0]).any(), what


# --------------------------------------------------------------------------------------------------------------
# launch configurations (tpfuse.kernels.local_configs): every knob keeps the results


NORM_CONFIGS = [dict(num_warps=4, rows=2), dict(num_warps=2, rows=4), dict(num_warps=4, split=2),
                dict(num_warps=2, split=4)]


NORM_CASES = [(3, 512, c) for c in NORM_CONFIGS] + [(130, 256, dict(num_warps=2, rows=4)),
                                                     (130, 256, dict(num_warps=4, split=2))]


@pytest.mark.parametrize("t,h,cfg", NORM_CASES,
                         ids=lambda c: cfg_id(c) if isinstance(c, dict) else str(c))
def test_add_rmsnorm_launch_configs(t, h, cfg, gen, kernels, monkeypatch):
    """Multi-row programs and split rows: the launch really uses them (grid, ROWS, SPLIT) and the results stay
    those of the default launch (bit-identical residual; outputs bit-identical under the interpreter, within the
    usual few-ulp tolerance compiled) and of the reference."""
    x = hard_input(gen, t, h, torch.bfloat16)
    r = randn(gen, t, h, dtype=torch.bfloat16)
    w = randn(gen, h, dtype=torch.bfloat16)
    s, oracle = oracle_norm(x, r, w, 1e-5, False)
    rec = record_launches(monkeypatch, kernels.add_rmsnorm, "_add_rmsnorm_kernel")
    conf = lc.LaunchConfig(**cfg)
    specs = [None] + all_specs(oracle.abs().amax(), group_sizes=(128,))
    if t == 130:  # the interesting case at 130 rows: the swizzle's pad rows
        specs = [sp for sp in specs if isinstance(sp, q.NVFP4) and sp.layout == "swizzled128x4"]
    for spec in specs:
        what = f"add_rmsnorm {cfg} {t}x{h} {None if spec is None else spec_id(spec)}"
        base, base_res = ops.add_rmsnorm(x, r, w, 1e-5, quant=spec)
        n0 = len(rec.launches)
        with lc.forced(conf):
            got, res = ops.add_rmsnorm(x, r, w, 1e-5, quant=spec)
        (grid, kw), = rec.launches[n0:]
        split = 1 if isinstance(spec, q.FP8PerToken) else cfg.get("split", 1)
        assert (kw["ROWS"], kw["SPLIT"], kw["num_warps"]) == (cfg.get("rows", 1), split, cfg["num_warps"]), what
        assert grid == (-(-t // cfg.get("rows", 1)), split), what  # real rows only (swizzle pad rows shared out)
        assert torch.equal(res.cpu(), base_res.cpu()), what
        if spec is None:
            assert_close(got.cpu(), oracle, torch.bfloat16, what)
            same = torch.equal(as_bytes(got), as_bytes(base))
        else:
            check_quant_close(got, oracle, what)
            same = torch.equal(as_bytes(got.data), as_bytes(base.data)) and torch.equal(as_bytes(got.scale),
                                                                                     as_bytes(base.scale))
            ref_qa, _ = ref_add_rmsnorm(x, r, w, 1e-5, quant=spec)
            diff = (as_bytes(got.data) != as_bytes(ref_qa.data)).float().mean().item()
            assert diff <= 0.01, f"{what}: {diff:.2%} of data bytes differ from the reference"
            if isinstance(spec, q.NVFP4) and spec.layout == "swizzled128x4":
                pad = q.unswizzle_128x4(got.scale, got.scale.shape[0], got.scale.shape[1] * 16)
                assert torch.equal(as_bytes(pad[t:]), torch.zeros_like(as_bytes(pad[t:]))), what + ": pad rows"
        if not ON_GPU and "split" not in cfg:
            assert same, f"{what}: a multi-row program changed the math"


@pytest.mark.parametrize("cfg", PAD_CONFIGS, ids=str)
def test_nvfp4_swizzled_pad_columns_and_rows(cfg, gen):
    """H/16 = 10 scale columns (padded to 12) and 3 of 128 rows: both paddings zero under every launch shape."""
    x, r, w, oracle, spec = nvfp4_pad_case(gen)
    with lc.forced(None if cfg is None else lc.LaunchConfig(**cfg)):
        qa, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
    assert_nvfp4_pads_zero(qa, x.shape[0], "add_rmsnorm")
    check_quant_close(qa, oracle, "add_rmsnorm nvfp4 160")


def test_add_rmsnorm_inplace_never_splits(gen, kernels, monkeypatch):
    x, r, w = (randn(gen, 2, 256, dtype=torch.bfloat16), randn(gen, 2, 256, dtype=torch.bfloat16),
               randn(gen, 256, dtype=torch.bfloat16))
    ref_out, ref_res = ref_add_rmsnorm(x, r, w, 1e-6)
    rec = record_launches(monkeypatch, kernels.add_rmsnorm, "_add_rmsnorm_kernel")
    with lc.forced(lc.LaunchConfig(num_warps=2, split=2)):
        out, res = ops.add_rmsnorm(x, r, w, 1e-6, residual_inplace=True)
        ops.add_rmsnorm(x, r.clone(), w, 1e-6)  # not in place: splits
    assert [(g, kw["SPLIT"]) for g, kw in rec.launches] == [((2, 1), 1), ((2, 2), 2)]
    assert torch.equal(r.cpu(), ref_res.cpu())
    assert_close(out.cpu(), ref_out.cpu(), torch.bfloat16, "in place", factor=0.5)


# --------------------------------------------------------------------------------------------------------------
# GPU only: large shapes


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    @pytest.mark.parametrize("h", [4096, 8192])
    @pytest.mark.parametrize("t", [1, 7, 1024, 4096])
    def test_add_rmsnorm_large(self, t, h, gen):
        x = randn(gen, t, h, dtype=torch.bfloat16)
        r = randn(gen, t, h, dtype=torch.bfloat16)
        w = randn(gen, h, dtype=torch.bfloat16)
        out, res = ops.add_rmsnorm(x, r, w, 1e-6)
        ref_out, ref_res = ref_add_rmsnorm(x, r, w, 1e-6)
        assert torch.equal(res.cpu(), ref_res)
        assert_close(out.cpu(), ref_out.float(), torch.bfloat16, "large out", factor=0.5)
        ref32 = reference.rmsnorm_math(x.cpu().float() + r.cpu().float(), w.cpu(), 1e-6)
        for spec in all_specs(ref32.abs().amax(), group_sizes=(128,)):
            qa, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
            check_quant_close(qa, ref32, f"large {spec_id(spec)} {t}x{h}")
