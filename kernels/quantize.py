"""Standalone quantizer (Triton): ``x [T, H]`` (any float dtype) -> the formats of :mod:`tpfuse.quant`, through the
shared epilogue :func:`tpfuse.kernels.quant_epilogue.quant_store`. Used by unfused baselines and tests.

Grid ``(rows, col_tiles)``: ``rows = round_up(T, 128)`` for swizzled NVFP4 (the extra programs write the scale
buffer's zero padding), else ``T``; per-token FP8 uses one tile per row (the scale needs the row's amax).
"""

import triton
import triton.language as tl

from .quant_epilogue import quant_store, nvfp4_swizzled_pad


@triton.jit
def _quantize_kernel(x_ptr, x_stride, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, n_rows, n_cols,
                     n_sf_cols, sf_cols_padded, FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                     PAD_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    if row < n_rows:
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row.to(tl.int64) * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        quant_store(x, cols, mask, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded,
                    FMT, BLOCK, GROUP)
    if FMT == 5:
        if tile == 0:
            nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)


def launch_quantize(x, data, scale, in_scale, fmt, group, max_block: int = 4096):
    from .quant_epilogue import FMT_FP8_PER_TOKEN, epilogue_args, next_pow2, padded_rows

    t, h = x.shape
    rows = padded_rows(fmt, t)
    if rows == 0:
        return
    out_stride, scale_t, scale_stride, in_scale_t, n_sf, sf_pad = epilogue_args(fmt, h, data, scale, in_scale)
    block = next_pow2(h) if fmt == FMT_FP8_PER_TOKEN else max(128, min(next_pow2(h), max_block))
    nw = max(4, min(16, block // 512))
    _quantize_kernel[(rows, triton.cdiv(h, block))](
        x, x.stride(0), data, out_stride, scale_t, scale_stride, in_scale_t, t, h, n_sf, sf_pad,
        FMT=fmt, BLOCK=block, GROUP=group, PAD_BLOCK=next_pow2(sf_pad), num_warps=nw)
