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

from . import fast_launch, local_configs
from .quant_epilogue import epilogue_args, next_pow2, nvfp4_pad_rows, nvfp4_swizzled_pad, quant_store_tile


@triton.jit(do_not_specialize=["n_rows", "n_progs"])
def _silu_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                     n_rows, n_cols, n_sf_cols, sf_cols_padded, n_tiles, n_progs,
                     FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr,
                     ROWS: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid % n_tiles
    c0 = tile * BLOCK
    cols = c0 + tl.arange(0, BLOCK)
    mask = cols < n_cols
    for i in tl.static_range(ROWS):
        row = (pid // n_tiles) * ROWS + i
        if row < n_rows:
            base = x_ptr + row.to(tl.int64) * x_stride
            g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            # silu(g) = g * sigmoid(g) = g / (1 + exp(-g))
            y = (g / (1.0 + tl.exp(-g))) * u
            quant_store_tile(y, c0, n_cols, row, out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                             sf_cols_padded, FMT, BLOCK, GROUP)
            if FMT == 5:
                if (tile == 0) & (n_sf_cols < sf_cols_padded):  # H/16 not a multiple of 4: this row's pad columns
                    nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)
    if FMT == 5:
        nvfp4_pad_rows(pid, n_progs, n_rows, scale_ptr, sf_cols_padded)


def launch_silu_mul(x, data, scale, in_scale, fmt, group, config=None):
    t, two_i = x.shape
    inter = two_i // 2
    if t == 0:
        return
    cfg = local_configs.lookup("silu_mul", fmt, inter, t, group) if config is None else \
        local_configs.sanitize("silu_mul", fmt, inter, group, config)
    out_stride, scale_t, scale_stride, in_scale_t, n_sf, sf_pad = epilogue_args(fmt, inter, data, scale, in_scale)
    block, rows = cfg.block, cfg.rows
    n_tiles = (inter + block - 1) // block
    n_progs = n_tiles * ((t + rows - 1) // rows)
    fast_launch.launch(
        _silu_mul_kernel, (n_progs,),
        (x, x.stride(0), data, out_stride, scale_t, scale_stride, in_scale_t, t, inter, n_sf, sf_pad,
         n_tiles, n_progs),
        {"FMT": fmt, "BLOCK": block, "GROUP": group, "PAD_BLOCK": next_pow2(sf_pad), "ROWS": rows},
        cfg.num_warps, cfg.num_stages)

