"""Fused per-head RMSNorm + rotary embedding, and RoPE + paged KV-cache write, in Triton.

Contracts (plain-torch references in :mod:`tpfuse.rope`): all math in fp32 registers, each head's vector is loaded
once and stored once.

* ``qk_norm_rope``: for each q and k head ``y = x * rsqrt(mean(x^2) + eps) * w`` (``w = weight`` or ``weight + 1``
  for Gemma), then ``rope(y)`` with ``cos, sin = cache[pos, :rot/2], cache[pos, rot/2:]``; the result is rounded
  once to qkv's dtype and written in place (v is never touched).
* ``rope_kv_cache_write``: ``q, k = rope(q), rope(k)`` rounded to their dtype and written in place; then for tokens
  whose slot is >= 0 the *rounded* k and v are written into the paged caches (as the unfused rope-then-cache-write
  sequence would), quantized ``clamp(x * (1 / scale), -448, 448)`` -> e4m3 for an FP8 cache.

Rotary styles: NeoX pairs element ``i`` with ``i + D/2``; GPT-J pairs ``2i`` with ``2i + 1``. Both are loaded with
contiguous (vectorisable) accesses: NeoX as two half-head tiles, GPT-J as one full tile split in registers.

Grid: ``(tokens, head blocks)``; a program handles ``BLOCK_H`` heads of one token (so the cos/sin row and the
weights are read once per program). The launcher shrinks ``BLOCK_H`` when there are few tokens, so small batches
still fill the GPU, and grows it at large token counts so each program moves a few KiB with 16-byte accesses.
"""

import triton
import triton.language as tl

from ..quant import next_pow2
from . import pdl
from .quant_epilogue import cast_for_store, fp8_cast


@triton.jit
def _load_pair(ptrs, mask, BH: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """``(a, b)`` fp32 ``[BH, HALF]``: the rotation partners of each head whose first element ``ptrs`` ([BH, 1])
    points at. NeoX: halves; GPT-J: even / odd elements (one contiguous load, split in registers)."""
    if IS_NEOX:
        d = tl.arange(0, HALF)[None, :]
        m = mask & (d < HALF)
        a = tl.load(ptrs + d, mask=m, other=0.0).to(tl.float32)
        b = tl.load(ptrs + HALF + d, mask=m, other=0.0).to(tl.float32)
    else:
        d = tl.arange(0, 2 * HALF)[None, :]
        m = mask & (d < 2 * HALF)
        x = tl.load(ptrs + d, mask=m, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(x, (BH, HALF, 2)))
    return a, b


@triton.jit
def _store_pair(ptrs, mask, a, b, BH: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """Store ``(a, b)`` (already in the destination dtype) at the positions :func:`_load_pair` read them from."""
    if IS_NEOX:
        d = tl.arange(0, HALF)[None, :]
        m = mask & (d < HALF)
        tl.store(ptrs + d, a, mask=m)
        tl.store(ptrs + HALF + d, b, mask=m)
    else:
        d = tl.arange(0, 2 * HALF)[None, :]
        m = mask & (d < 2 * HALF)
        tl.store(ptrs + d, tl.reshape(tl.join(a, b), (BH, 2 * HALF)), mask=m)


@triton.jit
def _cos_sin(cs_ptr, cs_stride, pos_ptr, tok, HALF: tl.constexpr):
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    row = cs_ptr + pos * cs_stride
    c = tl.load(row + d).to(tl.float32)
    s = tl.load(row + HALF + d).to(tl.float32)
    return c, s


@triton.jit
def _rotate(a, b, c, s):
    return a * c - b * s, b * c + a * s


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, qkv_stride, qw_ptr, kw_ptr, cs_ptr, cs_stride, pos_ptr,
                         n_q_heads, n_qk_heads, eps,
                         HALF: tl.constexpr, BH: tl.constexpr, IS_NEOX: tl.constexpr, GEMMA: tl.constexpr,
                         PDL: tl.constexpr):
    pdl.enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    heads = hb * BH + tl.arange(0, BH)[:, None]  # [BH, 1]
    hmask = heads < n_qk_heads
    ptrs = qkv_ptr + tok * qkv_stride + heads.to(tl.int64) * (2 * HALF)
    a, b = _load_pair(ptrs, hmask, BH, HALF, IS_NEOX)
    c, s = _cos_sin(cs_ptr, cs_stride, pos_ptr, tok, HALF)
    wmask = tl.full((1, 1), 1, tl.int1)
    qwa, qwb = _load_pair(qw_ptr + tl.zeros((1, 1), tl.int64), wmask, 1, HALF, IS_NEOX)
    kwa, kwb = _load_pair(kw_ptr + tl.zeros((1, 1), tl.int64), wmask, 1, HALF, IS_NEOX)
    is_q = heads < n_q_heads
    wa = tl.where(is_q, qwa, kwa)
    wb = tl.where(is_q, qwb, kwb)
    if GEMMA:
        wa = wa + 1.0
        wb = wb + 1.0
    ms = tl.sum(a * a + b * b, axis=1) / (2 * HALF)
    rstd = tl.math.rsqrt(ms + eps)[:, None]
    a = (a * rstd) * wa
    b = (b * rstd) * wb
    ra, rb = _rotate(a, b, c, s)
    dt = qkv_ptr.dtype.element_ty
    _store_pair(ptrs, hmask, cast_for_store(ra, dt), cast_for_store(rb, dt), BH, HALF, IS_NEOX)


@triton.jit
def _rope_q_block(q_ptr, q_s0, q_s1, tok, hb, n_q_heads, c, s,
                  HALF: tl.constexpr, BH: tl.constexpr, IS_NEOX: tl.constexpr):
    heads = hb * BH + tl.arange(0, BH)[:, None]
    hmask = heads < n_q_heads
    ptrs = q_ptr + tok * q_s0 + heads.to(tl.int64) * q_s1
    a, b = _load_pair(ptrs, hmask, BH, HALF, IS_NEOX)
    ra, rb = _rotate(a, b, c, s)
    _store_pair(ptrs, hmask, cast_for_store(ra, q_ptr.dtype.element_ty), cast_for_store(rb, q_ptr.dtype.element_ty),
                BH, HALF, IS_NEOX)


@triton.jit
def _rope_k_block_cache(k_ptr, k_s0, k_s1, v_ptr, v_s0, v_s1, kc_ptr, kc_sb, kc_so, kc_sh,
                        vc_ptr, vc_sb, vc_so, vc_sh, slot_ptr, scale_ptr, tok, hb, n_kv_heads, block_size, c, s,
                        HALF: tl.constexpr, BH: tl.constexpr, IS_NEOX: tl.constexpr, CACHE_FP8: tl.constexpr):
    heads = hb * BH + tl.arange(0, BH)[:, None]
    hmask = heads < n_kv_heads
    h64 = heads.to(tl.int64)
    ptrs = k_ptr + tok * k_s0 + h64 * k_s1
    a, b = _load_pair(ptrs, hmask, BH, HALF, IS_NEOX)
    ra, rb = _rotate(a, b, c, s)
    ka = cast_for_store(ra, k_ptr.dtype.element_ty)
    kb = cast_for_store(rb, k_ptr.dtype.element_ty)
    _store_pair(ptrs, hmask, ka, kb, BH, HALF, IS_NEOX)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        va, vb = _load_pair(v_ptr + tok * v_s0 + h64 * v_s1, hmask, BH, HALF, IS_NEOX)
        kc = kc_ptr + blk * kc_sb + off * kc_so + h64 * kc_sh
        vc = vc_ptr + blk * vc_sb + off * vc_so + h64 * vc_sh
        if CACHE_FP8:
            inv = tl.math.div_rn(1.0, tl.load(scale_ptr).to(tl.float32))
            _store_pair(kc, hmask, fp8_cast(ka.to(tl.float32) * inv), fp8_cast(kb.to(tl.float32) * inv),
                        BH, HALF, IS_NEOX)
            _store_pair(vc, hmask, fp8_cast(va * inv), fp8_cast(vb * inv), BH, HALF, IS_NEOX)
        else:
            _store_pair(kc, hmask, cast_for_store(ka.to(tl.float32), kc_ptr.dtype.element_ty),
                        cast_for_store(kb.to(tl.float32), kc_ptr.dtype.element_ty), BH, HALF, IS_NEOX)
            _store_pair(vc, hmask, cast_for_store(va, vc_ptr.dtype.element_ty),
                        cast_for_store(vb, vc_ptr.dtype.element_ty), BH, HALF, IS_NEOX)


@triton.jit
def _rope_kv_cache_kernel(q_ptr, q_s0, q_s1, k_ptr, k_s0, k_s1, v_ptr, v_s0, v_s1, pos_ptr, cs_ptr, cs_stride,
                          kc_ptr, kc_sb, kc_so, kc_sh, vc_ptr, vc_sb, vc_so, vc_sh, slot_ptr, scale_ptr,
                          n_q_heads, n_kv_heads, n_q_blocks, block_size,
                          HALF: tl.constexpr, BH: tl.constexpr, IS_NEOX: tl.constexpr, CACHE_FP8: tl.constexpr,
                          PDL: tl.constexpr):
    pdl.enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    c, s = _cos_sin(cs_ptr, cs_stride, pos_ptr, tok, HALF)
    if hb < n_q_blocks:
        _rope_q_block(q_ptr, q_s0, q_s1, tok, hb, n_q_heads, c, s, HALF, BH, IS_NEOX)
    else:
        _rope_k_block_cache(k_ptr, k_s0, k_s1, v_ptr, v_s0, v_s1, kc_ptr, kc_sb, kc_so, kc_sh,
                            vc_ptr, vc_sb, vc_so, vc_sh, slot_ptr, scale_ptr, tok, hb - n_q_blocks, n_kv_heads,
                            block_size, c, s, HALF, BH, IS_NEOX, CACHE_FP8)


# --------------------------------------------------------------------------------------------------------------
# launchers

from . import fast_launch  # noqa: E402  (below the kernels: their source lines stay where they were)

SM_COUNT_GUESS = 132  # H100 / H200; only steers the block-size heuristic


def pick_block(tokens: int, heads: int, head_dim: int, block_h=None, num_warps=None):
    """``(BLOCK_H, num_warps)``: ~2K elements per program at large token counts (16-byte accesses, 2-4 warps),
    fewer heads per program while the grid would have fewer than ~4 programs per SM."""
    if block_h is None and num_warps is None:
        key = (tokens, heads, head_dim)
        hit = _PICKED.get(key)
        if hit is None:
            if len(_PICKED) >= 4096:
                _PICKED.clear()
            hit = _PICKED[key] = _pick_block(tokens, heads, head_dim, None, None)
        return hit
    return _pick_block(tokens, heads, head_dim, block_h, num_warps)


_PICKED: dict = {}  # (tokens, heads, head_dim) -> pick_block's default choice (the eager path asks every call)


def _pick_block(tokens, heads, head_dim, block_h, num_warps):
    if block_h is None:
        block_h = min(next_pow2(heads), max(1, 2048 // head_dim))
        while block_h > 1 and tokens * -(-heads // block_h) < 4 * SM_COUNT_GUESS:
            block_h //= 2
    if num_warps is None:
        num_warps = max(1, min(8, block_h * head_dim // 512))
    return block_h, num_warps


def launch_qk_norm_rope(qkv, q_weight, k_weight, cos_sin_cache, positions, num_heads, num_kv_heads, head_dim, eps,
                        is_neox, gemma, block_h=None, num_warps=None):
    """In place on ``qkv [T, (Hq + 2 Hkv) * D]`` (unit column stride, any row stride): q and k heads normed and
    roped, v untouched."""
    t = qkv.shape[0]
    if t == 0:
        return
    heads = num_heads + num_kv_heads
    bh, nw = pick_block(t, heads, head_dim, block_h, num_warps)
    on = pdl.wanted(qkv)
    fast_launch.launch(
        _qk_norm_rope_kernel, (t, -(-heads // bh)),
        (qkv, qkv.stride(0), q_weight, k_weight, cos_sin_cache, cos_sin_cache.stride(0), positions,
         num_heads, heads, float(eps)),
        {"HALF": head_dim // 2, "BH": bh, "IS_NEOX": bool(is_neox), "GEMMA": bool(gemma), "PDL": on}, nw, pdl=on)


def launch_rope_kv_cache_write(q, k, v, positions, cos_sin_cache, key_cache, value_cache, slot_mapping, is_neox,
                               kv_scale, block_h=None, num_warps=None):
    """In place on ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` (unit last stride); ``k`` (roped) and ``v`` into the
    paged caches ``[num_blocks, block_size, Hkv, D]`` at ``slot_mapping`` (-1 skips the token)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if t == 0:
        return
    bh, nw = pick_block(t, hq + hkv, d, block_h, num_warps)
    nqb, nkb = -(-hq // bh), -(-hkv // bh)
    cache_fp8 = key_cache.element_size() == 1
    scale = kv_scale if kv_scale is not None else positions  # unread unless CACHE_FP8
    qs, ks, vs, kcs, vcs = q.stride(), k.stride(), v.stride(), key_cache.stride(), value_cache.stride()
    on = pdl.wanted(q)
    fast_launch.launch(
        _rope_kv_cache_kernel, (t, nqb + nkb),
        (q, qs[0], qs[1], k, ks[0], ks[1], v, vs[0], vs[1],
         positions, cos_sin_cache, cos_sin_cache.stride(0),
         key_cache, kcs[0], kcs[1], kcs[2],
         value_cache, vcs[0], vcs[1], vcs[2],
         slot_mapping, scale, hq, hkv, nqb, key_cache.shape[1]),
        {"HALF": d // 2, "BH": bh, "IS_NEOX": bool(is_neox), "CACHE_FP8": cache_fp8, "PDL": on}, nw, pdl=on)
