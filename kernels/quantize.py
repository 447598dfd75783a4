"""Standalone quantizer (Triton): ``x [T, H]`` (any float dtype) -> the formats of :mod:`tpfuse.quant`, through the
shared epilogue :func:`tpfuse.kernels.quant_epilogue.quant_store_tile`. Used by unfused baselines and tests.

Grid as :mod:`.silu_mul`: 1-D, ``n_tiles * cdiv(T, ROWS)`` programs, tile index fastest, each program one
``BLOCK``-wide tile of ``ROWS`` consecutive rows; swizzled NVFP4 pad rows shared out over all programs
(:func:`quant_epilogue.nvfp4_pad_rows`); per-token FP8 uses one tile per row (the scale needs the row's amax).
``BLOCK``, ``ROWS``, ``num_warps``: :func:`tpfuse.kernels.local_configs.lookup`.
"""

import triton
import triton.language as tl

from . import pdl
from .quant_epilogue import FMT_NVFP4_SWIZZLED, launch_row_tiles, nvfp4_pad_rows, quant_store_row_tile, row_tile


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
