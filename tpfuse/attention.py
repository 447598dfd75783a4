"""Decode attention over a paged KV cache (one new query token per sequence, GQA), flash-decoding style.

Public op (plain-torch reference beside it; Triton kernels in :mod:`tpfuse.kernels.decode_attention`):

* ``decode_attention(q, key_cache, value_cache, block_tables, seq_lens, *, scale, kv_scale=None, out=None,
  max_seq_len=None)`` -> ``out``. Attention of each sequence's single query token over its first ``seq_lens[b]``
  cached keys/values, read through its block table. The cache layout is the one
  :func:`tpfuse.rope.rope_kv_cache_write` writes (``slot = block * block_size + offset``). Returns ``out`` (the
  given buffer, or a new one). Capturable in a CUDA graph: ``seq_lens`` and ``block_tables`` are only read on the
  device, the launch configuration depends only on ``B``, the head counts, ``D``, the dtypes and the GPU, never on
  ``max_seq_len`` or the lengths: each sequence is partitioned on the device from its own length, so a step's work
  follows the lengths, not the capacity.
* ``rope_decode_attention(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens, *,
  scale, ...)`` -> ``out``: a decode step's RoPE (after the per-head QK-norm when its weights are given), KV-cache
  write and ``decode_attention`` in one kernel launch (plus the split launch's combine): ``q``, ``k``, ``v`` are
  the step's un-roped projections (``[B, Hq, D]``, ``[B, Hkv, D]``, ``[B, Hkv, D]``, unit last stride, read
  only); the roped k and v become key ``n - 1`` of each sequence (``n = clamp(seq_lens[b], 0, max_seq_len)``,
  the new token counted; slot :func:`new_key_slots`), and the attention covers keys ``[0, n)``. The reference
  (:func:`rope_decode_attention_ref`) is the unfused sequence ``tpfuse.rope`` + ``decode_attention_ref``.

Shapes (B sequences, Hq / Hkv query / kv heads, D head_dim, NB cache blocks, BS block_size, MB max blocks per seq):

================  ===============================================  ==========================================
argument          shape / dtype                                    notes
================  ===============================================  ==========================================
q                 [B, Hq, D] bf16 / fp16 / fp32                    unit stride on D; B and Hq strides free
                                                                   (e.g. a view of a wider qkv row)
key_cache         [NB, BS, Hkv, D], q's dtype or float8_e4m3fn     unit stride on D; BS a power of two >= 16
value_cache       same shape and dtype as key_cache
block_tables      [B, MB] int32 (int64 accepted)                   block ids of each sequence, in key order;
                                                                   unit column stride; entries past a
                                                                   sequence's length are never read
seq_lens          [B] int32 (int64 accepted)                       valid keys 0 .. len-1 of each sequence;
                                                                   0 (or negative) gives out = 0
kv_scale          fp32 tensor of one element, on the device        FP8 caches only (ignored otherwise)
out               [B, Hq, D] q's dtype, unit stride on D           optional (preallocate for CUDA graphs);
                                                                   every element is written
max_seq_len       int, 1 <= max_seq_len <= MB * BS                 capacity (default MB * BS): lengths are
                                                                   clamped to it on the device (keys past it
                                                                   are ignored); the launch does not use it
================  ===============================================  ==========================================

Constraints: ``Hq % Hkv == 0`` (query head ``h`` uses kv head ``h // (Hq // Hkv)``); D a power of two in 16..256.

Math contract (the reference defines it, a kernel that differs is wrong): with ``n = clamp(seq_lens[b], 0,
max_seq_len)``, ``K[b, i] = key_cache[block_tables[b, i // BS], i % BS, h_kv]`` (times ``kv_scale`` for an FP8
cache, same for V), ``out[b, h] = softmax(scale * q[b, h] . K[b, :n]) @ V[b, :n]``, all in fp32, rounded once to
q's dtype; ``n == 0`` gives zeros. The kernel's only extra rounding is P in the P.V tensor-core product, which it
keeps to ~16 bits (hi/lo split), well inside one final bf16/fp16 rounding.

Dispatch: CUDA tensors run the Triton kernels through the ``torch.library`` custom ops ``tpfuse::decode_attention_``
(mutates ``out``) and ``tpfuse::rope_decode_attention_`` (mutates ``out`` and the caches), both returning nothing,
with fake impls, so the public functions work under
``torch.compile(fullgraph=True)`` and CUDA-graph capture). CPU tensors run the plain-torch reference. With the
environment variable ``TPFUSE_TRITON_CPU=1`` CPU tensors take the Triton path too, which only works under the
Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported); the interpreter tests use it.
``import tpfuse`` never imports Triton: the launcher is imported lazily.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import quant as _quant
from .errors import TPFuseInputError

# --------------------------------------------------------------------------------------------------------------
# references (math in ``dtype``: fp32 for the reference path, fp64 in the tests' oracle)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n: int, dtype=torch.float32,
              kv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first ``n`` keys (or values) ``[n, Hkv, D]`` of one sequence in ``dtype``, read through its block table
    row; only the blocks that hold them are touched. FP8 caches are dequantized (``x * kv_scale``)."""
    bs = cache.shape[1]
    blocks = block_table[: (n + bs - 1) // bs].to(torch.long)
    fp8 = cache.dtype == _quant.FP8_DTYPE
    src = cache.view(torch.uint8) if fp8 else cache  # index_select has no e4m3 kernel everywhere: gather bytes
    x = src.index_select(0, blocks).reshape(-1, *cache.shape[2:])[:n]
    if fp8:
        return x.view(cache.dtype).to(dtype) * kv_scale.to(dtype).reshape(())
    return x.to(dtype)


def decode_attention_math(q, key_cache, value_cache, block_tables, seq_lens, *, scale, kv_scale=None,
                          max_seq_len=None, dtype=torch.float32) -> torch.Tensor:
    """Unrounded ``out [B, Hq, D]`` in ``dtype`` (see the module docstring); reads ``seq_lens`` on the host."""
    bsz, hq, d = q.shape
    hkv = key_cache.shape[2]
    cap = block_tables.shape[1] * key_cache.shape[1] if max_seq_len is None else max_seq_len
    out = torch.zeros(bsz, hq, d, dtype=dtype, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        n = max(0, min(int(n), cap))
        if n == 0:
            continue
        k = gather_kv(key_cache, block_tables[b], n, dtype, kv_scale)  # [n, Hkv, D]
        v = gather_kv(value_cache, block_tables[b], n, dtype, kv_scale)
        qg = q[b].to(dtype).view(hkv, hq // hkv, d)  # query head h = kv head h // group, row h % group
        s = torch.einsum("kgd,nkd->kgn", qg, k) * scale
        out[b] = torch.einsum("kgn,nkd->kgd", torch.softmax(s, dim=-1), v).reshape(hq, d)
    return out


def decode_attention_ref(q, key_cache, value_cache, block_tables, seq_lens, *, scale, kv_scale=None,
                         max_seq_len=None) -> torch.Tensor:
    """Reference: new ``out [B, Hq, D]`` in q's dtype (fp32 math, one rounding)."""
    return decode_attention_math(q, key_cache, value_cache, block_tables, seq_lens, scale=scale, kv_scale=kv_scale,
                                 max_seq_len=max_seq_len).to(q.dtype)


def new_key_slots(block_tables, seq_lens, block_size: int, max_seq_len: Optional[int] = None) -> torch.Tensor:
    """``[B]`` int64 cache slot (``block * block_size + offset``) of key ``n - 1`` of each sequence, ``n =
    clamp(seq_lens, 0, max_seq_len)``; -1 where ``n == 0``: where :func:`rope_decode_attention` writes this step's
    k / v."""
    cap = block_tables.shape[1] * block_size if max_seq_len is None else max_seq_len
    n = seq_lens.to(torch.long).clamp(0, cap)
    i = (n - 1).clamp_min(0)
    blk = block_tables.to(torch.long).gather(1, (i // block_size)[:, None])[:, 0]
    return torch.where(n > 0, blk * block_size + i % block_size, -1)


def rope_decode_attention_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens, *,
                              scale, kv_scale=None, max_seq_len=None, q_norm_weight=None, k_norm_weight=None,
                              qk_eps: float = 0.0, gemma: bool = False) -> torch.Tensor:
    """Reference of :func:`rope_decode_attention`: the unfused sequence (per-head RMSNorm where weights are given,
    RoPE, each rounded once to q's dtype; the cache write at :func:`new_key_slots`; :func:`decode_attention_ref`).
    Updates the caches in place; returns a new ``out``."""
    qr = rope_write_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens,
                        kv_scale=kv_scale, max_seq_len=max_seq_len, q_norm_weight=q_norm_weight,
                        k_norm_weight=k_norm_weight, qk_eps=qk_eps, gemma=gemma)
    return decode_attention_ref(qr, key_cache, value_cache, block_tables, seq_lens, scale=scale, kv_scale=kv_scale,
                                max_seq_len=max_seq_len)


def rope_write_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens, *,
                   kv_scale=None, max_seq_len=None, q_norm_weight=None, k_norm_weight=None, qk_eps: float = 0.0,
                   gemma: bool = False) -> torch.Tensor:
    """The first half of :func:`rope_decode_attention_ref`: the roped q (rounded to q's dtype), with the roped k
    and v written into the caches."""
    from .reference import rmsnorm_math
    from .rope import cos_sin, kv_cache_write_ref, rope_math

    c, s = cos_sin(cos_sin_cache, positions)
    qf, kf = q.float(), k.float()
    if q_norm_weight is not None:
        qf, kf = rmsnorm_math(qf, q_norm_weight, qk_eps, gemma), rmsnorm_math(kf, k_norm_weight, qk_eps, gemma)
    qr = rope_math(qf, c, s, True).to(q.dtype)
    kr = rope_math(kf, c, s, True).to(k.dtype)
    slots = new_key_slots(block_tables, seq_lens, key_cache.shape[1], max_seq_len)
    kv_cache_write_ref(kr, v, key_cache, value_cache, slots, kv_scale)
    return qr


# --------------------------------------------------------------------------------------------------------------
# custom ops


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TPFUSE_TRITON_CPU") == "1"


@torch.library.custom_op("tpfuse::decode_attention_", mutates_args=("out",))
def _decode_attention_op(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, scale: float,
                         max_seq_len: int, kv_scale: Optional[torch.Tensor]) -> None:
    if not _use_triton(q):
        out.copy_(decode_attention_ref(q, key_cache, value_cache, block_tables, seq_lens, scale=scale,
                                       kv_scale=kv_scale, max_seq_len=max_seq_len))
        return
    from .kernels.decode_attention import launch_decode_attention

    launch_decode_attention(q, key_cache, value_cache, block_tables, seq_lens, out, scale, kv_scale,
                            max_seq_len=max_seq_len)


@_decode_attention_op.register_fake
def _(q, key_cache, value_cache, block_tables, seq_lens, out, scale, max_seq_len, kv_scale):
    return None


@torch.library.custom_op("tpfuse::rope_decode_attention_", mutates_args=("out", "key_cache", "value_cache"))
def _rope_decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, scale: float,
                              max_seq_len: int, kv_scale: Optional[torch.Tensor], q_norm_weight: Optional[torch.Tensor],
                              k_norm_weight: Optional[torch.Tensor], qk_eps: float, gemma: bool,
                              prefetch: Optional[torch.Tensor] = None) -> None:
    if not _use_triton(q):
        out.copy_(rope_decode_attention_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables,
                                            seq_lens, scale=scale, kv_scale=kv_scale, max_seq_len=max_seq_len,
                                            q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, qk_eps=qk_eps,
                                            gemma=gemma))
        return
    from .kernels.decode_attention import launch_rope_decode_attention

    launch_rope_decode_attention(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens,
                                 out, scale, kv_scale, max_seq_len=max_seq_len, q_norm_weight=q_norm_weight,
                                 k_norm_weight=k_norm_weight, qk_eps=qk_eps, gemma=gemma, prefetch=prefetch)


@_rope_decode_attention_op.register_fake
def _(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens, out, scale, max_seq_len,
      kv_scale, q_norm_weight, k_norm_weight, qk_eps, gemma, prefetch=None):
    return None


# --------------------------------------------------------------------------------------------------------------
# public function


def _pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


def _check_q(q) -> None:
    if q.dim() != 3 or q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or q.stride(2) != 1:
        raise TPFuseInputError(f"q must be [B, num_heads, head_dim] bf16/fp16/fp32 with a unit last stride, got "
                               f"{tuple(q.shape)} {q.dtype}")
    d = q.shape[2]
    if not _pow2(d) or not 16 <= d <= 256:
        raise TPFuseInputError(f"head_dim must be a power of two in 16..256, got {d}")


def _out_buffer(q, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` checked against ``q``, or a new one."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1 or out.device != q.device:
        raise TPFuseInputError(f"out must be {tuple(q.shape)} {q.dtype} with a unit last stride on {q.device}, "
                               f"got {tuple(out.shape)} {out.dtype}")
    return out


def _check_cache(q, key_cache, value_cache, kv_scale):
    bsz, hq, d = q.shape
    for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
        if c.dim() != 4 or c.shape[3] != d or c.stride(3) != 1 or c.device != q.device:
            raise TPFuseInputError(f"{name} must be [num_blocks, block_size, num_kv_heads, {d}] (unit last stride) "
                                   f"on {q.device}, got {tuple(c.shape)} on {c.device}")
    if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise TPFuseInputError("key_cache and value_cache must have the same shape and dtype")
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    if not _pow2(bs) or bs < 16:
        raise TPFuseInputError(f"block_size must be a power of two >= 16, got {bs}")
    if hkv == 0 or hq % hkv:
        raise TPFuseInputError(f"num_heads {hq} must be a multiple of num_kv_heads {hkv}")
    if key_cache.dtype == _quant.FP8_DTYPE:
        if (kv_scale is None or kv_scale.numel() != 1 or kv_scale.dtype != torch.float32
                or kv_scale.device != q.device):
            raise TPFuseInputError(f"an FP8 KV cache needs kv_scale: an fp32 tensor of one element on {q.device}")
    elif key_cache.dtype != q.dtype:
        raise TPFuseInputError(f"cache dtype {key_cache.dtype} must be q's dtype {q.dtype} or float8_e4m3fn")


def _check_index_vector(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    """``x`` must be one int32 / int64 value per sequence of ``q``, contiguous (the kernels read ``x[b]`` at
    ``ptr + b``), on q's device."""
    bsz = q.shape[0]
    if (x.shape != (bsz,) or x.dtype not in (torch.int32, torch.int64) or x.device != q.device
            or (bsz > 1 and x.stride(0) != 1)):
        raise TPFuseInputError(f"{name} must be [{bsz}] int32 (or int64), contiguous, on {q.device}, got "
                               f"{tuple(x.shape)} {x.dtype} on {x.device}")


def _check_tables(q, block_tables, seq_lens, block_size, max_seq_len) -> int:
    bsz = q.shape[0]
    if (block_tables.dim() != 2 or block_tables.shape[0] != bsz or block_tables.dtype not in (torch.int32,
                                                                                           torch.int64)
            or block_tables.stride(1) != 1 or block_tables.device != q.device):
        raise TPFuseInputError(f"block_tables must be [{bsz}, max_blocks] int32 (unit column stride) on {q.device}, "
                               f"got {tuple(block_tables.shape)} {block_tables.dtype}")
    _check_index_vector("seq_lens", seq_lens, q)
    cap = block_tables.shape[1] * block_size
    max_seq_len = cap if max_seq_len is None else int(max_seq_len)
    if not 1 <= max_seq_len <= cap:
        raise TPFuseInputError(f"max_seq_len must be in [1, max_blocks * block_size = {cap}], got {max_seq_len}")
    return max_seq_len


def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, *, scale: float, kv_scale: Optional[torch.Tensor] = None,
                     out: Optional[torch.Tensor] = None, max_seq_len: Optional[int] = None) -> torch.Tensor:
    """Decode attention of ``q [B, Hq, D]`` over the paged KV cache; writes and returns ``out [B, Hq, D]``.
    See the module docstring for shapes, the math contract and CUDA-graph use."""
    _check_q(q)
    _check_cache(q, key_cache, value_cache, kv_scale)
    max_seq_len = _check_tables(q, block_tables, seq_lens, key_cache.shape[1], max_seq_len)
    out = _out_buffer(q, out)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return out
    _decode_attention_op(q, key_cache, value_cache, block_tables, seq_lens, out, float(scale), max_seq_len,
                         kv_scale if key_cache.dtype == _quant.FP8_DTYPE else None)
    return out


def _check_new_kv(q, k, v, positions, cos_sin_cache, q_norm_weight, k_norm_weight):
    bsz, hq, d = q.shape
    hkv = k.shape[1] if k.dim() == 3 else -1
    for name, x in (("k", k), ("v", v)):
        if (x.dim() != 3 or x.shape != (bsz, hkv, d) or x.dtype != q.dtype or x.stride(2) != 1
                or x.device != q.device):
            raise TPFuseInputError(f"{name} must be [{bsz}, num_kv_heads, {d}] {q.dtype} with a unit last stride on "
                                   f"{q.device}, got {tuple(x.shape)} {x.dtype}")
    _check_index_vector("positions", positions, q)
    if (cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != d or cos_sin_cache.stride(1) != 1
            or not cos_sin_cache.is_floating_point() or cos_sin_cache.device != q.device):
        raise TPFuseInputError(f"cos_sin_cache must be [max_positions, {d}] floating ([cos | sin] rows, unit column "
                               f"stride) on {q.device}, got {tuple(cos_sin_cache.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise TPFuseInputError("q_norm_weight and k_norm_weight go together (QK-norm) or not at all")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and (w.shape != (d,) or w.stride(0) != 1 or w.device != q.device):
            raise TPFuseInputError(f"{name} must be [{d}] contiguous on {q.device}, got {tuple(w.shape)}")


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor, *, scale: float,
                          kv_scale: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                          max_seq_len: Optional[int] = None, q_norm_weight: Optional[torch.Tensor] = None,
                          k_norm_weight: Optional[torch.Tensor] = None, qk_eps: float = 0.0,
                          gemma: bool = False, prefetch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode step's attention with its RoPE and KV-cache write folded in: the sequence
    ``rope_kv_cache_write`` (or ``qk_norm_rope`` + a cache write) then :func:`decode_attention`, in one kernel
    launch (plus the combine of a split launch). ``q [B, Hq, D]``, ``k`` / ``v [B, Hkv, D]`` (q's dtype, unit last
    stride, e.g. views of a qkv row) are this step's projections, not yet roped, and stay unchanged;
    ``positions [B]`` their RoPE positions into ``cos_sin_cache [P, D]`` (``[cos | sin]`` rows, NeoX style). With
    ``n = clamp(seq_lens[b], 0, max_seq_len)`` (the new token counted), the roped k and v are written as key
    ``n - 1`` of sequence ``b`` (slot :func:`new_key_slots`; nothing where ``n == 0``), quantized as
    :func:`tpfuse.rope.rope_kv_cache_write` does for an FP8 cache; ``out`` gets the attention of the roped q over
    keys ``[0, n)``. ``q_norm_weight`` / ``k_norm_weight [D]``: per-head RMSNorm (``qk_eps``; ``gemma``: weight
    + 1) before the rotation, as :func:`tpfuse.rope.qk_norm_rope`. Other arguments, shapes and CUDA-graph use as
    :func:`decode_attention`; the reference (:func:`rope_decode_attention_ref`) rounds the roped q and k once to
    q's dtype, as the kernel does. Precondition: no sequence's keys ``< n - 1`` live in the slot another sequence's
    new key goes to (a block shared by prefix caching is full; tpfuse's static paging never shares one): the write
    and the other sequence's read would race in the one launch. ``prefetch``: a tensor no kernel writes while this
    runs (the next GEMM's weight, e.g. o_proj's), whose bytes the kernel's programs bring into L2 as they start
    (a hint: no value changes; nothing on CPU or under the interpreter)."""
    _check_q(q)
    _check_cache(q, key_cache, value_cache, kv_scale)
    _check_new_kv(q, k, v, positions, cos_sin_cache, q_norm_weight, k_norm_weight)
    if prefetch is not None and prefetch.device != q.device:
        raise TPFuseInputError(f"prefetch must be on {q.device}, got {prefetch.device}")
    if k.shape[1] != key_cache.shape[2]:
        raise TPFuseInputError(f"k has {k.shape[1]} heads, the cache {key_cache.shape[2]}")
    max_seq_len = _check_tables(q, block_tables, seq_lens, key_cache.shape[1], max_seq_len)
    out = _out_buffer(q, out)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return out
    _rope_decode_attention_op(q, k, v, positions, cos_sin_cache, key_cache, value_cache, block_tables, seq_lens, out,
                              float(scale), max_seq_len, kv_scale if key_cache.dtype == _quant.FP8_DTYPE else None,
                              q_norm_weight, k_norm_weight, float(qk_eps), bool(gemma), prefetch)
    return out
