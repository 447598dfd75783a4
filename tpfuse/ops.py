"""Local (single-GPU) stages: public functions and their ``torch.library`` custom ops.

Public ops (return :class:`tpfuse.quant.QuantizedActivation` when ``quant`` is given, else a plain tensor):

* ``add_rmsnorm(x, residual, weight, eps=1e-6, *, quant=None, gemma=False, residual_inplace=False)``
  -> ``(out, residual_out)``; with ``residual_inplace=True`` (and a residual) ``residual`` is overwritten with
  ``residual_out`` and returned;
* ``silu_mul(x, *, quant=None)`` for a ``[T, 2I]`` gate-up input (gate first);
* ``quantize(x, spec)`` standalone quantizer;
* ``quantize_from_amax(x, x_amax)`` per-token FP8 of ``x [T, H]`` (16-bit) whose per-token maxima come as partials
  ``x_amax [P, T]`` (fp32, e.g. :func:`tpfuse.small_gemm.small_m_gemm_amax`'s): many programs a row instead of the
  one a row of ``quantize`` needs for the row's amax; the same bytes as ``quantize(x, FP8PerToken())`` when the
  partials are exact (:func:`tpfuse.reference.quantize_from_amax`).

Dispatch: CUDA tensors run the Triton kernels of :mod:`tpfuse.kernels` (while Dynamo traces, through the custom
ops below; in eager mode the public functions call the same op bodies directly, skipping the custom-op dispatch,
which costs more host time than the launch itself); CPU tensors run the plain-torch reference (:mod:`tpfuse.reference`, :func:`tpfuse.quant.quantize`). Escape hatch: with the
environment variable ``TPFUSE_TRITON_CPU=1`` CPU tensors take the Triton path too, which only works under the
Triton interpreter (``TRITON_INTERPRET=1`` set before the kernel modules are imported); the interpreter tests use
it. ``import tpfuse`` never imports Triton: the launchers import it lazily. Launch shapes (warps, rows per program,
split rows, tiles) are chosen by the launchers from the table in :mod:`tpfuse.kernels.local_configs` (per op,
format, width and token bucket; measured by ``bench/bench_local.py --sweep-configs``): they change speed, not
results, except that the add+RMSNorm reduction order follows the warps / split of the bucket (few-ulp
differences of the fp32 norm between buckets; quantize and SiLU*mul outputs are identical under every shape).

Custom ops (namespace ``tpfuse``; quant specs travel as ``fmt`` / ``group_size`` / ``in_scale``:
:func:`tpfuse.quant.spec_to_args`, ``fmt`` a :class:`tpfuse.quant.QuantFormat` -- the NVFP4 layout flag is folded
into it; :mod:`tpfuse.kernels.quant_epilogue` documents each format's buffers)::

    tpfuse::add_rmsnorm(Tensor x, Tensor? residual, Tensor weight, float eps, int fmt, int group_size,
                        Tensor? in_scale, bool gemma) -> (Tensor data, Tensor scale, Tensor residual_out)
    tpfuse::add_rmsnorm_(Tensor x, Tensor(a!) residual, Tensor weight, float eps, int fmt, int group_size,
                         Tensor? in_scale, bool gemma) -> (Tensor data, Tensor scale)     # residual in place
    tpfuse::silu_mul(Tensor x, int fmt, int group_size, Tensor? in_scale) -> (Tensor data, Tensor scale)
    tpfuse::quantize(Tensor x, int fmt, int group_size, Tensor? in_scale) -> (Tensor data, Tensor scale)
    tpfuse::quantize_from_amax(Tensor x, Tensor x_amax) -> (Tensor data, Tensor scale)

``data`` is the output (input dtype for fmt NONE, e4m3 for FP8, packed uint8 for NVFP4); ``scale`` the output scale
(an empty fp32 tensor for NONE and FP8_STATIC: the static scale is the caller's). ``in_scale`` is the FP8 static
scale or the NVFP4 global scale (fp32 scalar on the op's device). Every op has a fake (meta) impl, so the public functions
work under ``torch.compile(fullgraph=True)`` and CUDA-graph capture (no host sync: scales are read on device).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import quant as q
from . import reference as ref
from .errors import TPFuseInputError
from .quant import QuantFormat, QuantSpec
from .quant import alloc_outputs, args_to_spec, spec_to_args  # noqa: F401  (the ops' encoding; backends use it too)


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TPFUSE_TRITON_CPU") == "1"


def alloc_residual_out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _scale_out(spec, scale):
    # the reference's scale tensor, for the ops' plain-torch fallback
    return torch.empty(0, dtype=torch.float32, device=scale.device) if isinstance(spec, q.FP8Static) else scale


def _ref_outputs(out, fmt):
    if fmt == QuantFormat.NONE:
        return out, torch.empty(0, dtype=torch.float32, device=out.device)
    return out.data, _scale_out(out.spec, out.scale)


# --------------------------------------------------------------------------------------------------------------
# custom ops


# Each op's body is a plain function (``_*_impl``) registered as the custom op. The public functions call the body
# directly in eager mode (the custom-op dispatch costs more host time than the launch) and the custom op while
# Dynamo traces (an opaque node with a fake impl), so both run exactly the same code.


def _add_rmsnorm_impl(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float, fmt: int,
                      group_size: int, in_scale: Optional[torch.Tensor], gemma: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, h = x.shape
    if not _use_triton(x):
        out, res = ref.add_rmsnorm(x, residual, weight, eps, quant=args_to_spec(fmt, group_size, in_scale), gemma=gemma)
        return (*_ref_outputs(out, fmt), res)
    from .kernels.add_rmsnorm import launch_add_rmsnorm

    data, scale = alloc_outputs(t, h, fmt, group_size, x.device, x.dtype)
    res_out = alloc_residual_out(x)
    launch_add_rmsnorm(x, residual, weight, eps, res_out, data, scale, in_scale, fmt, group_size, gemma)
    return data, scale, res_out


_add_rmsnorm_op = torch.library.custom_op("tpfuse::add_rmsnorm", _add_rmsnorm_impl, mutates_args=())


@_add_rmsnorm_op.register_fake
def _(x, residual, weight, eps, fmt, group_size, in_scale, gemma):
    t, h = x.shape
    data, scale = alloc_outputs(t, h, fmt, group_size, x.device, x.dtype)
    return data, scale, torch.empty_like(x)


def _add_rmsnorm_inplace_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, fmt: int,
                              group_size: int, in_scale: Optional[torch.Tensor], gemma: bool
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    t, h = x.shape
    if not _use_triton(x):
        out, res = ref.add_rmsnorm(x, residual, weight, eps, quant=args_to_spec(fmt, group_size, in_scale), gemma=gemma)
        residual.copy_(res)
        return _ref_outputs(out, fmt)
    from .kernels.add_rmsnorm import launch_add_rmsnorm

    data, scale = alloc_outputs(t, h, fmt, group_size, x.device, x.dtype)
    launch_add_rmsnorm(x, residual, weight, eps, residual, data, scale, in_scale, fmt, group_size, gemma)
    return data, scale


_add_rmsnorm_inplace_op = torch.library.custom_op("tpfuse::add_rmsnorm_", _add_rmsnorm_inplace_impl,
                                                  mutates_args=("residual",))


@_add_rmsnorm_inplace_op.register_fake
def _(x, residual, weight, eps, fmt, group_size, in_scale, gemma):
    t, h = x.shape
    return alloc_outputs(t, h, fmt, group_size, x.device, x.dtype)


def _quant_op_body(x: torch.Tensor, width: int, fmt: int, group_size: int, in_scale: Optional[torch.Tensor],
                   reference, launch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Body of the SiLU*mul and quantize ops: ``reference(x, spec)`` (plain torch) off the Triton path, else
    ``launch(x, data, scale, in_scale, fmt, group_size)`` into fresh ``[T, width]`` outputs."""
    if not _use_triton(x):
        return _ref_outputs(reference(x, args_to_spec(fmt, group_size, in_scale)), fmt)
    data, scale = alloc_outputs(x.shape[0], width, fmt, group_size, x.device, x.dtype)
    launch(x, data, scale, in_scale, fmt, group_size)
    return data, scale


def _launch_silu_mul(*args) -> None:
    from .kernels.silu_mul import launch_silu_mul  # lazily: import tpfuse never imports Triton

    launch_silu_mul(*args)


def _silu_mul_impl(x: torch.Tensor, fmt: int, group_size: int, in_scale: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _quant_op_body(x, x.shape[1] // 2, fmt, group_size, in_scale, lambda v, spec: ref.silu_mul(v, quant=spec),
                          _launch_silu_mul)


_silu_mul_op = torch.library.custom_op("tpfuse::silu_mul", _silu_mul_impl, mutates_args=())


@_silu_mul_op.register_fake
def _(x, fmt, group_size, in_scale):
    return alloc_outputs(x.shape[0], x.shape[1] // 2, fmt, group_size, x.device, x.dtype)


def _launch_quantize(*args) -> None:
    from .kernels.quantize import launch_quantize

    launch_quantize(*args)


def _quantize_impl(x: torch.Tensor, fmt: int, group_size: int, in_scale: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    if fmt == QuantFormat.NONE:
        raise TPFuseInputError("tpfuse::quantize needs a quant format (fmt 1..5)")
    return _quant_op_body(x, x.shape[1], fmt, group_size, in_scale, q.quantize, _launch_quantize)


_quantize_op = torch.library.custom_op("tpfuse::quantize", _quantize_impl, mutates_args=())


@_quantize_op.register_fake
def _(x, fmt, group_size, in_scale):
    return alloc_outputs(x.shape[0], x.shape[1], fmt, group_size, x.device, x.dtype)


def _quantize_from_amax_impl(x: torch.Tensor, x_amax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not _use_triton(x):
        return ref.quantize_from_amax(x, x_amax)
    from .kernels.quantize import launch_quantize_from_amax

    data = torch.empty(x.shape, dtype=q.FP8_DTYPE, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    launch_quantize_from_amax(x, x_amax, data, scale)
    return data, scale


_quantize_from_amax_op = torch.library.custom_op("tpfuse::quantize_from_amax", _quantize_from_amax_impl,
                                                 mutates_args=())


@_quantize_from_amax_op.register_fake
def _(x, x_amax):
    return x.new_empty(x.shape, dtype=q.FP8_DTYPE), x.new_empty((x.shape[0], 1), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# public functions


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 2 and x.stride(1) == 1:  # the common case, as is (reshape would return an equal view)
        return x
    if x.dim() < 1:
        raise TPFuseInputError(f"{what} must have a hidden dimension, got a scalar")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _wrap(data, scale, spec, x, shape):
    if spec is None:
        return data if data.shape == shape else data.reshape(shape)
    if isinstance(spec, q.FP8Static):
        scale = spec.scale
    return q.QuantizedActivation(data=data, scale=scale, spec=spec, orig_dtype=x.dtype, shape=torch.Size(shape))


def _check_quant(quant, x, hidden):
    if quant is not None:
        q.check_spec(quant, hidden, x.device)
        if x.dim() != 2:
            raise TPFuseInputError(f"quantized outputs need a [tokens, hidden] input, got shape {tuple(x.shape)}")


_is_compiling = torch.compiler.is_compiling


def add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-6, *,
                quant: Optional[QuantSpec] = None, gemma: bool = False, residual_inplace: bool = False):
    """``(out, residual_out)`` of add + RMSNorm (+ quant); see :func:`tpfuse.reference.add_rmsnorm`.

    ``residual_inplace=True`` writes ``residual_out`` into ``residual`` (which is returned); ignored when
    ``residual`` is None (first layer: ``residual_out`` is a new tensor equal to ``x``)."""
    h = x.shape[-1]
    if quant is not None:
        _check_quant(quant, x, h)
    if weight.shape != (h,):
        raise TPFuseInputError(f"weight must have shape ({h},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise TPFuseInputError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if not _use_triton(x):
        out, res = ref.add_rmsnorm(x, residual, weight, eps, quant=quant, gemma=gemma)
        if residual_inplace and residual is not None:
            residual.copy_(res)
            res = residual
        return out, res
    fmt, group_size, in_scale = spec_to_args(quant)
    x2 = _rows(x, "x")
    w = weight if weight.is_contiguous() else weight.contiguous()
    eager = not _is_compiling()
    if residual_inplace and residual is not None:
        r2 = residual if residual.dim() == 2 else residual.view(-1, h)  # must be a view: it is written in place
        if r2.stride(-1) != 1:
            raise TPFuseInputError("residual_inplace needs a residual with unit stride along hidden")
        data, scale = (_add_rmsnorm_inplace_impl if eager else torch.ops.tpfuse.add_rmsnorm_)(
            x2, r2, w, float(eps), fmt, group_size, in_scale, bool(gemma))
        res = residual
    else:
        r2 = None if residual is None else _rows(residual, "residual")
        data, scale, res = (_add_rmsnorm_impl if eager else torch.ops.tpfuse.add_rmsnorm)(
            x2, r2, w, float(eps), fmt, group_size, in_scale, bool(gemma))
        if res.shape != x.shape:
            res = res.reshape(x.shape)
    return _wrap(data, scale, quant, x, x.shape), res


def silu_mul(x: torch.Tensor, *, quant: Optional[QuantSpec] = None):
    """``silu(x[:, :I]) * x[:, I:]`` (+ quant) for a ``[T, 2I]`` gate-up activation."""
    if x.shape[-1] % 2:
        raise TPFuseInputError(f"silu_mul needs an even last dimension (gate, up), got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    if quant is not None:
        _check_quant(quant, x, inter)
    if not _use_triton(x):
        return ref.silu_mul(x, quant=quant)
    fmt, group_size, in_scale = spec_to_args(quant)
    data, scale = (_silu_mul_impl if not _is_compiling() else torch.ops.tpfuse.silu_mul)(
        _rows(x, "x"), fmt, group_size, in_scale)
    return _wrap(data, scale, quant, x, (*x.shape[:-1], inter))


def quantize(x: torch.Tensor, spec: QuantSpec) -> q.QuantizedActivation:
    """Standalone quantizer: the Triton kernel on CUDA, :func:`tpfuse.quant.quantize` on CPU."""
    if spec is None:
        raise TPFuseInputError("quantize needs a quant spec")
    if x.dim() != 2:
        raise TPFuseInputError(f"quantize expects a [tokens, hidden] tensor, got shape {tuple(x.shape)}")
    q.check_spec(spec, x.shape[-1], x.device)
    if not _use_triton(x):
        return q.quantize(x, spec)
    fmt, group_size, in_scale = spec_to_args(spec)
    data, scale = (_quantize_impl if not _is_compiling() else torch.ops.tpfuse.quantize)(
        _rows(x, "x"), fmt, group_size, in_scale)
    return _wrap(data, scale, spec, x, x.shape)


def quantize_from_amax(x: torch.Tensor, x_amax: torch.Tensor) -> q.QuantizedActivation:
    """Per-token FP8 (:class:`tpfuse.quant.FP8PerToken`) of a 16-bit ``x [T, H]`` with each token's scale from the
    partial maxima ``x_amax [P, T]`` (fp32, contiguous; the max of ``|x|`` over groups of features that cover the
    row, e.g. :func:`tpfuse.small_gemm.small_m_gemm_amax`'s): the Triton kernel on CUDA, the reference on CPU."""
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):
        raise TPFuseInputError(f"quantize_from_amax expects a bf16/fp16 [tokens, hidden] tensor, got {x.dtype} "
                               f"{tuple(x.shape)}")
    if not (isinstance(x_amax, torch.Tensor) and x_amax.dim() == 2 and x_amax.shape[1] == x.shape[0]
            and x_amax.shape[0] >= 1 and x_amax.dtype == torch.float32 and x_amax.is_contiguous()
            and x_amax.device == x.device):
        raise TPFuseInputError(f"x_amax must be a contiguous fp32 [P >= 1, {x.shape[0]}] tensor on {x.device}, got "
                               f"{getattr(x_amax, 'dtype', type(x_amax).__name__)} "
                               f"{list(getattr(x_amax, 'shape', []))}")
    x = _rows(x, "x")
    data, scale = (_quantize_from_amax_impl if not _is_compiling() else torch.ops.tpfuse.quantize_from_amax)(
        x, x_amax)
    return q.QuantizedActivation(data=data, scale=scale, spec=q.FP8PerToken(), orig_dtype=x.dtype, shape=x.shape)
