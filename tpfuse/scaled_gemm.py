"""FP8 (e4m3) operands of the communicator's GEMM ops: ``all_gather_matmul``, ``matmul_reduce_scatter`` and
``matmul_reduce_scatter_rmsnorm`` (validation, unpacking and the GEMM itself, shared by every path).

An FP8 call passes ``float8_e4m3fn`` operands with fp32 scales; the activation may instead be a
:class:`~tpfuse.quant.QuantizedActivation` made by ``FP8Static`` (per-tensor) or ``FP8PerToken`` (row-wise), e.g.
the output of ``reduce_scatter_rmsnorm(..., quant=FP8PerToken())`` or ``silu_mul(..., quant=...)``:

==========  ========  ==========  ==============================================================================
operand     dtype     shape       scale (fp32, contiguous, on the op's device)
==========  ========  ==========  ==============================================================================
``x``       e4m3      ``[M, K]``  ``x_scale``: ``[]`` / ``[1]`` per-tensor, or ``[M, 1]`` row-wise (per token)
``weight``  e4m3      ``[N, K]``  ``w_scale``: ``[]`` / ``[1]`` per-tensor, or ``[N, 1]`` row-wise (per output
                                  channel, one per weight row: nn.Linear layout)
output      bf16      ``[M, N]``  —
==========  ========  ==========  ==============================================================================

Math (every path): ``out = (x * x_scale) @ (weight * w_scale).T``, accumulated in fp32 and rounded to bf16 once.
The GPU paths run ``torch._scaled_mm`` (``use_fast_accum=False``); the reference path dequantizes to fp32 (the
oracle). Rules, all checked before any collective (:class:`~tpfuse.errors.TPFuseInputError` on every rank):

* both operands e4m3, both scales given, both of one kind (per-tensor, or row-wise: ``_scaled_mm`` takes no mix);
* ``K`` and ``N`` multiples of 16 (``_scaled_mm``); ``x`` row-major, ``weight`` contiguous ``[N, K]`` (its
  transpose is the column-major operand ``_scaled_mm`` wants);
* the communicator's dtype is bf16 (``_scaled_mm``'s row-wise kernels write only bf16);
* ``all_gather_matmul``: a row-wise ``x_scale`` travels with its rows through the gather; a per-tensor
  ``x_scale`` must have the same value on every rank (the gathered activation has one scale, as a calibrated
  static scale does). ``matmul_reduce_scatter``: every rank's scales are its own (partials are summed after the
  GEMM).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import quant as q
from .errors import TPFuseInputError
from .validation import check_tensor, same_device

FP8 = q.FP8_DTYPE
TENSOR, ROW = "tensor", "row"


def unpack(x, x_scale) -> Tuple[object, Optional[torch.Tensor]]:
    """``(data, scale)`` of the activation argument: a QuantizedActivation's own, else ``(x, x_scale)``."""
    if not isinstance(x, q.QuantizedActivation):
        return x, x_scale
    if x_scale is not None:
        raise TPFuseInputError("x_scale must be None when x is a QuantizedActivation (it carries its own scale)")
    if not isinstance(x.spec, (q.FP8Static, q.FP8PerToken)):
        raise TPFuseInputError(f"FP8 GEMMs take FP8Static (per-tensor) or FP8PerToken (row-wise) activations; got "
                               f"{type(x.spec).__name__} (torch._scaled_mm has no per-group or NVFP4 form)")
    return x.data, x.scale


def is_fp8(x, weight, x_scale, w_scale) -> bool:
    """Whether the call asks for the FP8 GEMM (an FP8 operand or a scale given)."""
    fp8 = any(isinstance(t, torch.Tensor) and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
              for t in (x, weight))
    return fp8 or x_scale is not None or w_scale is not None


def scale_kind(name: str, scale, rows: int, device: torch.device, per_row: str) -> str:
    """Validate one scale; return ``"tensor"`` or ``"row"``."""
    if scale is None:
        raise TPFuseInputError(f"an FP8 GEMM needs {name} (fp32: [] or [1] per-tensor, or [{per_row}, 1] "
                               f"row-wise)")
    if not isinstance(scale, torch.Tensor):
        raise TPFuseInputError(f"{name} must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TPFuseInputError(f"{name} must be float32, got {scale.dtype}")
    if not same_device(scale, device):
        raise TPFuseInputError(f"{name} is on {scale.device}, but this communicator's device is {device}")
    if scale.dim() <= 1 and scale.numel() == 1:
        return TENSOR
    if tuple(scale.shape) == (rows, 1):
        if not scale.is_contiguous():
            raise TPFuseInputError(f"{name} must be contiguous; call .contiguous() first")
        return ROW
    raise TPFuseInputError(f"{name} has shape {tuple(scale.shape)}; expected [] or [1] (per-tensor) or "
                           f"[{rows}, 1] (row-wise: one per {per_row})")


def check(x, weight, x_scale, w_scale, *, device: torch.device, out_dtype: torch.dtype,
          x_name: str = "x") -> str:
    """Validate an FP8 call (module docstring rules); return the scale kind (``"tensor"`` / ``"row"``)."""
    for name, t in ((x_name, x), ("weight", weight)):
        if isinstance(t, torch.Tensor) and t.dtype != FP8:
            raise TPFuseInputError(f"{name} has dtype {t.dtype}: an FP8 GEMM takes both operands in "
                                   f"torch.float8_e4m3fn (with x_scale / w_scale)")
    check_tensor(x_name, x, dtype=FP8, device=device, dim=2)
    check_tensor("weight", weight, dtype=FP8, device=device, dim=2)
    if out_dtype != torch.bfloat16:
        raise TPFuseInputError(f"FP8 GEMMs write bf16 (torch._scaled_mm's row-wise kernels support only bf16): "
                               f"build the communicator with dtype=torch.bfloat16, not {out_dtype}")
    k, n = weight.shape[1], weight.shape[0]
    if k % 16 or n % 16:
        raise TPFuseInputError(f"FP8 GEMMs need K and N multiples of 16 (torch._scaled_mm); weight has shape "
                               f"[N={n}, K={k}]")
    xk = scale_kind("x_scale", x_scale, x.shape[0], device, "token")
    wk = scale_kind("w_scale", w_scale, n, device, "output channel")
    if xk != wk:
        raise TPFuseInputError(f"x_scale is {xk}-wise but w_scale is {wk}-wise: torch._scaled_mm needs both "
                               f"per-tensor or both row-wise")
    return xk


def _aligned(scale: torch.Tensor) -> torch.Tensor:
    # a row-wise scale sliced from a longer one (a token chunk) may start off a 16-byte boundary; cuBLASLt's
    # vector scales (and CUTLASS's vectorised loads) want 16 bytes: copy those few floats then
    return scale if scale.data_ptr() % 16 == 0 else scale.clone()


def _b_scale(w_scale: torch.Tensor) -> torch.Tensor:
    return w_scale.reshape(()) if w_scale.numel() == 1 and w_scale.dim() <= 1 else _aligned(w_scale.view(1, -1))


def _a_scale(x_scale: torch.Tensor) -> torch.Tensor:
    return x_scale.reshape(()) if x_scale.numel() == 1 and x_scale.dim() <= 1 else _aligned(x_scale)


def mm(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
       out: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(x * x_scale) @ (weight * w_scale).T`` by ``torch._scaled_mm`` into ``out`` (``[M, N]``, contiguous) or a
    new tensor. ``x_scale``: per-tensor or ``[M, 1]``; ``w_scale``: per-tensor or ``[N, 1]``."""
    m, n = x.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    return torch._scaled_mm(x, weight.t(), _a_scale(x_scale), _b_scale(w_scale), out_dtype=out.dtype,
                            use_fast_accum=False, out=out)


def dequantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of an e4m3 operand: ``t * scale`` (per-tensor, or one scale per row)."""
    s = scale.float()
    return t.float() * (s.reshape(()) if s.numel() == 1 and s.dim() <= 1 else s)


def mm_reference(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                 out: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """:func:`mm` emulated for CPU tensors (where ``torch._scaled_mm`` may be missing): both operands dequantized
    to fp32, one fp32 GEMM, rounded once to ``out_dtype`` - the same math as the reference backend's FP8 GEMMs."""
    y = (dequantize(x, x_scale) @ dequantize(weight, w_scale).t()).to(out.dtype if out is not None else out_dtype)
    return y if out is None else out.copy_(y)


def mm_for(device: torch.device):
    """The FP8 GEMM of ``device``: :func:`mm` (``torch._scaled_mm``) on CUDA, :func:`mm_reference` elsewhere."""
    return mm if torch.device(device).type == "cuda" else mm_reference
