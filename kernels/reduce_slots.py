"""Sum of TP partial-sum slots (+ residual add + RMSNorm + quantize) in one pass: the tail of the sequence-parallel
reduce-scatter (``tpfuse_reduce_scatter``, and the fused tail of async-TP ``matmul_reduce_scatter``).

Input: ``NSLOTS`` row blocks of one buffer, ``slot i`` at ``slots_ptr + i * slot_stride`` with row stride
``row_stride`` (the symmetric ``rs`` buffer of :mod:`tpfuse.backends.async_tp`: slot q = rank q's partial for this
rank's token shard). One program per row, the whole hidden row in registers, fp32 accumulation in slot order.

* ``NORM=False``: ``out = sum_i slot_i`` rounded to ``out``'s dtype.
* ``NORM=True``: ``s = sum_i slot_i + residual`` (fp32); ``residual_out = s`` rounded; ``out = s * rsqrt(mean(s^2) +
  eps) * w`` (``w + 1`` for Gemma) stored by :func:`quant_epilogue.quant_store` in any output format - the
  :mod:`tpfuse.reference` contract.

No cross-rank wait or flag here: the peers' pushes into the slots are ordered before this kernel by the DATA
semaphore on the same stream (:mod:`tpfuse.kernels.signals`, "Cross-rank ordering").
"""

import triton
import triton.language as tl

from ..quant import QuantFormat, next_pow2
from .add_rmsnorm import num_warps_for
from .quant_epilogue import (FMT_NVFP4_SWIZZLED, cast_for_store, epilogue_args, nvfp4_swizzled_pad, padded_rows,
                             rmsnorm_quant_store)


@triton.jit
def _reduce_slots_kernel(slots_ptr, slot_stride, row_stride, res_ptr, res_stride, w_ptr, res_out_ptr, res_out_stride,
                         out_ptr, out_stride, scale_ptr, scale_stride, in_scale_ptr,
                         n_rows, n_cols, eps, n_sf_cols, sf_cols_padded,
                         NSLOTS: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, GEMMA: tl.constexpr,
                         FMT: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, PAD_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if row < n_rows:
        row64 = row.to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(NSLOTS):
            s += tl.load(slots_ptr + i * slot_stride + row64 * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            if HAS_RES:
                s += tl.load(res_ptr + row64 * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rmsnorm_quant_store(s, cols, mask, row, w_ptr, eps, n_cols, res_out_ptr, res_out_stride, out_ptr,
                                out_stride, scale_ptr, scale_stride, in_scale_ptr, sf_cols_padded, GEMMA, FMT, BLOCK,
                                GROUP)
        else:
            tl.store(out_ptr + row64 * out_stride + cols, cast_for_store(s, out_ptr.dtype.element_ty), mask=mask)
    if NORM:
        if FMT == FMT_NVFP4_SWIZZLED:
            nvfp4_swizzled_pad(row, n_rows, scale_ptr, n_sf_cols, sf_cols_padded, PAD_BLOCK)


def launch_reduce_slots(slots, nslots, slot_stride, rows, out):
    """``out[rows, H] = sum_i slots[i * slot_stride : ...][:rows]`` (``slots``: the buffer holding slot 0)."""
    h = out.shape[1]
    if rows == 0:
        return out
    block = next_pow2(h)
    _reduce_slots_kernel[(rows,)](
        slots, slot_stride, slots.stride(0), out, 0, out, out, 0, out, out.stride(0), out, 0, out,
        rows, h, 0.0, 0, 0, NSLOTS=nslots, NORM=False, HAS_RES=False, GEMMA=False, FMT=QuantFormat.NONE, BLOCK=block,
        GROUP=16,
        PAD_BLOCK=1, num_warps=num_warps_for(block))
    return out


def launch_reduce_slots_rmsnorm(slots, nslots, slot_stride, rows, residual, weight, eps, residual_out, data, scale,
                                in_scale, fmt, group_size, gemma):
    """Fused ``sum slots + residual -> residual_out; rmsnorm -> data/scale`` over ``rows`` rows."""
    h = residual_out.shape[1]
    prog = padded_rows(fmt, rows)
    if prog == 0:
        return
    ep = epilogue_args(fmt, h, data, scale, in_scale)
    block = next_pow2(h)
    res = residual if residual is not None else residual_out
    _reduce_slots_kernel[(prog,)](
        slots, slot_stride, slots.stride(0), res, res.stride(0), weight, residual_out, residual_out.stride(0),
        data, ep.out_stride, ep.scale, ep.scale_stride, ep.in_scale, rows, h, float(eps), ep.n_sf_cols,
        ep.sf_cols_padded, NSLOTS=nslots, NORM=True, HAS_RES=residual is not None, GEMMA=bool(gemma), FMT=fmt,
        BLOCK=block, GROUP=group_size, PAD_BLOCK=ep.pad_block, num_warps=num_warps_for(block))
