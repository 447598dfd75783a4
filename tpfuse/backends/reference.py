"""The ``reference`` and ``nccl`` paths of every op.

``reference`` runs :mod:`tpfuse.reference` (fp32 collectives, gloo or NCCL): the oracle, always available.
``nccl`` keeps the collective in the input dtype (half the bytes of the fp32 oracle) and applies the local stage
after it: the GPU fallback where no fused kernel is faster or possible (e.g. groups spanning nodes). FP8 GEMM ops
(:mod:`tpfuse.scaled_gemm`): the all-gather moves the e4m3 bytes and the row-wise scales, then ``_scaled_mm``.
"""

from __future__ import annotations

import torch

from .. import collectives
from .. import reference as ref
from ..dispatch import register
from ..sharding import shard_range, shard_rows


def _needs_nccl(comm):
    # one-GPU mode: the same native-dtype collectives on the gloo group, staged through host memory
    if comm.backend == "nccl" or comm.device.type == "cuda":
        return None
    return f"needs an NCCL group, or one-GPU mode (this one is {comm.backend} on the CPU)"


# TP=1 (both paths): a sum or gather over one rank is the input itself, so the collective (and the copy it needs)
# is skipped; the results are bit-identical (fp32 upcasts of the input are exact, and a one-rank collective
# returns its input unchanged). Outputs stay fresh tensors, inputs are never written.


@register("all_reduce", "reference")
def _ar_ref(comm, x):
    if comm.tp == 1:
        return x.clone()
    return ref.all_reduce(x, comm.ops_group)


@register("fused_add_rmsnorm", "reference")
def _far_ref(comm, x, residual, weight, eps, *, quant, gemma):
    if comm.tp == 1:
        return ref.add_rmsnorm(x, residual, weight, eps, quant=quant, gemma=gemma)
    return ref.fused_add_rmsnorm(x, residual, weight, eps, quant=quant, gemma=gemma, group=comm.ops_group)


@register("reduce_scatter_rmsnorm", "reference")
def _rsn_ref(comm, x, residual_shard, weight, eps, *, quant, gemma):
    if comm.tp == 1:
        return ref.add_rmsnorm(x, residual_shard, weight, eps, quant=quant, gemma=gemma)
    return ref.reduce_scatter_rmsnorm(x, residual_shard, weight, eps, quant=quant, gemma=gemma, group=comm.ops_group)


@register("all_gather", "reference")
def _ag_ref(comm, x_shard, num_tokens):
    if comm.tp == 1:
        return x_shard.clone()
    return ref.all_gather(x_shard, num_tokens, comm.ops_group)


@register("all_gather_matmul", "reference")
def _agmm_ref(comm, x_shard, weight, num_tokens, *, x_scale=None, w_scale=None):
    if comm.tp == 1:
        return (ref._operand(x_shard, x_scale) @ ref._operand(weight, w_scale).t()).to(comm.dtype)
    return ref.all_gather_matmul(x_shard, weight, num_tokens, comm.ops_group, x_scale=x_scale, w_scale=w_scale,
                                 out_dtype=comm.dtype)


@register("matmul_reduce_scatter", "reference")
def _mmrs_ref(comm, x, weight, *, x_scale=None, w_scale=None):
    if comm.tp == 1:
        return (ref._operand(x, x_scale) @ ref._operand(weight, w_scale).t()).to(comm.dtype)
    return ref.matmul_reduce_scatter(x, weight, comm.ops_group, x_scale=x_scale, w_scale=w_scale, out_dtype=comm.dtype)


# ---------------------------------------------------------------------------------------------------------------
# nccl: native-dtype collectives, local stage after


def _local_stage():
    from .. import ops  # the local fused kernels (Triton on GPU, reference elsewhere)
    return ops


@register("all_reduce", "nccl", available=_needs_nccl)
def _ar_nccl(comm, x):
    out = x.clone()
    if comm.tp > 1:
        collectives.all_reduce_(out, comm.ops_group, backend=comm.backend)
    return out


@register("fused_add_rmsnorm", "nccl", available=_needs_nccl)
def _far_nccl(comm, x, residual, weight, eps, *, quant, gemma):
    if comm.tp == 1:  # the local stage reads x and writes new outputs: no copy needed
        return _local_stage().add_rmsnorm(x, residual, weight, eps, quant=quant, gemma=gemma)
    s = x.clone()
    collectives.all_reduce_(s, comm.ops_group, backend=comm.backend)
    return _local_stage().add_rmsnorm(s, residual, weight, eps, quant=quant, gemma=gemma)


def _rs_native(comm, x):
    if comm.tp == 1:
        return x
    t = x.shape[0]
    s = shard_rows(t, comm.tp)
    full = x if s * comm.tp == t else torch.cat([x, x.new_zeros(s * comm.tp - t, *x.shape[1:])])
    out = torch.empty(s, *x.shape[1:], dtype=x.dtype, device=x.device)
    collectives.reduce_scatter_(out, full, comm.ops_group, backend=comm.backend)
    start, end = shard_range(t, comm.tp, comm.rank)
    return out[: end - start]


@register("reduce_scatter_rmsnorm", "nccl", available=_needs_nccl)
def _rsn_nccl(comm, x, residual_shard, weight, eps, *, quant, gemma):
    return _local_stage().add_rmsnorm(_rs_native(comm, x), residual_shard, weight, eps, quant=quant, gemma=gemma)


@register("all_gather", "nccl", available=_needs_nccl)
def _ag_nccl(comm, x_shard, num_tokens):
    if comm.tp == 1:
        return x_shard.clone()
    return ref.all_gather(x_shard, num_tokens, comm.ops_group)  # already native dtype on NCCL


@register("all_gather_matmul", "nccl", available=_needs_nccl)
def _agmm_nccl(comm, x_shard, weight, num_tokens, *, x_scale=None, w_scale=None):
    if comm.tp == 1:
        return _mmrs_nccl(comm, x_shard, weight, x_scale=x_scale, w_scale=w_scale)
    if w_scale is None:
        return ref.all_gather(x_shard, num_tokens, comm.ops_group) @ weight.t()
    from .. import scaled_gemm

    # FP8: gather the e4m3 bytes (NCCL moves them as uint8) and, when row-wise, the scales with them
    x = ref.all_gather(x_shard.view(torch.uint8), num_tokens, comm.ops_group).view(x_shard.dtype)
    if x_scale.dim() == 2:
        x_scale = ref.all_gather(x_scale, num_tokens, comm.ops_group)
    return scaled_gemm.mm(x, weight, x_scale, w_scale, out_dtype=comm.dtype)


@register("matmul_reduce_scatter", "nccl", available=_needs_nccl)
def _mmrs_nccl(comm, x, weight, *, x_scale=None, w_scale=None):
    if w_scale is None:
        return _rs_native(comm, x @ weight.t())
    from .. import scaled_gemm

    return _rs_native(comm, scaled_gemm.mm(x, weight, x_scale, w_scale, out_dtype=comm.dtype))


# matmul_reduce_scatter_rmsnorm on both paths: that path's reduce-scatter (its sum rounded to the input dtype), then
# the local fused add + RMSNorm (+ quant). The async-TP path fuses the two (tpfuse.backends.async_tp).
def _mmrs_then_norm(mmrs):
    def run(comm, x, weight, residual_shard, norm_weight, eps, *, quant, gemma, x_scale=None, w_scale=None):
        y = mmrs(comm, x, weight, x_scale=x_scale, w_scale=w_scale)
        return _local_stage().add_rmsnorm(y, residual_shard, norm_weight, eps, quant=quant, gemma=gemma)

    return run


register("matmul_reduce_scatter_rmsnorm", "reference")(_mmrs_then_norm(_mmrs_ref))
register("matmul_reduce_scatter_rmsnorm", "nccl", available=_needs_nccl)(_mmrs_then_norm(_mmrs_nccl))
