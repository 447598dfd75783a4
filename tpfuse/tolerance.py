"""The one tolerance module: how close a result must be to the fp64/fp32 reference, per dtype and format.

Tests, the demo and the benchmarks' correctness checks all use these numbers. Errors are relative norms
``||out - ref|| / ||ref||`` (METHOD.md) unless a function says otherwise.
"""

from __future__ import annotations

import torch

# relative-norm error of a result rounded to this dtype once or a few times (bf16 has 8 significant bits)
REL_ERR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the quantized formats: one rounding to e4m3 (3 mantissa bits) / e2m1 (1 mantissa bit) of each element
REL_ERR_FP8 = 6e-2
REL_ERR_NVFP4 = 1.6e-1
# logits of a whole decoder stack (a few layers, O(1) random weights, as tpfuse.models.hf_tiny and the parallelize
# tests draw them) run in this dtype, vs the fp64 oracle with the same (rounded) weights: every layer rounds the
# residual stream, q/k/v, attention, the MLP activations and the GEMM outputs, and the lm_head sums 2048+ of them.
# Measured (CPU, transformers' own unsharded forward, 2 layers, hidden 2048, heads 16/8, head_dim 128, MLP 5632,
# vocab 32000, 40 tokens): bf16 0.0071 (Llama) / 0.0073 (Qwen3), worst row 0.0081; fp32 5.5e-7. fp16 is not
# measured: the bf16 budget / 8 (3 more mantissa bits), rounded up. The budgets leave ~3x headroom and stay far
# below what a sharding / position / norm bug does to the same logits (0.17 for one ignored norm weight, 0.37 for
# two swapped kv heads, ~1 for one token at the wrong position).
REL_ERR_LOGITS = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
# logits of an FP8 model (tpfuse.parallel.quantize_fp8: e4m3 weights, per-token or static e4m3 activations into
# every decoder GEMM, bf16 elsewhere) vs the fp64 oracle of the same model with its e4m3 weights dequantized (so
# the budget covers the activation quantization and bf16 rounding, not the weight rounding). Measured (CPU, the
# tiny O(1)-weight models of tests/distributed/model_cases.py, 2 layers, hidden 64, TP 1/2/4, all-reduce and
# sequence-parallel, per-channel / per-tensor weights, per-token / static activations): 0.045 - 0.115 over
# prefills, worst single decode row 0.144. Budget: ~1.7x the worst row; a dropped weight scale or a wrong head /
# shard moves these logits by O(1).
REL_ERR_LOGITS_FP8 = 0.25


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; inf if ``out`` has a NaN where ``ref`` has none."""
    o, r = out.double(), ref.to(out.device).double()
    if torch.isnan(o).ne(torch.isnan(r)).any():
        return float("inf")
    mask = ~torch.isnan(r)
    num = (o[mask] - r[mask]).norm()
    den = r[mask].norm()
    return float(num / den) if den > 0 else float(num)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "", factor: float = 1.0):
    """Raise AssertionError if ``rel_err(out, ref)`` exceeds the dtype's budget (times ``factor``)."""
    err, tol = rel_err(out, ref), REL_ERR[dtype] * factor
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})")
    return err


def assert_logits_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                        fp8: bool = False) -> float:
    """Raise AssertionError if a model's logits are farther from the oracle's than ``REL_ERR_LOGITS[dtype]``
    (``REL_ERR_LOGITS_FP8`` for an FP8 model, ``fp8=True``); returns the relative error."""
    err, tol = rel_err(out, ref), (REL_ERR_LOGITS_FP8 if fp8 else REL_ERR_LOGITS[dtype])
    if not err <= tol:
        raise AssertionError(f"{what}: logits relative error {err:.3e} > {tol:.1e} ({dtype})")
    return err


def fp8_step(value: torch.Tensor) -> torch.Tensor:
    """Size of one e4m3 quantization step at ``|value|`` (in the scaled domain): 2^(floor(log2|v|) - 3), with the
    subnormal step 2^-9 below 2^-6 and the step at 448 (32) beyond, where e4m3 saturates (Inf included). Exact
    on every device: the exponent comes from ``frexp`` (``|v| = m * 2^e``, ``m`` in [0.5, 1)), not from a ``log2``
    that may round up just below a power of two."""
    v = value.abs().float().clamp(min=2.0 ** -6, max=448.0)
    _, e = torch.frexp(v)
    return torch.ldexp(torch.ones_like(v), e - 4)


def e2m1_step(value: torch.Tensor) -> torch.Tensor:
    """Spacing of the e2m1 grid around ``|value|``: 0.5 below 2, 1 below 4, 2 above."""
    v = value.abs().float()
    return torch.where(v < 2, torch.full_like(v, 0.5), torch.where(v < 4, torch.ones_like(v), torch.full_like(v, 2.0)))


def assert_quant_close(qa, ref: torch.Tensor, what: str = "", scale_rtol: float = None,
                       value_atol: torch.Tensor = None) -> None:
    """A quantized output is within one quantization step of quantizing ``ref`` (fp64/fp32 oracle values).

    FP8: the scales agree to fp32 rounding (relative ``scale_rtol`` instead, for a path whose contract rounds the
    values to the activation dtype before quantizing, e.g. NCCL's sum in bf16) and every dequantized element is
    within one e4m3 step of ``ref`` (plus ``value_atol``, per element and in ``ref``'s units, where the path's
    contract allows an error before the quantization: FP8 tensor-core sums, ``tests/test_small_m_gemm.py``).
    NVFP4: every block scale is within one e4m3 step of the oracle's, and every element within one e2m1 step
    (at the output's own block scale) of ``ref``. NaN positions must match.
    The check runs on the output's device (``ref`` is moved there): the oracle's reference quantizer is the same
    fp32 arithmetic on every device, and on a GPU the check of a large output costs milliseconds, not seconds."""
    from . import quant as q  # local import: tolerance is imported by tpfuse/__init__

    spec = qa.spec
    dev = qa.data.device
    ref32 = ref.float().to(dev)
    if isinstance(spec, q.NVFP4):
        _assert_nvfp4_close(qa, ref32, what)
        return
    deq = qa.dequantize(torch.float32)
    r = ref32
    if isinstance(spec, q.FP8Static):
        scale = spec.scale.to(dev).float().reshape(()).expand_as(r)
    else:
        ref_q = q.quantize(r, spec)
        s_out, s_ref = qa.scale.float(), ref_q.scale.float()
        if not torch.equal(torch.isnan(s_out), torch.isnan(s_ref)):
            raise AssertionError(f"{what}: FP8 scales have NaN where the oracle has none (or vice versa)")
        m = ~torch.isnan(s_ref)
        rtol = 1e-5 if scale_rtol is None else scale_rtol
        if not torch.allclose(s_out[m], s_ref[m], rtol=rtol, atol=0):
            raise AssertionError(f"{what}: FP8 dynamic scales differ from the oracle's by more than rtol {rtol:.1e}")
        if isinstance(spec, q.FP8PerToken):
            scale = s_out.expand_as(r)
        else:
            scale = s_out.repeat_interleave(spec.group_size, dim=1)
    sat = (r / scale).abs() >= q.FP8_MAX
    step = fp8_step((r / scale).clamp(-q.FP8_MAX, q.FP8_MAX)) * scale
    bound = step * 1.001 if value_atol is None else step * 1.001 + value_atol.float().to(dev)
    ok = torch.isnan(r) | sat | ((deq - r).abs() <= bound)
    if (torch.isnan(deq) & ~torch.isnan(r)).any():
        raise AssertionError(f"{what}: FP8 output has NaN where the oracle has none")
    if not ok.all():
        excess = ((deq - r).abs() - bound).masked_fill(ok, float("-inf")).flatten()
        i = int(excess.argmax())
        raise AssertionError(f"{what}: {int((~ok).sum())} FP8 elements more than one e4m3 step from the oracle; "
                             f"worst at flat index {i}: oracle {r.flatten()[i].item():.6g}, output "
                             f"{deq.flatten()[i].item():.6g}, allowed error {bound.flatten()[i].item():.3g}")


def _assert_nvfp4_close(qa, ref32: torch.Tensor, what: str) -> None:
    """:func:`assert_quant_close` for NVFP4: block scales to one e4m3 step, elements to one e2m1 step."""
    from . import quant as q

    spec = qa.spec
    t, h = qa.shape
    gs = spec.global_scale.to(ref32.device).float().reshape(())
    ref_q = q.quantize(ref32, q.NVFP4(gs, layout=spec.layout))
    sf_out = (q.unswizzle_128x4(qa.scale, t, h) if spec.layout == "swizzled128x4" else qa.scale).float()
    sf_ref = (q.unswizzle_128x4(ref_q.scale, t, h) if spec.layout == "swizzled128x4" else ref_q.scale).float()
    both = ~(torch.isnan(sf_out) | torch.isnan(sf_ref))
    if not torch.equal(torch.isnan(sf_out), torch.isnan(sf_ref)):
        raise AssertionError(f"{what}: NVFP4 block scales have NaN where the oracle has none (or vice versa)")
    bad = (sf_out[both] - sf_ref[both]).abs() > fp8_step(sf_ref[both]) * 1.001
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} NVFP4 block scales differ by more than one e4m3 step")
    deq = qa.dequantize(torch.float32).reshape(t, h // 16, 16)
    r = ref32.reshape(t, h // 16, 16)
    unit = (sf_out / gs).unsqueeze(-1)  # value of 1.0 on the e2m1 grid
    ok = torch.isnan(r) | ((deq - r).abs() <= e2m1_step(r / unit) * unit * 1.001 + 1e-30)
    if not ok.all():
        raise AssertionError(f"{what}: {int((~ok).sum())} NVFP4 elements more than one e2m1 step from the oracle")
