"""Shared pieces of the local-kernel tests (test_add_rmsnorm.py, test_silu_mul.py, test_quantize.py,
test_quant_epilogue.py): inputs, quant specs, the CPU reference and byte-level checks, output poisoning, launch
recording.

Every output buffer the ops allocate is poisoned (:func:`poison_outputs`: 0xFF bytes, NaN for fp32/e4m3/bf16, code
15 for packed e2m1) so an element the kernel forgets to write is caught.

Bit-exactness: the standalone quantizer runs the same fp32 math as :mod:`tpfuse.quant` on the same input, so it is
compared byte for byte (data, scales, swizzle padding). The fused ops' fp32 norm/SiLU values differ from the
reference's by a few ulp (rsqrt / exp approximations and summation order), so their quantized outputs are checked
within one quantization step (``assert_quant_close``) against the fp64 oracle, and their bytes against the
reference quantizer for all but a tiny fraction of elements.
"""

import torch

from kernel_env import DEVICE
from tpfuse import ops, reference
from tpfuse import quant as q
from tpfuse.tolerance import assert_quant_close


def poison_outputs(monkeypatch):
    """Fill every output buffer the public ops allocate with 0xFF bytes before the kernel writes it."""
    alloc, alloc_res = ops.alloc_outputs, ops.alloc_residual_out

    def poisoned_alloc(*a, **k):
        data, scale = alloc(*a, **k)
        data.view(torch.uint8).fill_(0xFF)
        scale.view(torch.uint8).fill_(0xFF)
        return data, scale

    def poisoned_res(x):
        r = alloc_res(x)
        r.view(torch.uint8).fill_(0xFF)
        return r

    monkeypatch.setattr(ops, "alloc_outputs", poisoned_alloc)
    monkeypatch.setattr(ops, "alloc_residual_out", poisoned_res)


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def all_specs(oracle_amax, group_sizes=(64, 128)):
    gs = q.nvfp4_global_scale(oracle_amax.float()).to(DEVICE)
    specs = [q.FP8Static(torch.tensor(0.05, device=DEVICE)), q.FP8PerToken()]
    specs += [q.FP8PerGroup(g) for g in group_sizes]
    specs += [q.NVFP4(gs, "swizzled128x4"), q.NVFP4(gs, "linear")]
    return specs


def spec_id(spec):
    name = type(spec).__name__
    if isinstance(spec, q.FP8PerGroup):
        return f"{name}{spec.group_size}"
    if isinstance(spec, q.NVFP4):
        return f"{name}-{spec.layout}"
    return name


def cpu_spec(spec):
    """The same spec with its scale tensors on the CPU: every oracle here is the CPU reference. (On CUDA, torch
    divides by a Python scalar as a multiply by its fp32 reciprocal, so ``tpfuse.quant``'s dynamic FP8 scale
    ``amax / 448`` can differ by one ulp between CPU and GPU torch; the kernels do the IEEE division the CPU does.)"""
    if isinstance(spec, q.FP8Static):
        return q.FP8Static(spec.scale.cpu())
    if isinstance(spec, q.NVFP4):
        return q.NVFP4(spec.global_scale.cpu(), spec.layout)
    return spec


def cpu_qa(qa):
    return q.QuantizedActivation(data=qa.data.cpu(), scale=qa.scale.cpu(), spec=cpu_spec(qa.spec),
                                 orig_dtype=qa.orig_dtype, shape=qa.shape)


def ref_quantize(x, spec):
    return q.quantize(x.cpu(), cpu_spec(spec))


def ref_add_rmsnorm(x, r, w, eps, quant=None, gemma=False):
    return reference.add_rmsnorm(x.cpu(), None if r is None else r.cpu(), w.cpu(), eps,
                                 quant=None if quant is None else cpu_spec(quant), gemma=gemma)


def ref_silu_mul(x, quant=None):
    return reference.silu_mul(x.cpu(), quant=None if quant is None else cpu_spec(quant))


def check_quant_close(qa, oracle, what):
    assert_quant_close(cpu_qa(qa), oracle.cpu(), what)


def as_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def assert_bytes_equal(out, ref, what, allow_nan_payload=False):
    """Byte equality; NaN encodings (fp32 / e4m3) may differ in payload/sign when ``allow_nan_payload``."""
    if allow_nan_payload and out.dtype in (torch.float32, q.FP8_DTYPE):
        o, r = out.float().cpu(), ref.float().cpu()
        assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{what}: NaN positions differ"
        keep = ~torch.isnan(r)
        out, ref = out.cpu()[keep], ref.cpu()[keep]
    if out.dim() == 0:
        out, ref = out.reshape(1), ref.reshape(1)
    ob, rb = as_bytes(out), as_bytes(ref)
    assert ob.shape == rb.shape, f"{what}: shape {tuple(ob.shape)} != {tuple(rb.shape)}"
    bad = int((ob != rb).sum())
    assert bad == 0, f"{what}: {bad} of {ob.numel()} bytes differ from the reference quantizer"


def assert_quant_bitexact(qa, ref_qa, what, allow_nan_payload=False):
    assert qa.data.dtype == ref_qa.data.dtype and qa.scale.dtype == ref_qa.scale.dtype, what
    assert_bytes_equal(qa.data, ref_qa.data, what + " data", allow_nan_payload)
    assert_bytes_equal(qa.scale, ref_qa.scale, what + " scale", allow_nan_payload)


def hard_input(gen, t, h, dtype=torch.float32):
    """Random data with outliers, tiny (e4m3-subnormal after scaling) values, zeros and negative zeros."""
    x = torch.randn(t, h, generator=gen) * 2
    x[:, ::7] *= 1e-3
    x[0, 3] = 90.0
    x[-1, h // 2] = -57.0
    x[:, 5] = 0.0
    x[:, 6] = -0.0
    return x.to(dtype).to(DEVICE)


def oracle_norm(x, r, w, eps, gemma):
    s = x.double().cpu() if r is None else x.double().cpu() + r.double().cpu()
    return s, reference.rmsnorm_math(s, w.double().cpu(), eps, gemma)


def cfg_id(c):
    """Test id of a launch-config dict (``num_warps4-rows2``)."""
    return "-".join(f"{k}{v}" for k, v in c.items())


TILE_CONFIGS = [dict(num_warps=4, block=128), dict(num_warps=2, block=256, rows=2),
                dict(num_warps=4, block=512, rows=4)]


def nvfp4_pad_case(gen):
    """3 tokens x 160: H/16 = 10 NVFP4 scale columns (padded to 12) and 3 of 128 rows. Returns
    ``(x, r, w, oracle, spec)``; the global scale is the add + RMSNorm oracle's."""
    t, h = 3, 160
    x = hard_input(gen, t, h, torch.bfloat16)
    r = randn(gen, t, h, dtype=torch.bfloat16)
    w = randn(gen, h, dtype=torch.bfloat16)
    _, oracle = oracle_norm(x, r, w, 1e-6, False)
    spec = q.NVFP4(q.nvfp4_global_scale(oracle.abs().amax().float()).to(DEVICE))
    return x, r, w, oracle, spec


def assert_nvfp4_pads_zero(got, t, what):
    """A swizzled NVFP4 output of ``t`` rows x 160: pad rows and pad scale columns zero, the real scales written."""
    assert got.scale.shape == (128, 12)
    full = q.unswizzle_128x4(got.scale, 128, 12 * 16)
    assert torch.equal(as_bytes(full[t:]), torch.zeros_like(as_bytes(full[t:]))), what + ": pad rows"
    assert torch.equal(as_bytes(full[:t, 10:]), torch.zeros_like(as_bytes(full[:t, 10:]))), what + ": pad columns"
    assert int((as_bytes(full[:t, :10]) == 0).sum()) < 5, what + ": the real scales were written"


PAD_CONFIGS = [None, dict(num_warps=2, split=2), dict(num_warps=2, rows=2)]
