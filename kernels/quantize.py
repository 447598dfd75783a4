"""Standalone quantizer (Triton): ``x [T, H]`` (any float dtype) -> the formats of :mod:`tpfuse.quant`, through the
shared epilogue :func:`tpfuse.kernels.quant_epilogue.quant_store_tile`. Used by unfused baselines and tests.

Grid as :mod:`.silu_mul`: 1-D, ``n_tiles * cdiv(T, ROWS)`` programs, tile index fastest, each program one
``BLOCK``-wide tile of ``ROWS`` consecutive rows; swizzled NVFP4 pad rows shared out over all programs
(:func:`quant_epilogue.nvfp4_pad_rows`); per-token FP8 uses one tile per row (the scale needs the row's amax).
``BLOCK``, ``ROWS``, ``num_warps``: :func:`tpfuse.kernels.local_configs.lookup`.
"""

import triton
import triton.language as tl

from . import fast_launch, local_configs
from .quant_epilogue import epilogue_args, next_pow2, nvfp4_pad_rows, nvfp4_swizzled_pad, quant_store_tile


@triton.jit(do_not_specialize=["n_rows", "n_progs"])
def _quantize_kernel(x_ptr, x_stride, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, n_rows, n_cols,
                     n_sf_cols, sf_cols_padded, n_tiles, n_progs, FMT: tl.constexpr, BLOCK: tl.constexpr,
                     GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid % n_tiles
    c0 = tile * BLOCK
    cols = c0 + tl.arange(0, BLOCK)
    mask = cols < n_cols
    for i in tl.static_range(ROWS):
        row = (pid // n_tiles) * ROWS + i
        if row < n_rows:
            x = tl.load(x_ptr + row.to(tl.int64) * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            quant_store_tile(x, c0, n_cols, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                             sf_cols_padded, FMT, BLOCK, GROUP)
            if FMT == 5:
                if (tile == 0) & (n_sf_cols < sf_cols_padded):  # H/16 not a multiple of 4: this row's pad columns
                    nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)
    if FMT == 5:
        nvfp4_pad_rows(pid, n_progs, n_rows, scale_ptr, sf_cols_padded)


def launch_quantize(x, data, scale, in_scale, fmt, group, config=None):
    t, h = x.shape
    if t == 0:
        return
    cfg = local_configs.lookup("quantize", fmt, h, t, group) if config is None else \
        local_configs.sanitize("quantize", fmt, h, group, config)
    out_stride, scale_t, scale_stride, in_scale_t, n_sf, sf_pad = epilogue_args(fmt, h, data, scale, in_scale)
    block, rows = cfg.block, cfg.rows
    n_tiles = (h + block - 1) // block
    n_progs = n_tiles * ((t + rows - 1) // rows)
    fast_launch.launch(
        _quantize_kernel, (n_progs,),
        (x, x.stride(0), data, out_stride, scale_t, scale_stride, in_scale_t, t, h, n_sf, sf_pad, n_tiles, n_progs),
        {"FMT": fmt, "BLOCK": block, "GROUP": group, "PAD_BLOCK": next_pow2(sf_pad), "ROWS": rows},
        cfg.num_warps, cfg.num_stages)

