"""The small-M GEMM op: ``out = x @ weight.T`` for decode batches (1 <= M <= 64), with FP8 scales, bias and an
optional fused SiLU*mul epilogue. Kernel and launcher: :mod:`tpfuse.kernels.small_m_gemm`; reference (fp32 math,
rounded once): :func:`tpfuse.reference.small_m_gemm`; when the model path uses it: :func:`use_kernel`.

``small_m_gemm(x, weight, *, x_scale=None, w_scale=None, bias=None, silu_mul=False, out_scale=None,
out_dtype=None)``

===============  ==================  ===========================================================================
argument         dtype               shape
===============  ==================  ===========================================================================
``x``            bf16 / fp16 / e4m3  ``[M, K]``, 1 <= M <= 64 (M = 0 gives an empty output); a row-strided view
                                     (unit stride along K) is read in place, any other layout is copied first
``weight``       x's dtype or e4m3   ``[N, K]`` contiguous (nn.Linear layout), N and K multiples of 16;
                                     ``silu_mul``: the fused ``[gate (I); up (I)]`` weight, I a multiple of 16
``x_scale``      fp32                e4m3 x only (required there): ``[]`` / ``[1]`` per-tensor, ``[M]`` / ``[M, 1]``
                                     per token
``w_scale``      fp32                e4m3 weight only (required there): ``[]`` / ``[1]``, or ``[N]`` / ``[N, 1]``
``bias``         bf16 / fp16 / fp32  ``[N]``
``out_scale``    fp32                ``[]`` / ``[1]``: quantize the output to e4m3 with this static scale
``out_dtype``    bf16 / fp16         output dtype (default: x's dtype; bf16 for an e4m3 x)
returns                              ``[M, N]`` (``[M, I]`` with ``silu_mul``), ``out_dtype`` or e4m3
===============  ==================  ===========================================================================

Math: ``y = (x * x_scale) @ (weight * w_scale).T + bias`` in fp32; ``silu_mul``: ``silu(y[:, :I]) * y[:, I:]``;
rounded once to the output dtype, or ``e4m3(clamp(y / out_scale, +-448))``. Anything else raises
:class:`~tpfuse.errors.TPFuseInputError` (an e4m3 x with a 16-bit weight, a missing / extra scale, M > 64, ...).

**The RMSNorm folded into the GEMMs**, what the model's decode layers at TP = 1 use instead of a separate add +
RMSNorm kernel between two GEMMs, with ``RMSNorm(h) @ W.T = rstd * ((h * w_norm) @ W.T)``. bf16 x (the
un-normalized rows ``h * w_norm`` may exceed fp16's range), a bf16 weight, or an e4m3 one with its ``w_scale``
(the FP8 layers' weight-only steps); no x scale:

* ``small_m_gemm_add(x, weight, residual, norm_weight, *, bias=None, w_scale=None) -> (h, x_next, sumsq)``: ``h =
  round(round(x @ (weight * w_scale).T + bias) + residual)`` ``[M, N]`` (the GEMM's rounding, then the residual
  add's, as the unfused pair rounds), the next GEMM's rows ``x_next = round(h * norm_weight)`` ``[M, N]`` and
  ``sumsq [N / 32, M]`` fp32, the sums of ``h^2`` per token over each 32 consecutive features
  (:func:`tpfuse.reference.sumsq_partials`); N a multiple of 32, ``residual [M, N]`` and ``norm_weight [N]`` in
  x's dtype.
* ``small_m_gemm(x_next, weight, ..., norm_sumsq=sumsq, norm_eps=eps)``: each token's ``x_next @ weight.T`` times
  ``rsqrt(sum(sumsq, 0) / K + eps)`` (:func:`tpfuse.reference.rstd_from_partials`), then the bias and SiLU*mul:
  the GEMM of ``RMSNorm(h)`` without the normed rows ever stored (they differ from the add + RMSNorm kernel's by
  where the one rounding falls); ``sumsq [P, M]`` fp32 (any P >= 1).

**Partial maxima for a per-token FP8 quantizer**, what the FP8 decode layers can run instead of the SiLU*mul +
quantize kernel between gate-up and down (per-token activations; :data:`AMAX_CHAIN_MAX_M`, off by default: measured
slower): the per-token scale needs the row's max ``|h|``, which a SiLU*mul + quantize kernel finds by giving each row
to one program (14336 features of the 8B on one SM);
``small_m_gemm_amax(x, weight, *, x_scale=None, w_scale=None, bias=None, silu_mul=False) -> (h, x_amax)`` is
:func:`small_m_gemm` with a 16-bit output ``h [M, N]`` and ``x_amax [N / 32, M]`` fp32, the max ``|h|`` (as stored)
per token over each 32 consecutive features (:func:`tpfuse.reference.amax_partials`; N a multiple of 32; split-K 1;
config: the table's row of the scheme, else of its :data:`~tpfuse.kernels.small_m_configs.CONFIG_PROXY`), and
:func:`tpfuse.ops.quantize_from_amax` quantizes ``h`` with them over many programs a row.

Dispatch as :mod:`tpfuse.ops`: CUDA tensors run the Triton kernel (the custom op ``tpfuse::small_m_gemm`` while
Dynamo traces, the op body directly in eager mode), CPU tensors the reference, or the kernel under the Triton
interpreter with ``TPFUSE_TRITON_CPU=1``. The custom op has a fake impl; the launch is CUDA-graph safe.

:func:`use_kernel` is the model path's question (``tpfuse.parallel`` layers; :func:`use_amax_chain` for the FP8
gate-up): whether the tuned table says the kernel beat the library call for ``(arch, scheme, N, K, M bucket)`` (else
keep ``F.linear`` / ``_scaled_mm``);
:func:`route` gives that table row's config.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import quant as q
from . import reference as ref
from .errors import TPFuseInputError
from .kernels import small_m_configs as smc

MAX_M = smc.MAX_M
SUMSQ_ROWS = smc.SUMSQ_ROWS
_FLOAT16 = (torch.bfloat16, torch.float16)
_ARCH: dict = {}  # device -> (arch, SM count)
_UNSEEN = object()  # route()'s memo miss (None is a memoized "keep the library call")


def device_info(device: torch.device):
    """``(arch, SMs)`` of a device: ``("sm90", 132)``; ``("cpu", 132)`` for CPU (the interpreter's default rule)."""
    info = _ARCH.get(device)
    if info is None:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            info = (f"sm{major}{minor}", torch.cuda.get_device_properties(device).multi_processor_count)
        else:
            info = (device.type, smc.DEFAULT_SMS)
        _ARCH[device] = info
    return info


def scale_kind(scale: Optional[torch.Tensor]) -> Optional[bool]:
    """The kind of an FP8 scale as the table's schemes name it (:func:`~tpfuse.kernels.small_m_configs.scheme_name`):
    None (no scale), False (per-tensor: one element, ``[]`` / ``[1]``) or True (row-wise: anything else, e.g. a
    per-token ``[M, 1]`` or per-channel ``[N, 1]``). Reads the shape only (no validation: :func:`check` does it),
    so :func:`use_kernel` asks the table about the very scheme that :func:`small_m_gemm` then launches."""
    if scale is None:
        return None
    return scale.dim() > 1 or scale.numel() != 1


def _row_kind(scale, rows: int, name: str, what: str, device) -> Optional[bool]:
    """:func:`scale_kind` of a validated scale; raises on anything but per-tensor or ``[rows]`` / ``[rows, 1]``."""
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.device != device:
        raise TPFuseInputError(f"{name} must be an fp32 tensor on {device}, got "
                               f"{getattr(scale, 'dtype', type(scale).__name__)} on {getattr(scale, 'device', '-')}")
    row_wise = scale_kind(scale)
    if row_wise and not (tuple(scale.shape) in ((rows,), (rows, 1)) and scale.is_contiguous()):
        raise TPFuseInputError(f"{name} has shape {tuple(scale.shape)}: expected [] / [1] (per-tensor) or a "
                               f"contiguous [{rows}] / [{rows}, 1] ({what})")
    return row_wise


def _check_folded(x, weight, what: str) -> None:
    # bf16 x only: the next GEMM's rows h * norm_weight are stored un-normalized, which fp16's range (65504) may not
    # hold; the weight bf16 or e4m3 (weight-only, its w_scale checked by check())
    if x.dtype != torch.bfloat16 or weight.dtype not in (torch.bfloat16, q.FP8_DTYPE):
        raise TPFuseInputError(f"{what} needs a bf16 x and a bf16 or e4m3 weight, got x {x.dtype}, weight "
                               f"{weight.dtype}")


def _check_vec(t, shape, dtypes, name: str, device) -> None:
    if not (isinstance(t, torch.Tensor) and tuple(t.shape) == shape and t.dtype in dtypes and t.is_contiguous()
            and t.device == device):
        raise TPFuseInputError(f"{name} must be a contiguous {'/'.join(str(d) for d in dtypes)} {list(shape)} "
                               f"tensor on {device}, got {getattr(t, 'dtype', type(t).__name__)} "
                               f"{list(getattr(t, 'shape', []))}")


def check_norm(x, weight, norm_sumsq, out_scale) -> None:
    """Validate the folded-RMSNorm argument of :func:`small_m_gemm`."""
    if norm_sumsq is None:
        return
    _check_folded(x, weight, "the folded RMSNorm")
    p = norm_sumsq.shape[0] if isinstance(norm_sumsq, torch.Tensor) and norm_sumsq.dim() == 2 else 0
    _check_vec(norm_sumsq, (max(p, 1), x.shape[0]), (torch.float32,), "norm_sumsq", x.device)
    if out_scale is not None:
        raise TPFuseInputError("the folded RMSNorm takes no out_scale (a 16-bit GEMM)")


def check(x, weight, x_scale, w_scale, bias, silu_mul, out_scale, out_dtype) -> str:
    """Validate a call (module docstring); returns its table scheme."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise TPFuseInputError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    (m, k), (n, kw) = x.shape, weight.shape
    if kw != k:
        raise TPFuseInputError(f"x has K={k} but weight has shape [N={n}, K={kw}]")
    if m > MAX_M:
        raise TPFuseInputError(f"small_m_gemm takes at most {MAX_M} rows (decode batches), got M={m}")
    if n % 16 or k % 16 or (silu_mul and n % 32):
        raise TPFuseInputError(f"small_m_gemm needs N and K multiples of 16 (16-byte weight rows, tl.dot tiles)"
                               f"{' and I = N / 2 a multiple of 16 for silu_mul' if silu_mul else ''}; weight has "
                               f"shape [N={n}, K={k}]")
    if not weight.is_contiguous() or weight.device != x.device:
        raise TPFuseInputError(f"weight must be contiguous [N, K] on {x.device} (nn.Linear layout)")
    xr = _row_kind(x_scale, m, "x_scale", "per token", x.device)
    wr = _row_kind(w_scale, n, "w_scale", "per output channel", x.device)
    scheme = smc.scheme_name(x.dtype, weight.dtype, xr, wr, bool(silu_mul), out_scale is not None)
    fp8_x, fp8_w = x.dtype == q.FP8_DTYPE, weight.dtype == q.FP8_DTYPE
    if scheme is None or (fp8_w != (w_scale is not None)) or (fp8_x != (x_scale is not None)):
        raise TPFuseInputError(
            f"small_m_gemm takes x bf16/fp16 with a weight of the same dtype (no scales) or e4m3 (w_scale), or x "
            f"e4m3 (x_scale) with an e4m3 weight (w_scale); got x {x.dtype} "
            f"({'with' if x_scale is not None else 'no'} x_scale), weight {weight.dtype} "
            f"({'with' if w_scale is not None else 'no'} w_scale)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)
                             or bias.dtype not in (*_FLOAT16, torch.float32) or not bias.is_contiguous()
                             or bias.device != x.device):
        raise TPFuseInputError(f"bias must be a contiguous bf16/fp16/fp32 [{n}] tensor on {x.device}")
    if out_scale is not None and not (isinstance(out_scale, torch.Tensor) and out_scale.dtype == torch.float32
                                      and out_scale.dim() <= 1 and out_scale.numel() == 1
                                      and out_scale.device == x.device):
        raise TPFuseInputError(f"out_scale must be an fp32 [] / [1] static scale on {x.device}")
    if out_dtype is not None and out_dtype not in _FLOAT16:
        raise TPFuseInputError(f"out_dtype must be bf16 or fp16, got {out_dtype}")
    return scheme


def _out_dtype(x, out_dtype, out_scale) -> torch.dtype:
    if out_scale is not None:
        return q.FP8_DTYPE
    return out_dtype or (x.dtype if x.dtype in _FLOAT16 else torch.bfloat16)


def alloc_out(m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The kernel's output buffer (tests poison it to catch unwritten elements)."""
    return torch.empty(m, n, dtype=dtype, device=device)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TPFUSE_TRITON_CPU") == "1"


def _impl(x: torch.Tensor, weight: torch.Tensor, x_scale: Optional[torch.Tensor], w_scale: Optional[torch.Tensor],
          bias: Optional[torch.Tensor], out_scale: Optional[torch.Tensor], silu_mul: bool,
          out_dtype: Optional[torch.dtype], norm_sumsq: Optional[torch.Tensor] = None,
          norm_eps: float = 0.0) -> torch.Tensor:
    """The op body (inputs validated)."""
    if not _use_triton(x):
        return ref.small_m_gemm(x, weight, x_scale, w_scale, bias, silu_mul=silu_mul, out_scale=out_scale,
                                out_dtype=out_dtype, norm_sumsq=norm_sumsq, norm_eps=norm_eps)
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    out = alloc_out(x.shape[0], n, _out_dtype(x, out_dtype, out_scale), x.device)
    if x.shape[0] == 0:
        return out
    from .kernels.small_m_gemm import launch_small_m_gemm  # lazily: import tpfuse never imports Triton

    scheme = _scheme(x, weight, x_scale, w_scale, silu_mul, out_scale)
    arch, sms = device_info(x.device)
    launch_small_m_gemm(x, weight, x_scale, w_scale, bias, out, out_scale, silu_mul, scheme, arch, sms,
                        norm=None if norm_sumsq is None else (norm_sumsq, norm_eps))
    return out


def _scheme(x, weight, x_scale, w_scale, silu_mul, out_scale) -> str:
    """The table scheme a launch takes its config from."""
    return smc.scheme_name(x.dtype, weight.dtype, scale_kind(x_scale), scale_kind(w_scale), silu_mul,
                           out_scale is not None)


_op = torch.library.custom_op("tpfuse::small_m_gemm", _impl, mutates_args=())


@_op.register_fake
def _(x, weight, x_scale, w_scale, bias, out_scale, silu_mul, out_dtype, norm_sumsq=None, norm_eps=0.0):
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    return x.new_empty((x.shape[0], n), dtype=_out_dtype(x, out_dtype, out_scale))


def _add_impl(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
              bias: Optional[torch.Tensor], w_scale: Optional[torch.Tensor] = None,
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`small_m_gemm_add`'s body (inputs validated)."""
    if not _use_triton(x):
        return ref.small_m_gemm_add(x, weight, residual, norm_weight, bias, rows=smc.SUMSQ_ROWS, w_scale=w_scale)
    m, n = x.shape[0], weight.shape[0]
    h, x_next = alloc_out(m, n, x.dtype, x.device), alloc_out(m, n, x.dtype, x.device)
    sumsq = torch.empty(n // smc.SUMSQ_ROWS, m, dtype=torch.float32, device=x.device)
    if m == 0:
        return h, x_next, sumsq
    from .kernels.small_m_gemm import launch_small_m_gemm

    arch, sms = device_info(x.device)
    scheme = smc.scheme_name(x.dtype, weight.dtype, None, scale_kind(w_scale), False, False)
    launch_small_m_gemm(x, weight, None, w_scale, bias, h, None, False, scheme, arch, sms,
                        add=(residual, norm_weight, x_next, sumsq))
    return h, x_next, sumsq


_add_op = torch.library.custom_op("tpfuse::small_m_gemm_add", _add_impl, mutates_args=())


@_add_op.register_fake
def _(x, weight, residual, norm_weight, bias, w_scale=None):
    return (x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((weight.shape[0] // smc.SUMSQ_ROWS, x.shape[0]), dtype=torch.float32))


def small_m_gemm(x: torch.Tensor, weight: torch.Tensor, *, x_scale: Optional[torch.Tensor] = None,
                 w_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 silu_mul: bool = False, out_scale: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None, norm_sumsq: Optional[torch.Tensor] = None,
                 norm_eps: float = 1e-6) -> torch.Tensor:
    """``x @ weight.T`` (scales, bias, SiLU*mul, static FP8 output: module docstring) for 1..64 rows; with
    ``norm_sumsq`` each token's product times its rstd (the folded RMSNorm, module docstring)."""
    check(x, weight, x_scale, w_scale, bias, silu_mul, out_scale, out_dtype)
    check_norm(x, weight, norm_sumsq, out_scale)
    if x.stride(1) != 1:  # a row-strided view is read in place (stride_xm); anything else is copied
        x = x.contiguous()
    eager = not torch.compiler.is_compiling()
    return (_impl if eager else torch.ops.tpfuse.small_m_gemm)(x, weight, x_scale, w_scale, bias, out_scale,
                                                               bool(silu_mul), out_dtype, norm_sumsq,
                                                               float(norm_eps))


def _amax_impl(x: torch.Tensor, weight: torch.Tensor, x_scale: Optional[torch.Tensor],
               w_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               silu_mul: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`small_m_gemm_amax`'s body (inputs validated)."""
    if not _use_triton(x):
        return ref.small_m_gemm_amax(x, weight, x_scale, w_scale, bias, silu_mul=silu_mul, rows=smc.SUMSQ_ROWS)
    m = x.shape[0]
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    out = alloc_out(m, n, _out_dtype(x, None, None), x.device)
    amax = torch.empty(n // smc.SUMSQ_ROWS, m, dtype=torch.float32, device=x.device)
    if m == 0:
        return out, amax
    from .kernels.small_m_gemm import launch_small_m_gemm

    arch, sms = device_info(x.device)
    launch_small_m_gemm(x, weight, x_scale, w_scale, bias, out, None, silu_mul,
                        _scheme(x, weight, x_scale, w_scale, silu_mul, None), arch, sms, amax_out=amax)
    return out, amax


_amax_op = torch.library.custom_op("tpfuse::small_m_gemm_amax", _amax_impl, mutates_args=())


@_amax_op.register_fake
def _(x, weight, x_scale, w_scale, bias, silu_mul):
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    return (x.new_empty((x.shape[0], n), dtype=_out_dtype(x, None, None)),
            x.new_empty((n // smc.SUMSQ_ROWS, x.shape[0]), dtype=torch.float32))


def small_m_gemm_amax(x: torch.Tensor, weight: torch.Tensor, *, x_scale: Optional[torch.Tensor] = None,
                      w_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                      silu_mul: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, x_amax)``: :func:`small_m_gemm` (16-bit output) and the partial maxima of ``|out|`` that
    :func:`tpfuse.ops.quantize_from_amax` takes (module docstring)."""
    check(x, weight, x_scale, w_scale, bias, silu_mul, None, None)
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if n % smc.SUMSQ_ROWS:
        raise TPFuseInputError(f"small_m_gemm_amax needs an output width that is a multiple of {smc.SUMSQ_ROWS}, "
                               f"got {n}")
    if x.stride(1) != 1:
        x = x.contiguous()
    eager = not torch.compiler.is_compiling()
    return (_amax_impl if eager else torch.ops.tpfuse.small_m_gemm_amax)(x, weight, x_scale, w_scale, bias,
                                                                         bool(silu_mul))


def small_m_gemm_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, *,
                     bias: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, x_next, sumsq)``: the GEMM plus the residual add, the next GEMM's rows weighted by ``norm_weight`` and
    the partial sums of squares its folded RMSNorm takes (module docstring); ``w_scale`` with an e4m3 weight."""
    check(x, weight, None, w_scale, bias, False, None, None)
    _check_folded(x, weight, "small_m_gemm_add")
    m, n = x.shape[0], weight.shape[0]
    if n % smc.SUMSQ_ROWS:
        raise TPFuseInputError(f"small_m_gemm_add needs N a multiple of {smc.SUMSQ_ROWS}, got N={n}")
    if not (isinstance(residual, torch.Tensor) and tuple(residual.shape) == (m, n) and residual.dtype == x.dtype
            and residual.device == x.device and residual.stride(1) == 1):
        raise TPFuseInputError(f"residual must be a [{m}, {n}] {x.dtype} tensor on {x.device} with unit stride "
                               f"along N, got {getattr(residual, 'dtype', type(residual).__name__)} "
                               f"{list(getattr(residual, 'shape', []))}")
    _check_vec(norm_weight, (n,), (x.dtype,), "norm_weight", x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    eager = not torch.compiler.is_compiling()
    return (_add_impl if eager else torch.ops.tpfuse.small_m_gemm_add)(x, weight, residual, norm_weight, bias,
                                                                       w_scale)


def route(x: torch.Tensor, weight: torch.Tensor, *, x_row: Optional[bool] = None, w_row: Optional[bool] = None,
          silu: bool = False, out_fp8: bool = False) -> Optional[smc.GemmConfig]:
    """The tuned config the kernel runs with for one GEMM of ``x [M, K]`` (a tensor or its e4m3 data) with
    ``weight`` where the table says it beats the library call there, else None (also for M > :data:`MAX_M`, before
    any lookup: prefill sizes never enter the memo). ``x_row`` / ``w_row``: :func:`scale_kind` of the FP8 scales;
    ``silu`` / ``out_fp8``: the fused SiLU*mul epilogue (with a static FP8 output). One memo lookup per call once a
    shape was seen. The model path asks :func:`use_kernel`."""
    m = x.shape[0]
    if m > MAX_M:
        return None
    dev = x.device
    has = smc.ROUTE_MEMO.get(dev)  # no routing rows for this device: one lookup, no key built
    if has is None:
        has = smc.memo(dev, lambda: smc.has_routes(device_info(dev)[0]))
    if not has:
        return None
    n, k = weight.shape
    key = (dev, x.dtype, weight.dtype, x_row, w_row, silu, out_fp8, n, k, m)
    cfg = smc.ROUTE_MEMO.get(key, _UNSEEN)  # a seen shape: no closure built, no memo() call
    if cfg is _UNSEEN:
        cfg = smc.memo(key, lambda: smc.route(device_info(dev)[0], smc.scheme_name(
            x.dtype, weight.dtype, x_row, w_row, silu, out_fp8), n, k, m))
    return cfg


AMAX_CHAIN_MAX_M = 0
"""The most tokens at which the FP8 layers with per-token activations run gate-up + SiLU*mul with its partial
maxima and :func:`tpfuse.ops.quantize_from_amax` instead of gate-up and the SiLU*mul + quantize kernel
(:func:`use_amax_chain`; 0: never). Off: on one H100 at 7fdfb52 the chain at every batch up to 16 (64) made the 8B's
per-token FP8 decode step 1.023 / 1.042 / 1.030x as long at batch 1 / 8 / 64 as the kernel pair
(``bench/results/e2e_tp1_h100_amax_ab_7fdfb52.json``, rows ``tpfuse_fp8`` vs ``_noamax``, ``_amaxall`` vs
``tpfuse_fp8``); a knob for other GPUs and shapes (``bench_e2e.py --amax-ab``)."""


def use_amax_chain(x: torch.Tensor, gate_up_weight: torch.Tensor, *, x_scale: torch.Tensor,
                   gate_up_scale: torch.Tensor) -> bool:
    """The FP8 layers' question for per-token activations: whether gate-up + SiLU*mul with its partial maxima
    (:func:`small_m_gemm_amax`) and :func:`tpfuse.ops.quantize_from_amax` replace gate-up and the SiLU*mul +
    quantize kernel. Yes at most :data:`AMAX_CHAIN_MAX_M` tokens, where the tuned table sends the plain gate-up
    GEMM to the kernel and its SiLU*mul output width is a multiple of 32 (the partials' groups).
    ``x``: gate-up's e4m3 input data."""
    if x.shape[0] > AMAX_CHAIN_MAX_M or (gate_up_weight.shape[0] // 2) % smc.SUMSQ_ROWS:
        return False
    return use_kernel(x, gate_up_weight, x_scale=x_scale, w_scale=gate_up_scale)


def use_kernel(x: torch.Tensor, weight: torch.Tensor, *, x_scale: Optional[torch.Tensor] = None,
               w_scale: Optional[torch.Tensor] = None, silu_mul: bool = False,
               out_scale: Optional[torch.Tensor] = None) -> bool:
    """The model path's question: whether ``small_m_gemm(x, weight, x_scale=..., w_scale=..., silu_mul=...,
    out_scale=...)`` (the same arguments; bias and out_dtype do not enter the table's key) beats the library call
    it would replace (``F.linear`` / ``_scaled_mm``, or the unfused pair for ``silu_mul``), per the tuned table.
    False for M > :data:`MAX_M`. Cost once a shape was seen: :func:`route`'s one memo lookup."""
    return route(x, weight, x_row=scale_kind(x_scale), w_row=scale_kind(w_scale), silu=silu_mul,
                 out_fp8=out_scale is not None) is not None
