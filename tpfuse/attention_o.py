"""A decode step's attention whose split combine runs inside o_proj (``KVCacheConfig.fold_attn_combine``).

At batch 1 the split decode attention is two latency-bound launches (:mod:`tpfuse.attention`): the split kernel
and a combine kernel that reads a few KB. Here the split kernel leaves each partition's output normalized by its
own softmax sum, and o_proj multiplies those partials as extra rows, weighting each K step's product by its head's
combine weights (:mod:`tpfuse.kernels.attn_o_gemm`): one launch fewer a layer.

* ``rope_decode_attention_partials(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables,
  seq_lens, *, scale, max_seq_len=None, q_norm_weight=None, k_norm_weight=None, qk_eps=0.0, gemma=False)`` ->
  :class:`AttentionPartials`: :func:`tpfuse.attention.rope_decode_attention`'s RoPE, cache write and split
  attention (same arguments, same cache writes), without the combine; ``num_splits`` / ``min_partition`` /
  ``block_n`` / ``hoist`` override the launch rule (tests, benchmarks).
* ``attn_o_gemm(parts, weight)`` -> ``[B, N]``: ``x @ weight.T`` where ``x [B, Hq * D]`` is the attention output
  the partials combine to (rounded once, at the end; ``x`` is never rounded).
* ``attn_o_gemm_add(parts, weight, residual, norm_weight)`` -> ``(h, x_next, sumsq)``: the same with
  :func:`tpfuse.small_gemm.small_m_gemm_add`'s epilogue (the folded RMSNorm of TP = 1).

=================  ============================  ===============================================================
tensor             shape / dtype                 meaning
=================  ============================  ===============================================================
``parts.p``        ``[B, S, Hq, D]`` q's dtype   split ``s``'s attention output over its partition of the keys,
                                                 divided by its sum (``S`` = the launch's ``NUM_SPLITS``)
``parts.m``        ``[B * Hq * S]`` fp32         its max score (times ``scale * log2(e)``), at ``(b * Hq + h) *
                                                 S + s``
``parts.l``        ``[B * Hq * S]`` fp32         its sum of ``2^(score - m)``
``weight``         ``[N, Hq * D]`` q's dtype     o_proj's (this rank's heads)
=================  ============================  ===============================================================

Only the partitions that hold keys are written (``cdiv(n, part(n))`` of sequence ``b``, the decode attention's
partition rule, which :class:`AttentionPartials` carries with ``seq_lens``); the GEMM reads only those. Where it
applies (:func:`partials_config`): a 16-bit q and cache of one dtype, a split launch (one split writes the output
itself), ``next_pow2(B) * next_pow2(S) <= 64``, ``D >= 16``, at most 4096 combine weights a program
(``next_pow2(Hq) * next_pow2(B) * next_pow2(S)``).

Math contract: ``x[b, h] = sum_s c[b, h, s] * p[b, s, h]`` with ``c = l_s 2^(m_s - M) / sum_s' l_s' 2^(m_s' -
M)`` over the partitions that exist (0 for an empty sequence), which is the combine kernel's ``sum o_s 2^(m_s -
M) / sum l_s 2^(m_s - M)`` with ``o_s = l_s p_s``; ``out = x @ weight.T`` in fp32, rounded once. The partials are
rounded to q's dtype once each (the combine kernel rounds ``x`` once instead): within one rounding of the largest
partial, where the unfused pair is within one rounding of ``x``.

Dispatch as :mod:`tpfuse.attention`: CUDA tensors run the Triton kernels (custom ops
``tpfuse::rope_decode_attention_parts_``, ``tpfuse::attn_o_gemm``, ``tpfuse::attn_o_gemm_add`` with fake impls
while Dynamo traces; the bodies directly in eager mode), CPU tensors the references (:func:`partials_math`,
:func:`combine_math`), or the kernels under the Triton interpreter with ``TPFUSE_TRITON_CPU=1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import reference as ref
from .attention import (_check_cache, _check_new_kv, _check_q, _check_tables, _use_triton, gather_kv,
                        rope_write_ref)
from .errors import TPFuseInputError

LOG2E = 1.4426950408889634


@dataclass
class AttentionPartials:
    """A split decode attention's normalized partials (module docstring) and the partition rule that says which
    of them exist."""

    p: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int
    num_splits: int
    min_partition: int
    block_n: int
    """Keys per tile of the attention launch (the partition rule rounds partitions to it)."""

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(B, Hq, D)``."""
        return self.p.shape[0], self.p.shape[2], self.p.shape[3]


def partials_config(q: torch.Tensor, key_cache: torch.Tensor, **overrides):
    """The decode attention's launch config (:func:`~tpfuse.kernels.decode_attention.pick_config`, ``overrides``
    over its rule) where its partials can feed :func:`attn_o_gemm`: 16-bit q and cache of one dtype, a split
    launch whose rows fit (:func:`~tpfuse.kernels.attn_o_gemm.fits`); else None."""
    from .kernels.attn_o_gemm import fits
    from .kernels.decode_attention import device_sm_count, pick_config

    bsz, _, d = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16) or key_cache.dtype != q.dtype:
        return None
    cfg = pick_config(bsz, key_cache.shape[2], d, q.element_size(), sm_count=device_sm_count(q.device),
                      **overrides)
    return cfg if fits(bsz, cfg.num_splits, d, q.shape[1]) else None


def partition_len(n: int, num_splits: int, min_partition: int, block_n: int) -> int:
    """Keys per partition of a sequence of ``n`` keys (the decode attention's rule)."""
    per_split = -(-max(n, 0) // num_splits)
    return max(min_partition, -(-per_split // block_n) * block_n)


def partials_math(qr, key_cache, value_cache, block_tables, seq_lens, *, scale: float, max_seq_len: int,
                  num_splits: int, min_partition: int, block_n: int, dtype=torch.float32):
    """Reference partials ``(p [B, S, Hq, D], m, l)`` in ``dtype`` of the roped ``qr``: rows of partitions without
    keys are 0 (p, l) and ``-inf`` (m)."""
    bsz, hq, d = qr.shape
    hkv = key_cache.shape[2]
    p = torch.zeros(bsz, num_splits, hq, d, dtype=dtype, device=qr.device)
    m = torch.full((bsz, hq, num_splits), -math.inf, dtype=dtype, device=qr.device)
    l = torch.zeros(bsz, hq, num_splits, dtype=dtype, device=qr.device)
    for b, n in enumerate(seq_lens.tolist()):
        n = max(0, min(int(n), max_seq_len))
        if n == 0:
            continue
        k = gather_kv(key_cache, block_tables[b], n, dtype)
        v = gather_kv(value_cache, block_tables[b], n, dtype)
        s_all = torch.einsum("kgd,nkd->kgn", qr[b].to(dtype).view(hkv, hq // hkv, d), k).reshape(hq, n)
        s_all = s_all * (scale * LOG2E)
        part = partition_len(n, num_splits, min_partition, block_n)
        for s in range(-(-n // part)):
            lo, hi = s * part, min((s + 1) * part, n)
            sc = s_all[:, lo:hi]
            m[b, :, s] = sc.amax(dim=1)
            w = torch.exp2(sc - m[b, :, s, None])
            l[b, :, s] = w.sum(dim=1)
            o = torch.einsum("kgn,nkd->kgd", w.view(hkv, hq // hkv, hi - lo), v[lo:hi]).reshape(hq, d)
            p[b, s] = o / l[b, :, s, None]
    return p, m.reshape(-1), l.reshape(-1)


def combine_math(parts: AttentionPartials, dtype=torch.float32) -> torch.Tensor:
    """``x [B, Hq * D]`` in ``dtype``: the partials that exist combined (module docstring), 0 for empty
    sequences."""
    bsz, hq, d = parts.shape
    s_n = parts.num_splits
    x = torch.zeros(bsz, hq, d, dtype=dtype, device=parts.p.device)
    m = parts.m.to(dtype).view(bsz, hq, s_n)
    l = parts.l.to(dtype).view(bsz, hq, s_n)
    for b, n in enumerate(parts.seq_lens.tolist()):
        n = max(0, min(int(n), parts.max_seq_len))
        used = -(-n // partition_len(n, s_n, parts.min_partition, parts.block_n))
        if used == 0:
            continue
        mb, lb = m[b, :, :used], l[b, :, :used]
        w = lb * torch.exp2(mb - mb.amax(dim=1, keepdim=True))
        c = w / w.sum(dim=1, keepdim=True)  # [Hq, used]
        x[b] = torch.einsum("hs,shd->hd", c, parts.p[b, :used].to(dtype))
    return x.reshape(bsz, hq * d)


# --------------------------------------------------------------------------------------------------------------
# custom ops


def _parts_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor, p: torch.Tensor, m: torch.Tensor,
                l: torch.Tensor, scale: float, max_seq_len: int, num_splits: int, min_partition: int, block_n: int,
                q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor], qk_eps: float,
                gemma: bool, hoist: int = -1) -> None:
    if not _use_triton(q):
        qr = rope_write_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens,
                            max_seq_len=max_seq_len, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight,
                            qk_eps=qk_eps, gemma=gemma)
        pr, mr, lr = partials_math(qr, key_cache, value_cache, block_tables, seq_lens, scale=scale,
                                   max_seq_len=max_seq_len, num_splits=num_splits, min_partition=min_partition,
                                   block_n=block_n)
        p.copy_(pr)
        m.copy_(mr)
        l.copy_(lr)
        return
    from .kernels.decode_attention import launch_rope_decode_attention

    cfg = launch_rope_decode_attention(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables,
                                       seq_lens, p, scale, None, max_seq_len=max_seq_len, q_norm_weight=q_norm_weight,
                                       k_norm_weight=k_norm_weight, qk_eps=qk_eps, gemma=gemma, num_splits=num_splits,
                                       min_partition=min_partition, block_n=block_n, parts=(m, l),
                                       hoist=None if hoist < 0 else hoist)
    if cfg is not None and (cfg.num_splits, cfg.min_partition, cfg.block_n) != (num_splits, min_partition, block_n):
        raise RuntimeError(f"the attention launched {cfg}, the partials were sized for {num_splits} splits, partitions "
                           f"of {min_partition}, tiles of {block_n}")


_parts_op = torch.library.custom_op("tpfuse::rope_decode_attention_parts_", _parts_impl,
                                    mutates_args=("p", "m", "l", "key_cache", "value_cache"))


@_parts_op.register_fake
def _(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens, p, m, l, scale,
      max_seq_len, num_splits, min_partition, block_n, q_norm_weight, k_norm_weight, qk_eps, gemma, hoist=-1):
    return None


def _gemm_impl(p: torch.Tensor, m: torch.Tensor, l: torch.Tensor, seq_lens: torch.Tensor, weight: torch.Tensor,
               max_seq_len: int, num_splits: int, min_partition: int, block_n: int,
               residual: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Both GEMM ops' body: ``(out,)``, or ``(h, x_next, sumsq)`` with ``residual`` and ``norm_weight``."""
    from . import small_gemm

    parts = AttentionPartials(p, m, l, seq_lens, max_seq_len, num_splits, min_partition, block_n)
    bsz, hq, d = parts.shape
    n = weight.shape[0]
    if not _use_triton(p) or bsz == 0:
        x = combine_math(parts).to(p.dtype)  # rounded as the unfused pair's combine rounds it
        if residual is None:
            return (ref.small_m_gemm(x, weight),)
        return ref.small_m_gemm_add(x, weight, residual, norm_weight, None, rows=small_gemm.SUMSQ_ROWS)
    from .kernels.attn_o_gemm import launch_attn_o_gemm

    out = torch.empty(bsz, n, dtype=p.dtype, device=p.device)
    add = None
    if residual is not None:
        add = (residual, norm_weight, torch.empty_like(out),
               torch.empty(n // small_gemm.SUMSQ_ROWS, bsz, dtype=torch.float32, device=p.device))
    arch, sms = small_gemm.device_info(p.device)
    launch_attn_o_gemm(p, m, l, seq_lens, weight, out, max_len=max_seq_len, num_splits=num_splits,
                       min_partition=min_partition, attn_block_n=block_n, n_heads=hq, head_dim=d,
                       scheme="bf16" if p.dtype == torch.bfloat16 else "fp16", arch=arch, sms=sms, add=add)
    return (out,) if add is None else (out, add[2], add[3])


def _gemm_op_impl(p: torch.Tensor, m: torch.Tensor, l: torch.Tensor, seq_lens: torch.Tensor, weight: torch.Tensor,
                  max_seq_len: int, num_splits: int, min_partition: int, block_n: int) -> torch.Tensor:
    return _gemm_impl(p, m, l, seq_lens, weight, max_seq_len, num_splits, min_partition, block_n, None, None)[0]


def _gemm_add_op_impl(p: torch.Tensor, m: torch.Tensor, l: torch.Tensor, seq_lens: torch.Tensor,
                      weight: torch.Tensor, max_seq_len: int, num_splits: int, min_partition: int, block_n: int,
                      residual: torch.Tensor, norm_weight: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gemm_impl(p, m, l, seq_lens, weight, max_seq_len, num_splits, min_partition, block_n, residual,
                      norm_weight)


_gemm_op = torch.library.custom_op("tpfuse::attn_o_gemm", _gemm_op_impl, mutates_args=())
_gemm_add_op = torch.library.custom_op("tpfuse::attn_o_gemm_add", _gemm_add_op_impl, mutates_args=())


@_gemm_op.register_fake
def _(p, m, l, seq_lens, weight, max_seq_len, num_splits, min_partition, block_n):
    return p.new_empty((p.shape[0], weight.shape[0]))


@_gemm_add_op.register_fake
def _(p, m, l, seq_lens, weight, max_seq_len, num_splits, min_partition, block_n, residual, norm_weight):
    from .small_gemm import SUMSQ_ROWS

    out = p.new_empty((p.shape[0], weight.shape[0]))
    return out, torch.empty_like(out), p.new_empty((weight.shape[0] // SUMSQ_ROWS, p.shape[0]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# public functions


def rope_decode_attention_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                                   cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float,
                                   max_seq_len: Optional[int] = None, q_norm_weight: Optional[torch.Tensor] = None,
                                   k_norm_weight: Optional[torch.Tensor] = None, qk_eps: float = 0.0,
                                   gemma: bool = False, num_splits: Optional[int] = None,
                                   min_partition: Optional[int] = None, block_n: Optional[int] = None,
                                   hoist: Optional[int] = None) -> AttentionPartials:
    """:func:`tpfuse.attention.rope_decode_attention` (same arguments, same cache writes) leaving the split
    partials for :func:`attn_o_gemm` (module docstring). Raises :class:`~tpfuse.errors.TPFuseInputError` where
    :func:`partials_config` says no. ``num_splits`` / ``min_partition`` / ``block_n`` override the launch rule,
    ``hoist`` its reads before the PDL wait (tests, benchmarks)."""
    _check_q(q)
    _check_cache(q, key_cache, value_cache, None)
    _check_new_kv(q, k, v, positions, cos_sin_cache, q_norm_weight, k_norm_weight)
    if k.shape[1] != key_cache.shape[2]:
        raise TPFuseInputError(f"k has {k.shape[1]} heads, the cache {key_cache.shape[2]}")
    max_seq_len = _check_tables(q, block_tables, seq_lens, key_cache.shape[1], max_seq_len)
    over = {k: v for k, v in dict(num_splits=num_splits, min_partition=min_partition, block_n=block_n).items()
            if v is not None}
    cfg = partials_config(q, key_cache, **over)
    if cfg is None:
        raise TPFuseInputError(f"no split partials for B={q.shape[0]}, {key_cache.shape[2]} kv heads, D={q.shape[2]}, "
                               f"{q.dtype} q, {key_cache.dtype} cache (tpfuse.attention_o.partials_config)")
    bsz, hq, d = q.shape
    s_n = cfg.num_splits
    p = torch.empty(bsz, s_n, hq, d, dtype=q.dtype, device=q.device)
    m = torch.empty(bsz * hq * s_n, dtype=torch.float32, device=q.device)
    l = torch.empty(bsz * hq * s_n, dtype=torch.float32, device=q.device)
    eager = not torch.compiler.is_compiling()
    (_parts_impl if eager else torch.ops.tpfuse.rope_decode_attention_parts_)(
        q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens, p, m, l,
        float(scale), max_seq_len, s_n, cfg.min_partition, cfg.block_n, q_norm_weight, k_norm_weight, float(qk_eps),
        bool(gemma), -1 if hoist is None else int(hoist))
    return AttentionPartials(p, m, l, seq_lens, max_seq_len, s_n, cfg.min_partition, cfg.block_n)


def _check_parts(parts: AttentionPartials) -> None:
    """``parts`` as :func:`rope_decode_attention_partials` makes them (a hand-built object read out of bounds
    otherwise)."""
    p = parts.p
    if p.dim() != 4 or p.dtype not in (torch.bfloat16, torch.float16) or not p.is_contiguous():
        raise TPFuseInputError(f"parts.p must be a contiguous bf16 / fp16 [B, splits, Hq, D], got {tuple(p.shape)} "
                               f"{p.dtype}")
    bsz, s_n, hq, _ = p.shape
    if s_n != parts.num_splits or parts.num_splits < 2 or parts.min_partition % parts.block_n:
        raise TPFuseInputError(f"parts: p has {s_n} splits, num_splits is {parts.num_splits} (>= 2), min_partition "
                               f"{parts.min_partition} a multiple of block_n {parts.block_n}")
    for name, t in (("m", parts.m), ("l", parts.l)):
        if t.dtype != torch.float32 or t.numel() != bsz * hq * s_n or not t.is_contiguous() or t.device != p.device:
            raise TPFuseInputError(f"parts.{name} must be {bsz * hq * s_n} contiguous fp32 on {p.device}")
    sl = parts.seq_lens
    if sl.shape != (bsz,) or sl.dtype not in (torch.int32, torch.int64) or sl.device != p.device or (
            bsz > 1 and sl.stride(0) != 1):
        raise TPFuseInputError(f"parts.seq_lens must be [{bsz}] int32 / int64, contiguous, on {p.device}")
    from .kernels.attn_o_gemm import fits

    if not fits(bsz, s_n, p.shape[3], hq):
        raise TPFuseInputError(f"parts of B={bsz}, {s_n} splits, {hq} heads of {p.shape[3]}: more rows or combine "
                               f"weights than a launch takes (tpfuse.kernels.attn_o_gemm.fits)")


def _check_weight(parts: AttentionPartials, weight: torch.Tensor) -> None:
    _check_parts(parts)
    bsz, hq, d = parts.shape
    if (weight.dim() != 2 or weight.shape[1] != hq * d or weight.dtype != parts.p.dtype or not weight.is_contiguous()
            or weight.device != parts.p.device or weight.shape[0] % 16):
        raise TPFuseInputError(f"weight must be [N, {hq * d}] {parts.p.dtype}, contiguous, N a multiple of 16, on "
                               f"{parts.p.device}; got {tuple(weight.shape)} {weight.dtype}")


def _args(parts: AttentionPartials, weight: torch.Tensor) -> tuple:
    return (parts.p, parts.m, parts.l, parts.seq_lens, weight, int(parts.max_seq_len), int(parts.num_splits),
            int(parts.min_partition), int(parts.block_n))


def attn_o_gemm(parts: AttentionPartials, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` ``[B, N]`` with ``x`` the attention output the partials combine to (module docstring)."""
    _check_weight(parts, weight)
    eager = not torch.compiler.is_compiling()
    return (_gemm_op_impl if eager else torch.ops.tpfuse.attn_o_gemm)(*_args(parts, weight))


def attn_o_gemm_add(parts: AttentionPartials, weight: torch.Tensor, residual: torch.Tensor,
                    norm_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attn_o_gemm` with :func:`tpfuse.small_gemm.small_m_gemm_add`'s epilogue: ``(h, x_next, sumsq)``."""
    from .small_gemm import SUMSQ_ROWS

    _check_weight(parts, weight)
    bsz, n = parts.p.shape[0], weight.shape[0]
    if n % SUMSQ_ROWS:
        raise TPFuseInputError(f"attn_o_gemm_add needs N a multiple of {SUMSQ_ROWS}, got N={n}")
    for name, t, shape in (("residual", residual, (bsz, n)), ("norm_weight", norm_weight, (n,))):
        if tuple(t.shape) != shape or t.dtype != parts.p.dtype or t.device != parts.p.device or t.stride(-1) != 1:
            raise TPFuseInputError(f"{name} must be {list(shape)} {parts.p.dtype} on {parts.p.device} with a unit "
                                   f"last stride, got {list(t.shape)} {t.dtype}")
    eager = not torch.compiler.is_compiling()
    return (_gemm_add_op_impl if eager else torch.ops.tpfuse.attn_o_gemm_add)(*_args(parts, weight), residual,
                                                                              norm_weight)
