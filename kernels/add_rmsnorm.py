"""Fused residual add + RMSNorm (+ quantize) in Triton: the whole hidden row in registers.

Contract (:mod:`tpfuse.reference`): ``s = x + residual`` (fp32); ``residual_out = s`` rounded to ``residual_out``'s
dtype; ``out = s * rsqrt(mean(s^2) + eps) * w`` (``w = weight`` or ``weight + 1`` for Gemma, weight read in its
own dtype and upcast), stored in ``out``'s dtype or quantized by :func:`quant_epilogue.quant_store_tile`.
``residual_out`` may alias ``residual`` (in-place update: a row is read before any of it is written; with
``SPLIT > 1`` every program reads the whole row, so aliasing is only allowed with ``SPLIT == 1`` -- the launcher
enforces it).

Grid ``(cdiv(T, ROWS), SPLIT)``; for swizzled NVFP4 the programs also share out the zero rows of the scale
buffer's padding to 128 rows (:func:`quant_epilogue.nvfp4_pad_rows`). ``ROWS``, ``SPLIT`` and ``num_warps`` come
from :func:`tpfuse.kernels.local_configs.lookup`:

* ``ROWS`` rows per program, the weight loaded once per program;
* ``SPLIT`` programs per row: program ``(p, j)`` sums ``s^2`` over the whole row (in ``SPLIT`` chunks of
  ``BLOCK / SPLIT``, always in chunk order, so every program of a row gets the same rstd) and then normalizes,
  quantizes and stores only columns ``[j * BLOCK / SPLIT, (j + 1) * BLOCK / SPLIT)`` (its slice is re-read, an
  L1/L2 hit). For few tokens this spreads the epilogue -- most of the instructions for quantized outputs --
  over ``SPLIT`` SMs; the extra cost is ``SPLIT - 1`` redundant reads of the row (no cross-program reduction,
  which would need a workspace and a second kernel or atomics with spinning, each a global round trip that costs
  about what the split saves).
"""

import triton
import triton.language as tl

from ..quant import next_pow2
from . import fast_launch, local_configs, pdl
from .quant_epilogue import (FMT_NVFP4_SWIZZLED, epilogue_args, load_norm_weight, norm_quant_store, nvfp4_pad_rows,
                             nvfp4_swizzled_pad, rms_rstd, rstd_from_sumsq)


@triton.jit(do_not_specialize=["n_rows", "n_progs"])
def _add_rmsnorm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, res_out_ptr, res_out_stride,
                        out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                        n_rows, n_cols, eps, n_sf_cols, sf_cols_padded, n_progs,
                        HAS_RES: tl.constexpr, GEMMA: tl.constexpr, FMT: tl.constexpr, BLOCK: tl.constexpr,
                        GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                        PDL: tl.constexpr):
    pdl.enter(PDL)
    pid = tl.program_id(0)
    if SPLIT == 1:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = load_norm_weight(w_ptr, cols, mask, GEMMA)  # first: its latency overlaps the row loads
        for i in tl.static_range(ROWS):
            row = pid * ROWS + i
            if row < n_rows:
                row64 = row.to(tl.int64)
                s = tl.load(x_ptr + row64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RES:
                    s += tl.load(res_ptr + row64 * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
                norm_quant_store(s, w, rms_rstd(s, n_cols, eps), 0, n_cols, row, res_out_ptr, res_out_stride,
                                 out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, FMT,
                                 BLOCK, GROUP)
                if FMT == FMT_NVFP4_SWIZZLED:
                    if n_sf_cols < sf_cols_padded:  # H/16 not a multiple of 4: zero this row's pad columns
                        nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)
    else:
        SLICE: tl.constexpr = BLOCK // SPLIT
        part = tl.program_id(1)
        lane = tl.arange(0, SLICE)
        c0 = part * SLICE
        mine = c0 + lane
        mmask = mine < n_cols
        w = load_norm_weight(w_ptr, mine, mmask, GEMMA)
        for i in tl.static_range(ROWS):
            row = pid * ROWS + i
            if row < n_rows:
                row64 = row.to(tl.int64)
                x_row = x_ptr + row64 * x_stride
                r_row = res_ptr + row64 * res_stride
                acc = tl.zeros([SLICE], tl.float32)
                for j in tl.static_range(SPLIT):
                    cj = j * SLICE + lane
                    mj = cj < n_cols
                    sj = tl.load(x_row + cj, mask=mj, other=0.0).to(tl.float32)
                    if HAS_RES:
                        sj += tl.load(r_row + cj, mask=mj, other=0.0).to(tl.float32)
                    acc += sj * sj
                rstd = rstd_from_sumsq(tl.sum(acc, 0), n_cols, eps)
                s = tl.load(x_row + mine, mask=mmask, other=0.0).to(tl.float32)
                if HAS_RES:
                    s += tl.load(r_row + mine, mask=mmask, other=0.0).to(tl.float32)
                norm_quant_store(s, w, rstd, c0, n_cols, row, res_out_ptr, res_out_stride, out_ptr, out_stride,
                                 scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, FMT, SLICE, GROUP)
                if FMT == FMT_NVFP4_SWIZZLED:
                    if (part == 0) & (n_sf_cols < sf_cols_padded):
                        nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)
    if FMT == FMT_NVFP4_SWIZZLED:
        nvfp4_pad_rows(pid * SPLIT + tl.program_id(1), n_progs, n_rows, scale_ptr, sf_cols_padded)


def num_warps_for(block: int) -> int:
    """Warps of a one-row-per-program norm kernel over a ``block``-wide row (the rule of
    :func:`local_configs.default_config`; also used by the SP-reduce and fused all-reduce launchers)."""
    return max(4, min(16, block // 512))


def launch_add_rmsnorm(x, residual, weight, eps, residual_out, data, scale, in_scale, fmt, group_size, gemma,
                       config=None):
    """Run the kernel: ``x [T, H]`` (row stride arbitrary, unit column stride), optional ``residual`` (may be the
    same tensor as ``residual_out``), outputs pre-allocated (``data``/``scale`` as in
    :func:`tpfuse.quant.alloc_outputs`). ``group_size``: the FP8 group size (format FP8_PER_GROUP). ``config``: a
    :class:`local_configs.LaunchConfig` (default: the table's)."""
    t, h = x.shape
    if t == 0:
        return
    cfg = local_configs.lookup("add_rmsnorm", fmt, h, t, group_size) if config is None else \
        local_configs.sanitize("add_rmsnorm", fmt, h, group_size, config)
    split = cfg.split
    if split > 1 and residual is not None and residual.data_ptr() == residual_out.data_ptr():
        split = 1  # in place: a program of the row would overwrite what another one still has to read
    ep = epilogue_args(fmt, h, data, scale, in_scale)
    res = residual if residual is not None else x
    rows = cfg.rows
    n_row_progs = (t + rows - 1) // rows
    on = pdl.wanted(residual_out)
    fast_launch.launch(
        _add_rmsnorm_kernel, (n_row_progs, split),
        (x, x.stride(0), res, res.stride(0), weight, residual_out, residual_out.stride(0),
         data, ep.out_stride, ep.scale, ep.scale_stride, ep.in_scale,
         t, h, float(eps), ep.n_sf_cols, ep.sf_cols_padded, n_row_progs * split),
        {"HAS_RES": residual is not None, "GEMMA": bool(gemma), "FMT": fmt, "BLOCK": next_pow2(h),
         "GROUP": group_size, "PAD_BLOCK": ep.pad_block, "ROWS": rows, "SPLIT": split, "PDL": on},
        cfg.num_warps, cfg.num_stages, on)

