"""Fused residual add + RMSNorm (+ quantize) in Triton: one program per row, the whole hidden row in registers.

Contract (:mod:`tpfuse.reference`): ``s = x + residual`` (fp32); ``residual_out = s`` rounded to ``residual_out``'s
dtype; ``out = s * rsqrt(mean(s^2) + eps) * w`` (``w = weight`` or ``weight + 1`` for Gemma, weight read in its
own dtype and upcast), stored in ``out``'s dtype or quantized by :func:`quant_epilogue.quant_store`.
``residual_out`` may alias ``residual`` (in-place update: each program reads its row before writing it).
"""

import triton
import triton.language as tl

from .quant_epilogue import (FMT_NVFP4_SWIZZLED, epilogue_args, next_pow2, nvfp4_swizzled_pad, padded_rows,
                             rmsnorm_quant_store)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, res_out_ptr, res_out_stride,
                        out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                        n_rows, n_cols, eps, n_sf_cols, sf_cols_padded,
                        HAS_RES: tl.constexpr, GEMMA: tl.constexpr, FMT: tl.constexpr, BLOCK: tl.constexpr,
                        GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if row < n_rows:
        row64 = row.to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = tl.load(x_ptr + row64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(res_ptr + row64 * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rmsnorm_quant_store(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, res_out_stride, out_ptr, out_stride,
                            scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, GEMMA, FMT, BLOCK, GROUP)
    if FMT == 5:
        nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)


def num_warps_for(block: int) -> int:
    return max(4, min(16, block // 512))


def launch_add_rmsnorm(x, residual, weight, eps, residual_out, data, scale, in_scale, fmt, group, gemma):
    """Run the kernel: ``x [T, H]`` (row stride arbitrary, unit column stride), optional ``residual`` (may be the
    same tensor as ``residual_out``), outputs pre-allocated (``data``/``scale`` as in
    :func:`tpfuse.quant.empty_like_quantized`, or ``data`` = plain output for fmt 0)."""
    t, h = x.shape
    rows = padded_rows(fmt, t)
    if rows == 0:
        return
    out_stride, scale_t, scale_stride, in_scale_t, n_sf, sf_pad = epilogue_args(fmt, h, data, scale, in_scale)
    block = next_pow2(h)
    res = residual if residual is not None else x
    _add_rmsnorm_kernel[(rows,)](
        x, x.stride(0), res, res.stride(0), weight, residual_out, residual_out.stride(0),
        data, out_stride, scale_t, scale_stride, in_scale_t,
        t, h, float(eps), n_sf, sf_pad,
        HAS_RES=residual is not None, GEMMA=bool(gemma), FMT=fmt, BLOCK=block, GROUP=group,
        PAD_BLOCK=next_pow2(sf_pad), num_warps=num_warps_for(block))
