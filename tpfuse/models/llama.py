"""A small Llama-style decoder stack with tensor parallelism through :class:`tpfuse.TPCommunicator`.

Two forward functions share one set of random weights (fixed seed):

* :func:`forward_unsharded` - one process, the whole model (the demo's oracle, run in fp64);
* :func:`forward_tp` - this rank's shards, with the communicator choosing per call between

  ============================  =================================================================================
  ``plan(T).mode``              data flow per layer (``*`` = collective through the communicator)
  ============================  =================================================================================
  ``allreduce``                 residual replicated ``[T, H]``; qkv/gate-up GEMMs local on column shards;
                                o/down GEMMs give partial sums -> ``* fused_add_rmsnorm`` (AR + add + norm)
  ``sequence_parallel``         residual sharded ``[Ts, H]``; ``* all_gather_matmul`` for qkv and gate-up;
                                o/down partial sums -> ``* reduce_scatter_rmsnorm`` (RS + add + norm)
  ============================  =================================================================================

Sharding (TP ranks, ``r`` = this rank): q heads ``[r*Hq/TP, (r+1)*Hq/TP)``, kv heads likewise; o_proj and
down_proj are row shards ``w_shard_k``; gate/up are column shards ``w_shard_n``. Embedding, norms and lm_head are
replicated. Heads must divide by TP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import rmsnorm_math
from ..sharding import shard_range


@dataclass(kw_only=True)
class TinyLlamaConfig:
    """Shape of the stack (defaults: small enough for CPU, large enough to cross the SP threshold)."""

    vocab_size: int = 512
    """Vocabulary rows of the embedding and lm_head."""
    hidden_size: int = 256
    """Model width H."""
    num_heads: int = 8
    """Query heads (divisible by TP)."""
    num_kv_heads: int = 4
    """Key/value heads (GQA; divisible by TP)."""
    head_dim: int = 32
    """Per-head width."""
    intermediate_size: int = 512
    """MLP width I (divisible by TP)."""
    num_layers: int = 2
    """Decoder layers."""
    eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""


def init_weights(cfg: TinyLlamaConfig, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Full (unsharded) fp32 weights, identical on every rank for the same seed (nn.Linear layout [out, in])."""
    g = torch.Generator().manual_seed(seed)
    h, d = cfg.hidden_size, cfg.head_dim

    def lin(o, i):
        return torch.randn(o, i, generator=g) / i ** 0.5

    w = {"embed": torch.randn(cfg.vocab_size, h, generator=g), "final_norm": 1 + 0.1 * torch.randn(h, generator=g),
         "lm_head": lin(cfg.vocab_size, h)}
    for li in range(cfg.num_layers):
        p = f"l{li}."
        w[p + "in_norm"] = 1 + 0.1 * torch.randn(h, generator=g)
        w[p + "post_norm"] = 1 + 0.1 * torch.randn(h, generator=g)
        w[p + "q"], w[p + "k"], w[p + "v"] = lin(cfg.num_heads * d, h), lin(cfg.num_kv_heads * d, h), lin(cfg.num_kv_heads * d, h)
        w[p + "o"] = lin(h, cfg.num_heads * d)
        w[p + "gate"], w[p + "up"] = lin(cfg.intermediate_size, h), lin(cfg.intermediate_size, h)
        w[p + "down"] = lin(h, cfg.intermediate_size)
    return w


def shard_weights(w: Dict[str, torch.Tensor], cfg: TinyLlamaConfig, rank: int, tp: int, dtype, device):
    """This rank's weights: fused column shards ``qkv`` and ``gate_up`` (``w_shard_n``), row shards ``o`` and
    ``down`` (``w_shard_k``), replicated norms, embedding and lm_head."""
    for name, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise ValueError(f"{name}={n} is not divisible by TP={tp}")
    d = cfg.head_dim
    hq, hk, inter = cfg.num_heads // tp, cfg.num_kv_heads // tp, cfg.intermediate_size // tp

    def rows(t, n):
        return t[rank * n:(rank + 1) * n]

    out = {k: w[k] for k in ("embed", "final_norm", "lm_head")}
    for li in range(cfg.num_layers):
        p = f"l{li}."
        out[p + "in_norm"], out[p + "post_norm"] = w[p + "in_norm"], w[p + "post_norm"]
        out[p + "qkv"] = torch.cat([rows(w[p + "q"], hq * d), rows(w[p + "k"], hk * d), rows(w[p + "v"], hk * d)])
        out[p + "o"] = w[p + "o"][:, rank * hq * d:(rank + 1) * hq * d]
        out[p + "gate_up"] = torch.cat([rows(w[p + "gate"], inter), rows(w[p + "up"], inter)])
        out[p + "down"] = w[p + "down"][:, rank * inter:(rank + 1) * inter]
    return {k: v.to(device=device, dtype=dtype).contiguous() for k, v in out.items()}


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX-style rotary embedding of ``x [T, heads, D]``."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    ang = positions.to(torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(qkv: torch.Tensor, hq: int, hk: int, cfg: TinyLlamaConfig) -> torch.Tensor:
    t, d = qkv.shape[0], cfg.head_dim
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    pos = torch.arange(t, device=qkv.device)
    q = _rope(q.reshape(t, hq, d), pos, cfg.rope_theta).transpose(0, 1)
    k = _rope(k.reshape(t, hk, d), pos, cfg.rope_theta).transpose(0, 1).repeat_interleave(hq // hk, dim=0)
    v = v.reshape(t, hk, d).transpose(0, 1).repeat_interleave(hq // hk, dim=0)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(0, 1).reshape(t, hq * d)


def forward_unsharded(w: Dict[str, torch.Tensor], ids: torch.Tensor, cfg: TinyLlamaConfig) -> torch.Tensor:
    """Logits ``[T, vocab]`` of the whole model in ``w``'s dtype (the oracle: pass fp64 weights)."""
    h = w["embed"][ids]
    residual = h
    x = rmsnorm_math(h, w["l0.in_norm"], cfg.eps)
    for li in range(cfg.num_layers):
        p = f"l{li}."
        qkv = torch.cat([x @ w[p + "q"].t(), x @ w[p + "k"].t(), x @ w[p + "v"].t()], dim=-1)
        residual = residual + _attention(qkv, cfg.num_heads, cfg.num_kv_heads, cfg) @ w[p + "o"].t()
        x = rmsnorm_math(residual, w[p + "post_norm"], cfg.eps)
        residual = residual + (F.silu(x @ w[p + "gate"].t()) * (x @ w[p + "up"].t())) @ w[p + "down"].t()
        nxt = w[f"l{li + 1}.in_norm"] if li + 1 < cfg.num_layers else w["final_norm"]
        x = rmsnorm_math(residual, nxt, cfg.eps)
    return x @ w["lm_head"].t()


def forward_tp(comm, ws: Dict[str, torch.Tensor], ids: torch.Tensor, cfg: TinyLlamaConfig):
    """Logits ``[T, vocab]`` (replicated) of the TP model; returns ``(logits, paths)`` where ``paths`` maps each
    communicator op used to the path that ran it."""
    tp, t = comm.tp, ids.shape[0]
    hq, hk = cfg.num_heads // tp, cfg.num_kv_heads // tp
    sp = comm.plan(t).mode == "sequence_parallel"
    h = ws["embed"][ids]
    if sp:
        start, end = shard_range(t, tp, comm.rank)
        h = h[start:end].contiguous()
    x, residual = ops.add_rmsnorm(h, None, ws["l0.in_norm"], cfg.eps)  # local: the embedding is replicated
    used = []
    for li in range(cfg.num_layers):
        p = f"l{li}."
        if sp:
            qkv = comm.all_gather_matmul(x, ws[p + "qkv"], num_tokens=t)
            x, residual = comm.reduce_scatter_rmsnorm(_attention(qkv, hq, hk, cfg) @ ws[p + "o"].t(), residual,
                                                      ws[p + "post_norm"], cfg.eps)
            gu = comm.all_gather_matmul(x, ws[p + "gate_up"], num_tokens=t)
        else:
            qkv = x @ ws[p + "qkv"].t()
            x, residual = comm.fused_add_rmsnorm(_attention(qkv, hq, hk, cfg) @ ws[p + "o"].t(), residual,
                                                 ws[p + "post_norm"], cfg.eps)
            gu = x @ ws[p + "gate_up"].t()
        mlp = ops.silu_mul(gu) @ ws[p + "down"].t()
        nxt = ws[f"l{li + 1}.in_norm"] if li + 1 < cfg.num_layers else ws["final_norm"]
        if sp:
            x, residual = comm.reduce_scatter_rmsnorm(mlp, residual, nxt, cfg.eps)
        else:
            x, residual = comm.fused_add_rmsnorm(mlp, residual, nxt, cfg.eps)
    if sp:
        x = comm.all_gather(x, num_tokens=t)
        used = ["all_gather_matmul", "reduce_scatter_rmsnorm", "all_gather"]
    else:
        used = ["fused_add_rmsnorm"]
    return x @ ws["lm_head"].t(), {op: comm.last_path[op] for op in used}
