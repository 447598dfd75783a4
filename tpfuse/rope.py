"""Rotary embedding stages of attention: fused per-head QK-RMSNorm + RoPE, and RoPE + paged KV-cache write.

Public ops (plain-torch references beside them; Triton kernels in :mod:`tpfuse.kernels.rope`):

* ``qk_norm_rope(qkv, q_weight, k_weight, cos_sin_cache, positions, *, num_heads, num_kv_heads, head_dim, eps,
  is_neox, gemma=False)`` -> ``(q, k)``. **In place**, as vLLM's fused op: the q and k columns of ``qkv`` are
  overwritten with ``rope(rmsnorm_per_head(x))``; the returned ``q [T, Hq*D]`` and ``k [T, Hkv*D]`` are views of the
  updated ``qkv``; the v columns are never read or written.
* ``rope_kv_cache_write(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, *, is_neox,
  kv_scale=None)`` -> ``(q, k)``. **In place** on ``q`` and ``k`` (roped, as vLLM's ``rotary_embedding``); the
  roped k and v are written into the paged caches at ``slot_mapping`` (``slot = block * block_size + offset``;
  ``-1`` skips the token, its cache rows are not touched). The cache stores exactly what the unfused sequence
  (rope in place, then cache write) stores: the *rounded* roped k. FP8 e4m3 caches (``torch.float8_e4m3fn``) need
  ``kv_scale`` (fp32 tensor of one element, on the device; read on device, no host sync), one scale for k and v:
  ``clamp(x * (1 / kv_scale), -448, 448)`` rounded to nearest even (NaN stays NaN).

Shapes (T tokens, Hq / Hkv query / kv heads, D head_dim, P max positions, R = rot_dim = D):

=====================  ========================================================  ==================================
op                     inputs                                                    outputs (in place)
=====================  ========================================================  ==================================
qk_norm_rope           qkv [T, (Hq + 2 Hkv) D] (row stride free), q_weight [D],   q [T, Hq D], k [T, Hkv D] views
                       k_weight [D], cos_sin_cache [P, R], positions [T] int64   of qkv
rope_kv_cache_write    q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D],               q, k (roped in place);
                       positions [T], cos_sin_cache [P, R], slot_mapping [T],    key_cache / value_cache
                       key_cache / value_cache [blocks, block_size, Hkv, D],     rows at the valid slots
                       kv_scale [] or [1] fp32 (FP8 cache only)
=====================  ========================================================  ==================================

``cos_sin_cache`` follows vLLM: row ``p`` is ``[cos(p * f_0..f_{R/2-1}), sin(...)]`` (cos first half, sin second),
fp32 or bf16/fp16, upcast to fp32. Only full rotary (``R == D``) is supported; D a power of two >= 16 (64/128/256
are the tested ones). NeoX style rotates halves (``i`` with ``i + D/2``); GPT-J style interleaved pairs (``2i`` with
``2i + 1``).

Math contract (the reference defines it, a kernel that differs is wrong): fp32 throughout and one rounding to the
tensor's dtype at the end; ``y = x * rsqrt(mean(x^2) + eps) * w`` (``w = weight`` or ``weight + 1`` for Gemma),
then ``y1 * cos - y2 * sin``, ``y2 * cos + y1 * sin``. The fused op does not round between norm and rope (the
unfused sequence does), so it is at least as accurate as the unfused one.

Dispatch: CUDA tensors run the Triton kernels through the ``torch.library`` custom ops below (``tpfuse::
qk_norm_rope_`` and ``tpfuse::rope_kv_cache_write_``, both returning nothing and declaring what they mutate, with
fake impls, so the public functions work under ``torch.compile(fullgraph=True)`` and CUDA-graph capture); in eager
mode the public functions call the ops' bodies directly, without the custom-op dispatch. CPU
tensors run the plain-torch reference. With the environment variable ``TPFUSE_TRITON_CPU=1`` CPU tensors take the
Triton path too, which only works under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported); the interpreter tests use it. ``import tpfuse`` never imports Triton: the launchers import it lazily.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import quant as _quant
from .errors import TPFuseInputError
from .reference import rmsnorm_math

# --------------------------------------------------------------------------------------------------------------
# references (math in ``dtype``: fp32 for the reference path, fp64 in the tests' oracle)


def cos_sin(cos_sin_cache: torch.Tensor, positions: torch.Tensor, dtype=torch.float32):
    """``(cos, sin)``, each ``[T, R/2]`` in ``dtype``, of the rows at ``positions``."""
    cs = cos_sin_cache.index_select(0, positions.to(torch.long)).to(dtype)
    return cs.chunk(2, dim=-1)


def rope_math(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotary embedding of ``x [T, H, D]`` with ``cos``/``sin [T, D/2]``, in ``x``'s dtype."""
    c, s = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)


def qk_norm_rope_math(qkv, q_weight, k_weight, cos_sin_cache, positions, *, num_heads, num_kv_heads, head_dim, eps,
                      is_neox, gemma=False, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unrounded ``(q [T, Hq, D], k [T, Hkv, D])`` in ``dtype``: per-head RMSNorm, then rope."""
    t = qkv.shape[0]
    hq, hk, d = num_heads, num_kv_heads, head_dim
    x = qkv.to(dtype)
    qh = x[:, : hq * d].reshape(t, hq, d)
    kh = x[:, hq * d: (hq + hk) * d].reshape(t, hk, d)
    c, s = cos_sin(cos_sin_cache, positions, dtype)
    qn = rmsnorm_math(qh, q_weight, eps, gemma)
    kn = rmsnorm_math(kh, k_weight, eps, gemma)
    return rope_math(qn, c, s, is_neox), rope_math(kn, c, s, is_neox)


def qk_norm_rope_ref(qkv, q_weight, k_weight, cos_sin_cache, positions, *, num_heads, num_kv_heads, head_dim, eps,
                     is_neox, gemma=False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place reference: new ``(q [T, Hq*D], k [T, Hkv*D])`` in ``qkv``'s dtype (fp32 math)."""
    qo, ko = qk_norm_rope_math(qkv, q_weight, k_weight, cos_sin_cache, positions, num_heads=num_heads,
                               num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps, is_neox=is_neox, gemma=gemma)
    t = qkv.shape[0]
    return qo.reshape(t, -1).to(qkv.dtype), ko.reshape(t, -1).to(qkv.dtype)


def cache_quant(x: torch.Tensor, kv_scale: torch.Tensor) -> torch.Tensor:
    """FP8 e4m3 cache value of ``x``: ``clamp(x * (1 / kv_scale), -448, 448)`` (fp32 math, RNE, NaN kept)."""
    inv = 1.0 / kv_scale.float().reshape(())
    return torch.clamp(x.float() * inv, -_quant.FP8_MAX, _quant.FP8_MAX).to(_quant.FP8_DTYPE)


def kv_cache_write_ref(k, v, key_cache, value_cache, slot_mapping, kv_scale=None) -> None:
    """Write ``k``/``v [T, Hkv, D]`` into the paged caches at ``slot_mapping`` (-1 skipped), in place."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].to(torch.long)
    bs = key_cache.shape[1]
    blk, off = slots // bs, slots % bs
    kk, vv = k[valid], v[valid]
    if key_cache.dtype == _quant.FP8_DTYPE:
        kk, vv = cache_quant(kk, kv_scale), cache_quant(vv, kv_scale)
    key_cache[blk, off] = kk.to(key_cache.dtype)
    value_cache[blk, off] = vv.to(value_cache.dtype)


def rope_kv_cache_write_ref(q_, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, *, is_neox,
                            kv_scale=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: new roped ``(q, k)`` (fp32 math, rounded to their dtype); the caches are updated in place from the
    rounded k."""
    c, s = cos_sin(cos_sin_cache, positions)
    qo = rope_math(q_.float(), c, s, is_neox).to(q_.dtype)
    ko = rope_math(k.float(), c, s, is_neox).to(k.dtype)
    kv_cache_write_ref(ko, v, key_cache, value_cache, slot_mapping, kv_scale)
    return qo, ko


# --------------------------------------------------------------------------------------------------------------
# custom ops


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TPFUSE_TRITON_CPU") == "1"


# The ops' bodies are plain functions registered as the custom ops; the public functions call them directly in
# eager mode (no custom-op dispatch cost) and through the custom ops while Dynamo traces.


def _qk_norm_rope_impl(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       cos_sin_cache: torch.Tensor, positions: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_dim: int, eps: float, is_neox: bool, gemma: bool) -> None:
    if not _use_triton(qkv):
        qo, ko = qk_norm_rope_ref(qkv, q_weight, k_weight, cos_sin_cache, positions, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps, is_neox=is_neox, gemma=gemma)
        qkv[:, : num_heads * head_dim].copy_(qo)
        qkv[:, num_heads * head_dim: (num_heads + num_kv_heads) * head_dim].copy_(ko)
        return
    from .kernels.rope import launch_qk_norm_rope

    launch_qk_norm_rope(qkv, q_weight, k_weight, cos_sin_cache, positions, num_heads, num_kv_heads, head_dim, eps,
                        is_neox, gemma)


_qk_norm_rope_op = torch.library.custom_op("tpfuse::qk_norm_rope_", _qk_norm_rope_impl, mutates_args=("qkv",))


@_qk_norm_rope_op.register_fake
def _(qkv, q_weight, k_weight, cos_sin_cache, positions, num_heads, num_kv_heads, head_dim, eps, is_neox, gemma):
    return None


def _rope_kv_cache_write_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, is_neox: bool, kv_scale: Optional[torch.Tensor]) -> None:
    if not _use_triton(q):
        qo, ko = rope_kv_cache_write_ref(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping,
                                         is_neox=is_neox, kv_scale=kv_scale)
        q.copy_(qo)
        k.copy_(ko)
        return
    from .kernels.rope import launch_rope_kv_cache_write

    launch_rope_kv_cache_write(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, is_neox,
                               kv_scale)


_rope_kv_cache_write_op = torch.library.custom_op("tpfuse::rope_kv_cache_write_", _rope_kv_cache_write_impl,
                                                  mutates_args=("q", "k", "key_cache", "value_cache"))


@_rope_kv_cache_write_op.register_fake
def _(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, is_neox, kv_scale):
    return None


# --------------------------------------------------------------------------------------------------------------
# public functions


def _check_rope(cos_sin_cache, positions, head_dim, t, device):
    if (head_dim < 16 or head_dim & (head_dim - 1) or cos_sin_cache.dim() != 2
            or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.stride(1) != 1 or positions.dim() != 1
            or positions.shape[0] != t or (positions.dtype is not torch.int64 and positions.dtype is not torch.int32)
            or cos_sin_cache.device != device or positions.device != device):
        _rope_error(cos_sin_cache, positions, head_dim, t, device)


def _rope_error(cos_sin_cache, positions, head_dim, t, device):
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise TPFuseInputError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise TPFuseInputError(f"cos_sin_cache must be [max_pos, head_dim={head_dim}] (full rotary only), "
                               f"got {tuple(cos_sin_cache.shape)}")
    if cos_sin_cache.stride(1) != 1:
        raise TPFuseInputError("cos_sin_cache needs a unit column stride")
    if positions.shape != (t,) or positions.dtype not in (torch.int64, torch.int32):
        raise TPFuseInputError(f"positions must be [{t}] int64/int32, got {tuple(positions.shape)} {positions.dtype}")
    for name, x in (("cos_sin_cache", cos_sin_cache), ("positions", positions)):
        if x.device != device:
            raise TPFuseInputError(f"{name} is on {x.device}, expected {device}")


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos_sin_cache: torch.Tensor,
                 positions: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, eps: float = 1e-6,
                 is_neox: bool = True, gemma: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then rotary embedding, **in place** in ``qkv``; returns the views
    ``(q [T, Hq*D], k [T, Hkv*D])`` of the updated ``qkv``. See the module docstring for shapes and the contract."""
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise TPFuseInputError(f"qkv must be [T, (num_heads + 2 * num_kv_heads) * head_dim = "
                               f"{(num_heads + 2 * num_kv_heads) * head_dim}], got {tuple(qkv.shape)}")
    if qkv.stride(1) != 1:
        raise TPFuseInputError("qkv needs a unit column stride")
    device = qkv.device
    _check_rope(cos_sin_cache, positions, head_dim, qkv.shape[0], device)
    if (q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,) or not q_weight.is_contiguous()
            or not k_weight.is_contiguous() or q_weight.device != device or k_weight.device != device):
        for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
            if w.shape != (head_dim,) or not w.is_contiguous() or w.device != device:
                raise TPFuseInputError(f"{name} must be a contiguous [{head_dim}] tensor on {device}")
    (_qk_norm_rope_impl if not torch.compiler.is_compiling() else _qk_norm_rope_op)(
        qkv, q_weight, k_weight, cos_sin_cache, positions, num_heads, num_kv_heads, head_dim, float(eps),
        bool(is_neox), bool(gemma))
    qd, kd = num_heads * head_dim, num_kv_heads * head_dim
    return qkv[:, :qd], qkv[:, qd: qd + kd]


def rope_kv_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, is_neox: bool = True,
                        kv_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE on ``q``/``k`` **in place**, then the roped k and v into the paged caches at ``slot_mapping``; returns
    ``(q, k)`` (the same tensors). See the module docstring for shapes and the contract."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise TPFuseInputError(f"q [T, Hq, D], k and v [T, Hkv, D] expected, got {tuple(q.shape)}, "
                               f"{tuple(k.shape)}, {tuple(v.shape)}")
    t, _, d = q.shape
    hkv = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise TPFuseInputError("q, k and v need a unit stride along head_dim")
    device = q.device
    _check_rope(cos_sin_cache, positions, d, t, device)
    if (key_cache.dim() != 4 or key_cache.shape[2:] != (hkv, d) or key_cache.stride(3) != 1
            or key_cache.device != device or value_cache.dim() != 4 or value_cache.shape[2:] != (hkv, d)
            or value_cache.stride(3) != 1 or value_cache.device != device):
        for name, c in (("key_cache", key_cache), ("value_cache", value_cache)):
            if c.dim() != 4 or c.shape[2:] != (hkv, d) or c.stride(3) != 1 or c.device != device:
                raise TPFuseInputError(f"{name} must be [num_blocks, block_size, {hkv}, {d}] (unit last stride) "
                                       f"on {device}, got {tuple(c.shape)}")
    if key_cache.shape != value_cache.shape or key_cache.dtype != value_cache.dtype:
        raise TPFuseInputError("key_cache and value_cache must have the same shape and dtype")
    if (slot_mapping.dim() != 1 or slot_mapping.shape[0] != t
            or (slot_mapping.dtype is not torch.int64 and slot_mapping.dtype is not torch.int32)):
        raise TPFuseInputError(f"slot_mapping must be [{t}] int64/int32")
    if key_cache.dtype == _quant.FP8_DTYPE:
        if kv_scale is None or kv_scale.numel() != 1 or kv_scale.dtype != torch.float32:
            raise TPFuseInputError("an FP8 KV cache needs kv_scale: an fp32 tensor of one element")
    elif key_cache.element_size() == 1:
        raise TPFuseInputError(f"unsupported cache dtype {key_cache.dtype} (bf16/fp16/fp32 or float8_e4m3fn)")
    (_rope_kv_cache_write_impl if not torch.compiler.is_compiling() else _rope_kv_cache_write_op)(
        q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, bool(is_neox), kv_scale)
    return q, k
