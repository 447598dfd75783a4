"""The tpfuse decoder layer that replaces a Hugging Face decoder layer, its attention, and the KV cache.

Data flow per layer (``*`` = collective through the :class:`~tpfuse.TPCommunicator`; ``x`` is the normed input,
``residual`` the residual stream, both ``[T, H]`` in all-reduce mode and ``[Ts, H]`` token shards in
sequence-parallel mode)::

    allreduce:          qkv = x @ W_qkv_shard.T                  sequence_parallel:  qkv = *all_gather_matmul(x, W_qkv_shard)
    attention on this rank's heads (QK-norm + RoPE, KV cache, SDPA) -> partial = attn @ W_o_shard.T
    x, residual = *fused_add_rmsnorm(partial, residual, post_norm)      | *reduce_scatter_rmsnorm(...)
    gu = x @ W_gate_up_shard.T                                          | *all_gather_matmul(x, W_gate_up_shard)
    partial = silu_mul(gu) @ W_down_shard.T
    x, residual = *fused_add_rmsnorm(partial, residual, NEXT norm)      | *reduce_scatter_rmsnorm(...)

``NEXT norm`` is the next layer's ``input_layernorm`` (the model's final norm after the last layer), so every
all-reduce of the model is fused with the residual add and the RMSNorm that follows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .plan import TPPlan


def get_path(root: nn.Module, path: str):
    """``root.a.b`` for ``path="a.b"`` (``nn.ModuleList`` indices allowed)."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def norm_eps(norm: nn.Module) -> float:
    """Epsilon of a Hugging Face RMSNorm module (``variance_epsilon``, or ``eps`` for other spellings)."""
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise ValueError(f"{type(norm).__name__} has no variance_epsilon / eps attribute: is it an RMSNorm?")


# ----------------------------------------------------------------------------------------------------------------
# KV cache


class TPKVCache:
    """Per-rank KV cache: for each layer, this rank's kv heads as ``k, v: [S, kv_heads / TP, head_dim]``.

    Grows by concatenation (simple, not CUDA-graph friendly); one sequence (batch 1). Returned by the parallelized
    model's forward as ``out.past_key_values`` and passed back as ``past_key_values=`` for the next step."""

    def __init__(self):
        self.keys: List[Optional[torch.Tensor]] = []
        self.values: List[Optional[torch.Tensor]] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already cached (what the next step's positions start from)."""
        if layer_idx >= len(self.keys) or self.keys[layer_idx] is None:
            return 0
        return self.keys[layer_idx].shape[0]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v [T, kv, D]`` to layer ``layer_idx``; return the whole cached ``k, v [S, kv, D]``."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k])
            v = torch.cat([self.values[layer_idx], v])
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


# ----------------------------------------------------------------------------------------------------------------
# QK-norm + RoPE: one function that picks the implementation


def _fused_qk_norm_rope():
    """Issue 3's fused local stage when it exists: ``tpfuse.rope.qk_norm_rope``, else ``tpfuse.ops.qk_norm_rope``,
    else ``None`` (torch ops)."""
    try:
        from .. import rope  # type: ignore[attr-defined]
    except ImportError:
        rope = None
    fn = getattr(rope, "qk_norm_rope", None) if rope is not None else None
    return fn if fn is not None else getattr(ops, "qk_norm_rope", None)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _head_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Hugging Face's RMSNorm rounding order: fp32 statistics, cast back, then multiply by the weight
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(x.dtype)).to(x.dtype)


def qk_norm_rope(qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                 sin: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                 eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``qkv [T, (hq + 2 hk) D]``, apply per-head RMSNorm to q and k (when weights are given) and NeoX-style
    RoPE; returns ``q [T, hq, D], k [T, hk, D], v [T, hk, D]``.

    ``cos, sin``: ``[T, D]`` as the model's rotary module returns them (each half duplicated, attention scaling
    already applied). Uses the fused op (:func:`_fused_qk_norm_rope`; issue 3's signature: ``qkv, q_weight,
    k_weight, cos_sin_cache, positions, *, num_heads, num_kv_heads, head_dim, eps, is_neox``, in place on the q and
    k columns of ``qkv``; cache rows ``[cos[:D/2] | sin[:D/2]]`` indexed by ``positions``) when it exists and
    there is a QK-norm; plain torch ops otherwise. The per-step cache built here has one row per token, so any
    RoPE variant the model's rotary module implements passes through unchanged."""
    t, d = qkv.shape[0], head_dim
    fused = _fused_qk_norm_rope() if (q_weight is not None and k_weight is not None) else None
    if fused is not None:
        cache = torch.cat([cos[:, : d // 2], sin[:, : d // 2]], dim=-1).float().contiguous()
        positions = torch.arange(t, device=qkv.device)
        qkv = qkv.contiguous()  # ours (a fresh GEMM output): the op rewrites its q and k columns in place
        fused(qkv, q_weight.contiguous(), k_weight.contiguous(), cache, positions, num_heads=num_heads,
              num_kv_heads=num_kv_heads, head_dim=d, eps=eps, is_neox=True)
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        return q.view(t, num_heads, d), k.view(t, num_kv_heads, d), v.view(t, num_kv_heads, d)
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k, v = q.view(t, num_heads, d), k.view(t, num_kv_heads, d), v.view(t, num_kv_heads, d)
    if q_weight is not None:
        q = _head_rmsnorm(q, q_weight, eps)
    if k_weight is not None:
        k = _head_rmsnorm(k, k_weight, eps)
    c, s = cos[:, None, :], sin[:, None, :]
    q = (q * c + _rotate_half(q) * s).to(qkv.dtype)
    k = (k * c + _rotate_half(k) * s).to(qkv.dtype)
    return q, k, v


# ----------------------------------------------------------------------------------------------------------------
# the decoder layer


@dataclass
class StepContext:
    """What every layer of one forward step shares."""

    comm: object
    num_tokens: int
    sp: bool
    cos: torch.Tensor
    sin: torch.Tensor
    cache: Optional[TPKVCache]
    mask: Optional[torch.Tensor]
    """Boolean ``[T, S]`` attention mask when a chunk follows cached tokens (``None``: plain causal)."""


def _fuse_linears(mods) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Concatenate the weights (and biases) of ``mods`` along output features into one tensor and re-point each
    module's weight/bias at its slice of it, so the fused weight costs no extra memory and loading into the
    modules' parameters (state_dict names unchanged) writes the fused weight."""
    w = torch.cat([m.weight.detach() for m in mods]).contiguous()
    has_bias = [m.bias is not None for m in mods]
    b = None
    if any(has_bias):
        b = torch.cat([m.bias.detach() if m.bias is not None else
                       torch.zeros(m.weight.shape[0], dtype=w.dtype, device=w.device) for m in mods]).contiguous()
    off = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[off:off + n], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(b[off:off + n], requires_grad=False)
        off += n
    return w, b


class TPDecoderLayer(nn.Module):
    """A decoder layer whose submodules are the original (now sharded) Hugging Face modules, registered under
    their original names (so ``state_dict`` keys are unchanged), run with the data flow of the module docstring.

    Called as ``layer(x, residual, next_norm_weight, next_eps, ctx) -> (x, residual)``."""

    def __init__(self, layer: nn.Module, plan: TPPlan, layer_idx: int, *, num_heads: int, num_kv_heads: int,
                 head_dim: int):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.plan, self.layer_idx = plan, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.input_norm = get_path(self, plan.input_norm)
        self.post_norm = get_path(self, plan.post_attention_norm)
        self.post_eps = norm_eps(self.post_norm)
        self._qkv_mods = [get_path(self, p) for p in plan.qkv]
        self._gate_up_mods = [get_path(self, p) for p in plan.gate_up]
        self._o = get_path(self, plan.o_proj)
        self._down = get_path(self, plan.down_proj)
        if plan.qk_norm is not None:
            self._q_norm, self._k_norm = (get_path(self, p) for p in plan.qk_norm)
            self.qk_eps = norm_eps(self._q_norm)
        else:
            self._q_norm = self._k_norm = None
            self.qk_eps = 0.0
        self._fused = {}
        self.refuse()

    def refuse(self) -> None:
        """(Re)build the fused qkv and gate-up weights; needed after anything replaced the parameters (``.to()``);
        :meth:`forward` does it by itself when it sees that."""
        self._fused = {"qkv": _fuse_linears(self._qkv_mods), "gate_up": _fuse_linears(self._gate_up_mods)}

    def _fused_weight(self, key: str, mods) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        w, b = self._fused[key]
        ptr = w.untyped_storage().data_ptr()
        if any(m.weight.untyped_storage().data_ptr() != ptr for m in mods):
            self.refuse()
            w, b = self._fused[key]
        return w, b

    def _attention(self, qkv: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        t, d, hq, hk = qkv.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = qk_norm_rope(qkv, num_heads=hq, num_kv_heads=hk, head_dim=d, cos=ctx.cos, sin=ctx.sin,
                               q_weight=None if self._q_norm is None else self._q_norm.weight,
                               k_weight=None if self._k_norm is None else self._k_norm.weight, eps=self.qk_eps)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        q4, k4, v4 = (z.transpose(0, 1).unsqueeze(0) for z in (q, k, v))  # [1, heads, S, D]
        if ctx.mask is None:
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=t > 1, enable_gqa=hq != hk)
        else:
            o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=ctx.mask, enable_gqa=hq != hk)
        return o[0].transpose(0, 1).reshape(t, hq * d)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, next_norm_weight: torch.Tensor, next_eps: float,
                ctx: StepContext) -> Tuple[torch.Tensor, torch.Tensor]:
        comm, t = ctx.comm, ctx.num_tokens
        reduce = comm.reduce_scatter_rmsnorm if ctx.sp else comm.fused_add_rmsnorm

        w, b = self._fused_weight("qkv", self._qkv_mods)
        qkv = comm.all_gather_matmul(x, w, num_tokens=t) if ctx.sp else F.linear(x, w)
        if b is not None:
            qkv = qkv + b
        partial = F.linear(self._attention(qkv, ctx), self._o.weight, self._o.bias)
        x, residual = reduce(partial, residual, self.post_norm.weight, self.post_eps)

        w, b = self._fused_weight("gate_up", self._gate_up_mods)
        gu = comm.all_gather_matmul(x, w, num_tokens=t) if ctx.sp else F.linear(x, w)
        if b is not None:
            gu = gu + b
        partial = F.linear(ops.silu_mul(gu), self._down.weight, self._down.bias)
        return reduce(partial, residual, next_norm_weight, next_eps)
