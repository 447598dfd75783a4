"""Plain-torch reference implementations: the test oracle and the always-available fallback path.

Local math (one process) and the distributed ops (torch.distributed collectives, gloo on CPU or NCCL on GPU). All
arithmetic is fp32: the partial sums are upcast before the collective, so the reference never sums in bf16.

Contracts shared with every fused kernel (a kernel that differs is wrong, not the reference):

* ``s = sum_over_ranks(x) + residual`` in fp32; ``residual_out = s`` rounded to the input dtype;
* ``out = s * rsqrt(mean(s^2) + eps) * w`` in fp32, with ``w = weight`` (or ``weight + 1`` when ``gemma``); the
  norm reads the fp32 ``s``, not the rounded ``residual_out``;
* ``out`` is rounded to the input dtype, or quantized from its fp32 value by :func:`tpfuse.quant.quantize`.

Shapes (T tokens, H hidden, TP ranks, S = ceil(T / TP), Ts = this rank's shard rows, see :mod:`tpfuse.sharding`):

=========================  =================================  ==============================================
op                         inputs                              outputs
=========================  =================================  ==============================================
all_reduce                 x [T, H]                            [T, H]
fused_add_rmsnorm          x [T, H], residual [T, H] | None    out [T, H] (or quantized), residual_out [T, H]
reduce_scatter_rmsnorm     x [T, H], residual_shard [Ts, H]    out_shard [Ts, H], residual_shard_out [Ts, H]
all_gather                 x_shard [Ts, H]                     [T, H]
all_gather_matmul          x_shard [Ts, K], w_shard_n [N/TP, K]   [T, N/TP]
matmul_reduce_scatter      x_shard_k [T, K/TP], w_shard_k [N, K/TP]  [Ts, N]
=========================  =================================  ==============================================

The two GEMM ops also take FP8 operands with scales (:mod:`tpfuse.scaled_gemm`): here they are dequantized to fp32
first (the oracle of the ``_scaled_mm`` paths).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import collectives
from . import quant as q
from .sharding import shard_range, shard_rows

Output = Union[torch.Tensor, q.QuantizedActivation]


# --------------------------------------------------------------------------------------------------------------
# local math


def rmsnorm_math(s: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """RMSNorm computed in ``s``'s dtype (fp32 here; fp64 in the tests' oracle): ``s * rsqrt(mean(s^2) + eps) * w``
    with ``w = weight`` or ``weight + 1`` (Gemma)."""
    w = weight.to(s.dtype) + 1.0 if gemma else weight.to(s.dtype)
    return (s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)) * w


def finish_output(out_f32: torch.Tensor, dtype: torch.dtype, quant: Optional[q.QuantSpec]) -> Output:
    """Round the fp32 norm output to ``dtype``, or quantize it as ``quant`` asks."""
    if quant is None:
        return out_f32.to(dtype)
    qa = q.quantize(out_f32, quant)
    qa.orig_dtype = dtype
    return qa


def add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-6, *,
                quant: Optional[q.QuantSpec] = None, gemma: bool = False) -> Tuple[Output, torch.Tensor]:
    """Local (single-rank) add + RMSNorm (+ quant): the tail of every fused path, and issue-3's reference."""
    s = x.float() if residual is None else x.float() + residual.float()
    return finish_output(rmsnorm_math(s, weight, eps, gemma), x.dtype, quant), s.to(x.dtype)


def silu_mul(x: torch.Tensor, *, quant: Optional[q.QuantSpec] = None) -> Output:
    """``silu(gate) * up`` for a ``[T, 2 * I]`` gate-up input (gate first), fp32 math."""
    gate, up = x.float().chunk(2, dim=-1)
    return finish_output(torch.nn.functional.silu(gate) * up, x.dtype, quant)


def small_m_gemm(x: torch.Tensor, weight: torch.Tensor, x_scale: Optional[torch.Tensor] = None,
                 w_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                 silu_mul: bool = False, out_scale: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None, norm_sumsq: Optional[torch.Tensor] = None,
                 norm_eps: float = 0.0) -> torch.Tensor:
    """The small-M GEMM (:mod:`tpfuse.small_gemm`): ``y = (x * x_scale) @ (weight * w_scale).T + bias`` with both
    operands dequantized to fp32 and one fp32 GEMM, ``silu(y_gate) * y_up`` for ``silu_mul``, rounded once to
    ``out_dtype`` (default: x's 16-bit dtype, bf16 for e4m3 x) or quantized with the static ``out_scale``;
    ``norm_sumsq``: each token's product scaled by :func:`rstd_from_partials` before the bias (the folded RMSNorm)."""
    def deq(t, s):
        tf = t.float()
        if s is None:
            return tf
        s = s.float()
        return tf * (s.reshape(()) if s.dim() <= 1 and s.numel() == 1 else s.reshape(-1, 1))

    y = deq(x, x_scale) @ deq(weight, w_scale).t()
    if norm_sumsq is not None:
        y = y * rstd_from_partials(norm_sumsq, x.shape[1], norm_eps)[:, None]
    if bias is not None:
        y = y + bias.float()
    if silu_mul:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if out_scale is not None:
        return q.fp8_quantize_static(y, out_scale)
    return y.to(out_dtype or (x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16))


def amax_partials(h: torch.Tensor, rows: int) -> torch.Tensor:
    """``[N / rows, M]`` fp32: per token (column), the max ``|h|`` over each group of ``rows`` consecutive features
    of ``h [M, N]`` (the values as stored; NaN propagates)."""
    m, n = h.shape
    return h.float().abs().view(m, n // rows, rows).amax(-1).t().contiguous()


def quantize_from_amax(x: torch.Tensor, x_amax: torch.Tensor):
    """``(e4m3 x, scale [M, 1])``: :func:`tpfuse.quant.fp8_quantize_per_token` with each token's amax taken as
    the max over its partials ``x_amax [P, M]`` (equal to it when the partials are :func:`amax_partials` of x)."""
    scale = q.fp8_dynamic_scale(x_amax.float().amax(0)[:, None])
    return q._fp8_cast(x.float() * (1.0 / scale)), scale


def small_m_gemm_amax(x: torch.Tensor, weight: torch.Tensor, x_scale=None, w_scale=None, bias=None, *,
                      silu_mul: bool = False, rows: int = 32):
    """``(out, amax)``: :func:`small_m_gemm` rounded to bf16 (x's 16-bit dtype) and :func:`amax_partials` of it."""
    out = small_m_gemm(x, weight, x_scale, w_scale, bias, silu_mul=silu_mul)
    return out, amax_partials(out, rows)


def sumsq_partials(h: torch.Tensor, rows: int) -> torch.Tensor:
    """``[N / rows, M]`` fp32: per token (column), the sum of ``h^2`` over each group of ``rows`` consecutive
    features of ``h [M, N]`` (the values as stored, in fp32)."""
    m, n = h.shape
    return h.float().square().view(m, n // rows, rows).sum(-1).t().contiguous()


def rstd_from_partials(sumsq: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """``[M]`` fp32 ``rsqrt(sum_p sumsq[p] / k + eps)``: each token's RMSNorm scale from its partial sums."""
    return torch.rsqrt(sumsq.float().sum(0) / k + eps)


def small_m_gemm_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, *, rows: int = 32, w_scale: Optional[torch.Tensor] = None):
    """``(h, x_next, sumsq)``: ``h = round(round(x @ (weight * w_scale).T + bias) + residual)`` (the GEMM's
    rounding, then the residual add's), the next GEMM's rows ``x_next = round(h * norm_weight)`` and
    :func:`sumsq_partials` of ``h`` in groups of ``rows``; ``w_scale`` with an e4m3 weight only."""
    y = small_m_gemm(x, weight, w_scale=w_scale, bias=bias, out_dtype=x.dtype)
    h = (y.float() + residual.float()).to(y.dtype)
    return h, (h.float() * norm_weight.float()).to(h.dtype), sumsq_partials(h, rows)


# --------------------------------------------------------------------------------------------------------------
# distributed ops


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


def all_reduce_fp32(x: torch.Tensor, group) -> torch.Tensor:
    """fp32 sum over the group of ``x`` (any float dtype); returns a new fp32 tensor."""
    s = x.float().clone() if x.dtype == torch.float32 else x.float()
    return collectives.all_reduce_(s, group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return all_reduce_fp32(x, group).to(x.dtype)


def fused_add_rmsnorm(x, residual, weight, eps, *, quant=None, gemma=False, group=None):
    s = all_reduce_fp32(x, group)
    if residual is not None:
        s = s + residual.float()
    return finish_output(rmsnorm_math(s, weight, eps, gemma), x.dtype, quant), s.to(x.dtype)


def _pad_tokens(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = torch.zeros(rows - x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=0)


def reduce_scatter_fp32(x: torch.Tensor, group) -> torch.Tensor:
    """fp32 sum over the group, this rank's token shard (``[Ts, H]``) only."""
    tp, rank, t = dist.get_world_size(group), dist.get_rank(group), x.shape[0]
    start, end = shard_range(t, tp, rank)
    if _is_nccl(group):
        s = shard_rows(t, tp)
        full = _pad_tokens(x.float(), s * tp)
        out = torch.empty(s, *x.shape[1:], dtype=torch.float32, device=x.device)
        dist.reduce_scatter_tensor(out, full, group=group)
        return out[: end - start]
    # gloo has no reduce-scatter for every dtype/shape: all-reduce then slice (an oracle, not a fast path)
    return all_reduce_fp32(x, group)[start:end]


def reduce_scatter_rmsnorm(x, residual_shard, weight, eps, *, quant=None, gemma=False, group=None):
    s = reduce_scatter_fp32(x, group)
    if residual_shard is not None:
        s = s + residual_shard.float()
    return finish_output(rmsnorm_math(s, weight, eps, gemma), x.dtype, quant), s.to(x.dtype)


def all_gather(x_shard: torch.Tensor, num_tokens: int, group) -> torch.Tensor:
    """Concatenate every rank's token shard: ``[Ts, ...]`` -> ``[T, ...]`` (shards as in :mod:`tpfuse.sharding`)."""
    tp = dist.get_world_size(group)
    s = shard_rows(num_tokens, tp)
    padded = _pad_tokens(x_shard, s)
    out = torch.empty(s * tp, *x_shard.shape[1:], dtype=x_shard.dtype, device=x_shard.device)
    collectives.all_gather_into_(out, padded.contiguous(), group)
    return out[:num_tokens]


def _operand(t: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 value of a GEMM operand: dense, or e4m3 dequantized by its scale (:mod:`tpfuse.scaled_gemm`)."""
    if scale is None:
        return t.float()
    from .scaled_gemm import dequantize

    return dequantize(t, scale)


def all_gather_matmul(x_shard: torch.Tensor, weight: torch.Tensor, num_tokens: int, group, *,
                      x_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                      out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``all_gather(x) @ weight.T`` in fp32. FP8 (scales given): every rank dequantizes its shard first, so
    row-wise scales stay with their rows; the result is rounded to ``out_dtype`` (bf16)."""
    x = all_gather(_operand(x_shard, x_scale), num_tokens, group)
    return (x @ _operand(weight, w_scale).t()).to(out_dtype or x_shard.dtype)


def matmul_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, group, *, x_scale: Optional[torch.Tensor] = None,
                          w_scale: Optional[torch.Tensor] = None,
                          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    partial = _operand(x, x_scale) @ _operand(weight, w_scale).t()
    return reduce_scatter_fp32(partial, group).to(out_dtype or x.dtype)
