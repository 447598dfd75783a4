"""L2 prefetch of a tensor's bytes: ``prefetch.global.L2`` of every 128-byte line, no value read or written.

=============  ======================  =====================================================================
argument       dtype                   meaning
=============  ======================  =====================================================================
``t``          any (CUDA, contiguous)  the bytes to bring into L2 (the launcher takes ``t.data_ptr()`` and
                                       ``t.numel() * t.element_size()``; a partial last line is fetched whole)
=============  ======================  =====================================================================

Use (:mod:`tpfuse.parallel.prefetch`): a decode step's next weight is fetched into L2 on a side stream while a
kernel that leaves HBM idle runs (decode attention at small batch reads a few MB in ~10 µs): the GEMM after it then
reads its weight from L2. A prefetch is a hint: the program issues it and exits without waiting for the data, so
the kernel ends once its programs have issued their lines; nothing orders it against other kernels' reads or
writes, and it changes no value anywhere (the weights are read-only during a step).

Each program covers ``LINES`` consecutive lines (``LINES / (32 * num_warps)`` prefetches a thread), the grid
``cdiv(lines, LINES)``: from shapes only, CUDA-graph safe. Compiled code only (inline PTX, as
:func:`tpfuse.kernels.pdl.prefetch_l2`): on CPU or under the interpreter the launcher does nothing.
"""

import torch
import triton
import triton.language as tl

from . import pdl
from .quant_epilogue import SOFT_CAST

LINE_BYTES = 128
LINES = 1024  # 128 KB a program: 8 prefetches a thread at 4 warps


@triton.jit
def _l2_prefetch_kernel(ptr, n_lines, LINES: tl.constexpr):
    """Program ``p`` prefetches lines ``[p * LINES, (p + 1) * LINES)`` of the byte range at ``ptr``."""
    line = tl.program_id(0).to(tl.int64) * LINES + tl.arange(0, LINES)
    pdl.prefetch_l2(ptr + line * 128, line < n_lines)


def launch_l2_prefetch(t: torch.Tensor) -> int:
    """Prefetch ``t`` 's bytes into L2 on the current stream; returns the lines issued (0 off CUDA, for an empty
    tensor, or under the interpreter)."""
    if not t.is_cuda or t.numel() == 0 or SOFT_CAST:
        return 0
    nbytes = t.numel() * t.element_size()
    n_lines = triton.cdiv(nbytes, LINE_BYTES)
    base = t.view(-1).view(torch.uint8)
    _l2_prefetch_kernel[(triton.cdiv(n_lines, LINES),)](base, n_lines, LINES=LINES, num_warps=4)
    return n_lines
