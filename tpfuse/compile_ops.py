"""The communicator's ops as ``torch.library`` custom ops, so a model calling them compiles with
``torch.compile(fullgraph=True)`` and captures into CUDA graphs.

Eager calls go straight to the Python methods (no custom-op dispatch cost on the decode path). While Dynamo traces,
each method forwards here instead: the op is opaque to the compiler (one node ``tpfuse::comm_<op>``), its fake impl
gives the output shapes, and at run time the real impl calls the eager method, which validates, plans and runs the
chosen path. A communicator is named in the graph by an integer handle (registered at construction, dropped at
``close()``); quant specs travel as ``(fmt, group_size, scale)`` like the local ops (:func:`tpfuse.ops.spec_to_args`).

Outputs: ``(data, scale, residual_out)`` for the norm ops (``scale`` is empty for bf16 and FP8-static outputs: the
static scale is the caller's own tensor), a tensor for the others.
"""

from __future__ import annotations

import itertools
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .sharding import shard_len

_REGISTRY: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register(comm) -> int:
    handle = next(_NEXT)
    _REGISTRY[handle] = comm
    return handle


def unregister(handle: int) -> None:
    _REGISTRY.pop(handle, None)


def _comm(handle: int):
    comm = _REGISTRY.get(handle)
    if comm is None:
        from .errors import TPFuseClosedError

        raise TPFuseClosedError(f"TPCommunicator handle {handle} is closed or gone")
    return comm


def _split(out, fmt: int, x: Tensor):
    from .quant import QuantFormat

    if fmt == QuantFormat.NONE:
        return out, x.new_empty(0, dtype=torch.float32)
    scale = x.new_empty(0, dtype=torch.float32) if fmt == QuantFormat.FP8_STATIC else out.scale
    return out.data, scale


def _norm_fake(handle, x, fmt, group_size, rows):
    from . import ops

    data, scale = ops.alloc_outputs(rows, x.shape[1], fmt, group_size, x.device, x.dtype)
    return data, scale, x.new_empty(rows, x.shape[1])


@torch.library.custom_op("tpfuse::comm_fused_add_rmsnorm", mutates_args=())
def _fused_add_rmsnorm(handle: int, x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, fmt: int,
                       group_size: int, in_scale: Optional[Tensor], gemma: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from . import ops

    out, res = _comm(handle).fused_add_rmsnorm(x, residual, weight, eps,
                                               quant=ops.args_to_spec(fmt, group_size, in_scale), gemma=gemma)
    return (*_split(out, fmt, x), res)


@_fused_add_rmsnorm.register_fake
def _(handle, x, residual, weight, eps, fmt, group_size, in_scale, gemma):
    return _norm_fake(handle, x, fmt, group_size, x.shape[0])


@torch.library.custom_op("tpfuse::comm_reduce_scatter_rmsnorm", mutates_args=())
def _reduce_scatter_rmsnorm(handle: int, x: Tensor, residual_shard: Optional[Tensor], weight: Tensor, eps: float,
                            fmt: int, group_size: int, in_scale: Optional[Tensor], gemma: bool
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    from . import ops

    out, res = _comm(handle).reduce_scatter_rmsnorm(x, residual_shard, weight, eps,
                                                    quant=ops.args_to_spec(fmt, group_size, in_scale), gemma=gemma)
    return (*_split(out, fmt, x), res)


@_reduce_scatter_rmsnorm.register_fake
def _(handle, x, residual_shard, weight, eps, fmt, group_size, in_scale, gemma):
    c = _comm(handle)
    return _norm_fake(handle, x, fmt, group_size, shard_len(x.shape[0], c.tp, c.rank))


@torch.library.custom_op("tpfuse::comm_all_reduce", mutates_args=())
def _all_reduce(handle: int, x: Tensor) -> Tensor:
    return _comm(handle).all_reduce(x)


@_all_reduce.register_fake
def _(handle, x):
    return torch.empty_like(x)


@torch.library.custom_op("tpfuse::comm_all_gather", mutates_args=())
def _all_gather(handle: int, x_shard: Tensor, num_tokens: int) -> Tensor:
    return _comm(handle).all_gather(x_shard, num_tokens=num_tokens)


@_all_gather.register_fake
def _(handle, x_shard, num_tokens):
    return x_shard.new_empty(num_tokens, x_shard.shape[1])


# the GEMM ops: x_scale / w_scale are None for dense operands, fp32 scales for FP8 ones (tpfuse.scaled_gemm; a
# QuantizedActivation input travels as its data and scale). The output is in the communicator's dtype either way.
@torch.library.custom_op("tpfuse::comm_all_gather_matmul", mutates_args=())
def _all_gather_matmul(handle: int, x_shard: Tensor, weight: Tensor, num_tokens: int,
                       x_scale: Optional[Tensor] = None, w_scale: Optional[Tensor] = None) -> Tensor:
    return _comm(handle).all_gather_matmul(x_shard, weight, num_tokens=num_tokens, x_scale=x_scale, w_scale=w_scale)


@_all_gather_matmul.register_fake
def _(handle, x_shard, weight, num_tokens, x_scale=None, w_scale=None):
    return x_shard.new_empty(num_tokens, weight.shape[0], dtype=_comm(handle).dtype)


@torch.library.custom_op("tpfuse::comm_matmul_reduce_scatter", mutates_args=())
def _matmul_reduce_scatter(handle: int, x: Tensor, weight: Tensor, x_scale: Optional[Tensor] = None,
                           w_scale: Optional[Tensor] = None) -> Tensor:
    return _comm(handle).matmul_reduce_scatter(x, weight, x_scale=x_scale, w_scale=w_scale)


@_matmul_reduce_scatter.register_fake
def _(handle, x, weight, x_scale=None, w_scale=None):
    c = _comm(handle)
    return x.new_empty(shard_len(x.shape[0], c.tp, c.rank), weight.shape[0], dtype=c.dtype)


@torch.library.custom_op("tpfuse::comm_matmul_reduce_scatter_rmsnorm", mutates_args=())
def _matmul_reduce_scatter_rmsnorm(handle: int, x: Tensor, weight: Tensor, residual_shard: Optional[Tensor],
                                   norm_weight: Tensor, eps: float, fmt: int, group_size: int,
                                   in_scale: Optional[Tensor],
                                   gemma: bool, x_scale: Optional[Tensor] = None, w_scale: Optional[Tensor] = None
                                   ) -> Tuple[Tensor, Tensor, Tensor]:
    from . import ops

    out, res = _comm(handle).matmul_reduce_scatter_rmsnorm(
        x, weight, residual_shard, norm_weight, eps, quant=ops.args_to_spec(fmt, group_size, in_scale), gemma=gemma,
        x_scale=x_scale, w_scale=w_scale)
    return (*_split(out, fmt, res), res)


@_matmul_reduce_scatter_rmsnorm.register_fake
def _(handle, x, weight, residual_shard, norm_weight, eps, fmt, group_size, in_scale, gemma, x_scale=None,
      w_scale=None):
    c = _comm(handle)
    res = x.new_empty(shard_len(x.shape[0], c.tp, c.rank), weight.shape[0], dtype=c.dtype)
    return _norm_fake(handle, res, fmt, group_size, res.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# what the communicator's methods call while Dynamo traces


def norm_op(name: str, comm, x, residual, weight, eps, quant, gemma):
    from . import ops, quant as q

    q.check_spec(quant, comm.hidden_size, comm.device)  # also places a number-built scale on the device
    fmt, group_size, in_scale = ops.spec_to_args(quant)
    fn = torch.ops.tpfuse.comm_fused_add_rmsnorm if name == "fused_add_rmsnorm" else \
        torch.ops.tpfuse.comm_reduce_scatter_rmsnorm
    data, scale, res = fn(comm._handle, x, residual, weight, float(eps), fmt, group_size, in_scale, bool(gemma))
    return ops._wrap(data, scale, quant, x, data.shape if quant is None else (data.shape[0], x.shape[1])), res


def matmul_norm_op(comm, x, weight, residual_shard, norm_weight, eps, quant, gemma, x_scale, w_scale):
    from . import ops, quant as q, scaled_gemm

    xd, xs = scaled_gemm.unpack(x, x_scale)
    q.check_spec(quant, comm.hidden_size, comm.device)  # also places a number-built scale on the device
    fmt, group_size, in_scale = ops.spec_to_args(quant)
    data, scale, res = torch.ops.tpfuse.comm_matmul_reduce_scatter_rmsnorm(
        comm._handle, xd, weight, residual_shard, norm_weight, float(eps), fmt, group_size, in_scale, bool(gemma), xs,
        w_scale)
    return ops._wrap(data, scale, quant, res, data.shape if quant is None else (data.shape[0], res.shape[1])), res


def gather_tokens(comm, x_shard, num_tokens: Optional[int]) -> int:
    return num_tokens if num_tokens is not None else x_shard.shape[0] * comm.tp


__all__: List[str] = ["register", "unregister", "norm_op", "matmul_norm_op", "gather_tokens"]
