"""Standalone quantizer (Triton): ``x [T, H]`` (any float dtype) -> the formats of :mod:`tpfuse.quant`, through the
shared epilogue :func:`tpfuse.kernels.quant_epilogue.quant_store_tile`. Used by unfused baselines and tests.

Grid as :mod:`.silu_mul`: 1-D, ``n_tiles * cdiv(T, ROWS)`` programs, tile index fastest, each program one
``BLOCK``-wide tile of ``ROWS`` consecutive rows; swizzled NVFP4 pad rows shared out over all programs
(:func:`quant_epilogue.nvfp4_pad_rows`); per-token FP8 uses one tile per row (the scale needs the row's amax).
``BLOCK``, ``ROWS``, ``num_warps``: :func:`tpfuse.kernels.local_configs.lookup`.

``_quantize_amax_kernel`` (:func:`tpfuse.ops.quantize_from_amax`): per-token FP8 of ``x [T, H]`` whose per-token
maxima the producer left as partials ``amax [P, T]`` (fp32, the max ``|x|`` of groups of features; the small-M
GEMM's AMAX_OUT epilogue): each program reduces its row's P partials to the scale and quantizes one
:data:`AMAX_BLOCK`-wide tile of that row (grid ``(cdiv(H, AMAX_BLOCK), T)``; the tile-0 program stores the scale),
so a row is spread over many programs instead of the one that must see the whole row. The arithmetic is the
per-token epilogue's (:func:`quant_epilogue.fp8_dynamic_scale`, ``fp8_cast(x * div_rn(1, scale))``): with exact
partials the bytes equal :func:`tpfuse.quant.fp8_quantize_per_token`'s.
"""

import triton
import triton.language as tl

from . import pdl
from .quant_epilogue import (FMT_NVFP4_SWIZZLED, cap_contiguity, fp8_cast, fp8_dynamic_scale, launch_row_tiles,
                             max_nan, nvfp4_pad_rows, quant_store_row_tile, row_tile)

AMAX_BLOCK = 1024  # features a program quantizes: 8 bf16 (16 bytes) a thread at 4 warps; 14 programs an 8B row


@triton.jit(do_not_specialize=["n_rows", "n_progs"])
def _quantize_kernel(x_ptr, x_stride, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, n_rows, n_cols,
                     n_sf_cols, sf_cols_padded, n_tiles, n_progs, FMT: tl.constexpr, BLOCK: tl.constexpr,
                     GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    pid, tile, c0, cols, mask = row_tile(n_tiles, n_cols, BLOCK)
    for i in tl.static_range(ROWS):
        row = (pid // n_tiles) * ROWS + i
        if row < n_rows:
            x = tl.load(x_ptr + row.to(tl.int64) * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            quant_store_row_tile(x, c0, tile, n_cols, row, n_rows, out_ptr, out_stride, scale_ptr, scale_stride,
                                 in_scale_ptr, n_sf_cols, sf_cols_padded, FMT, BLOCK, GROUP, PAD_BLOCK)
    if FMT == FMT_NVFP4_SWIZZLED:
        nvfp4_pad_rows(pid, n_progs, n_rows, scale_ptr, sf_cols_padded)


def launch_quantize(x, data, scale, in_scale, fmt, group_size, config=None):
    """Quantize ``x [T, H]`` into ``data`` / ``scale`` (:func:`tpfuse.quant.alloc_outputs`)."""
    launch_row_tiles(_quantize_kernel, "quantize", x, x.shape[1], data, scale, in_scale, fmt, group_size, config)


@triton.jit(do_not_specialize=["n_rows", "n_parts"])
def _quantize_amax_kernel(x_ptr, x_stride, amax_ptr, n_parts, out_ptr, out_stride, scale_ptr, n_rows, n_cols,
                          BLOCK: tl.constexpr, P_BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    tile = tl.program_id(0)
    row = tl.program_id(1)
    p = tl.arange(0, P_BLOCK)
    part = tl.load(amax_ptr + p * n_rows + row, mask=p < n_parts, other=0.0)
    scale = fp8_dynamic_scale(tl.reduce(part, 0, max_nan))
    inv = tl.math.div_rn(1.0, scale)
    lane = tl.arange(0, BLOCK)
    cols = tile * BLOCK + lane
    mask = cols < n_cols
    x = tl.load(x_ptr + row.to(tl.int64) * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + row.to(tl.int64) * out_stride + tile * BLOCK
    tl.store(out + cap_contiguity(lane, 8), fp8_cast(x * inv), mask=mask)
    if tile == 0:
        tl.store(scale_ptr + row, scale)


def launch_quantize_from_amax(x, amax, data, scale) -> None:
    """Per-token FP8 of ``x [T, H]`` into ``data`` (e4m3 ``[T, H]``) and ``scale`` (fp32 ``[T, 1]``, contiguous)
    from the partial maxima ``amax [P, T]``; with PDL inside :func:`.pdl.launches`."""
    from . import fast_launch

    t, h = x.shape
    if t == 0:
        return
    on = pdl.wanted(data)
    fast_launch.launch(_quantize_amax_kernel, (triton.cdiv(h, AMAX_BLOCK), t),
                       (x, x.stride(0), amax, amax.shape[0], data, data.stride(0), scale, t, h),
                       {"BLOCK": AMAX_BLOCK, "P_BLOCK": triton.next_power_of_2(amax.shape[0]), "PDL": on}, 4, None,
                       on)
