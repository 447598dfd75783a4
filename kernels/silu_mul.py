"""SiLU(gate) * up (+ quantize) in Triton for a ``[T, 2I]`` gate-up input (gate first), fp32 math.

Programs tile each row along I in tiles of ``BLOCK`` (a multiple of 128, so FP8 groups and NVFP4 blocks never
straddle tiles; per-token FP8 uses one tile covering the whole row, its scale being the row amax). The grid is 1-D,
``n_tiles * cdiv(T, ROWS)`` programs with the tile index fastest (consecutive programs stream consecutive
memory); each program handles one tile of ``ROWS`` consecutive rows (``rows = T``). For swizzled NVFP4 the tile-0
programs zero their rows' scale column padding and all programs share out the pad rows up to ``round_up(T, 128)``
(:func:`quant_epilogue.nvfp4_pad_rows`). ``BLOCK``, ``ROWS`` and ``num_warps`` come from
:func:`tpfuse.kernels.local_configs.lookup`.
"""

import triton
import triton.language as tl

from . import pdl
from .quant_epilogue import FMT_NVFP4_SWIZZLED, launch_row_tiles, nvfp4_pad_rows, quant_store_row_tile, row_tile


@triton.jit(do_not_specialize=["n_rows", "n_progs"])
def _silu_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                     n_rows, n_cols, n_sf_cols, sf_cols_padded, n_tiles, n_progs,
                     FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr,
                     ROWS: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    pid, tile, c0, cols, mask = row_tile(n_tiles, n_cols, BLOCK)
    for i in tl.static_range(ROWS):
        row = (pid // n_tiles) * ROWS + i
        if row < n_rows:
            base = x_ptr + row.to(tl.int64) * x_stride
            g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            # silu(g) = g * sigmoid(g) = g / (1 + exp(-g))
            y = (g / (1.0 + tl.exp(-g))) * u
            quant_store_row_tile(y, c0, tile, n_cols, row, n_rows, out_ptr, out_stride, scale_ptr, scale_stride,
                                 in_scale_ptr, n_sf_cols, sf_cols_padded, FMT, BLOCK, GROUP, PAD_BLOCK)
    if FMT == FMT_NVFP4_SWIZZLED:
        nvfp4_pad_rows(pid, n_progs, n_rows, scale_ptr, sf_cols_padded)


def launch_silu_mul(x, data, scale, in_scale, fmt, group_size, config=None):
    """SiLU(gate) * up of ``x [T, 2I]`` into ``data`` / ``scale`` (:func:`tpfuse.quant.alloc_outputs`)."""
    launch_row_tiles(_silu_mul_kernel, "silu_mul", x, x.shape[1] // 2, data, scale, in_scale, fmt, group_size,
                     config)
