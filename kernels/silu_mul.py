"""SiLU(gate) * up (+ quantize) in Triton for a ``[T, 2I]`` gate-up input (gate first), fp32 math.

Grid ``(rows, cdiv(I, BLOCK))``: tiles along I (BLOCK a multiple of 128, so FP8 groups and NVFP4 blocks never
straddle tiles); per-token FP8 uses one tile covering the whole row (its scale is the row amax).
"""

import triton
import triton.language as tl

from .quant_epilogue import (FMT_FP8_PER_TOKEN, epilogue_args, next_pow2, nvfp4_swizzled_pad, padded_rows,
                             quant_store)


@triton.jit
def _silu_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                     n_rows, n_cols, n_sf_cols, sf_cols_padded,
                     FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    if row < n_rows:
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        base = x_ptr + row.to(tl.int64) * x_stride
        g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        # silu(g) = g * sigmoid(g) = g / (1 + exp(-g))
        y = (g / (1.0 + tl.exp(-g))) * u
        quant_store(y, cols, mask, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded,
                    FMT, BLOCK, GROUP)
    if FMT == 5:
        if tile == 0:
            nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)


def pick_block(n_cols: int, fmt: int, max_block: int = 2048) -> int:
    if fmt == FMT_FP8_PER_TOKEN:
        return next_pow2(n_cols)
    return max(128, min(next_pow2(n_cols), max_block))


def launch_silu_mul(x, data, scale, in_scale, fmt, group):
    t, two_i = x.shape
    inter = two_i // 2
    rows = padded_rows(fmt, t)
    if rows == 0:
        return
    out_stride, scale_t, scale_stride, in_scale_t, n_sf, sf_pad = epilogue_args(fmt, inter, data, scale, in_scale)
    block = pick_block(inter, fmt)
    nw = max(4, min(16, block // 256))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        x, x.stride(0), data, out_stride, scale_t, scale_stride, in_scale_t, t, inter, n_sf, sf_pad,
        FMT=fmt, BLOCK=block, GROUP=group, PAD_BLOCK=next_pow2(sf_pad), num_warps=nw)
