"""The tpfuse decoder layer that replaces a Hugging Face decoder layer: the one TP decoder of the project.

Data flow per layer (``*`` = collective through the :class:`~tpfuse.TPCommunicator`; ``x`` the normed input,
``residual`` the residual stream: ``[T, H]`` packed tokens in all-reduce mode, ``[Ts, H]`` token shards in
sequence-parallel mode)::

    all-reduce form                                  sequence-parallel form
    qkv = x @ W_qkv_shard.T                          qkv = *all_gather_matmul(x, W_qkv_shard)
    attention on this rank's heads:
        decode step:  RoPE (+ QK-norm), the KV-cache write and paged decode attention in one kernel
                      (tpfuse.attention.rope_decode_attention; KVCacheConfig.fuse_rope, the default); with
                      fuse_rope=False the RoPE + cache-write kernel, then tpfuse.attention.decode_attention;
                      with KVCacheConfig.fold_attn_combine a split attention leaves its partials and o_proj
                      combines them (tpfuse.attention_o)
        prefill:      RoPE (+ QK-norm) and the KV-cache write in one kernel, then causal SDPA per sequence
                      (over its cached prefix when it has one)
    x, residual = *fused_add_rmsnorm(attn @ W_o_shard.T, residual, post_norm)
                                                     x, residual = *matmul_reduce_scatter_rmsnorm(attn, W_o_shard, ...)
    gu = x @ W_gate_up_shard.T                       gu = *all_gather_matmul(x, W_gate_up_shard)
    x, residual = *fused_add_rmsnorm(silu_mul(gu) @ W_down_shard.T, residual, NEXT norm)
                                                     x, residual = *matmul_reduce_scatter_rmsnorm(silu_mul(gu), ...)

``NEXT norm`` is the next layer's ``input_layernorm`` (the model's final norm after the last layer), so every
reduction of the model is fused with the residual add and the RMSNorm that follows it. At TP=1, and in the
benchmarks' no-communication floor (``StepContext.local``), the reductions are the local fused add + RMSNorm.

Decode-sized GEMMs of the all-reduce form (M <= 64 tokens) run tpfuse's small-M kernel
(:mod:`tpfuse.small_gemm`) only where its tuned table says it beats ``F.linear`` for that (N, K, M bucket), and
gate-up + SiLU*mul as one fused kernel only where that beats the two ops; without a table row every GEMM is
``F.linear`` as above.

At TP = 1 with ``KVCacheConfig.fold_norms``, a step of at most 64 tokens folds each add + RMSNorm into the GEMMs
around it instead (:meth:`TPDecoderLayer._forward_folded`: o / down add the residual and write ``h * w_norm`` and
per-token sums of squares, qkv / gate-up scale their sums by each token's rstd; ``x`` is then a :class:`PendingNorm`).

Row-parallel biases (``o_proj`` / ``down_proj`` with ``bias=True``) are replicated and added to the residual before
the reduction, which is the same sum and lets the fused GEMM + reduce-scatter path run unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention_o import AttentionPartials, attn_o_gemm, attn_o_gemm_add, partials_config, \
    rope_decode_attention_partials
from ..errors import TPFuseInputError
from .. import ops
from .. import rope as tp_rope
from .. import small_gemm
from .batch import StepMeta
from .layout import TPLayout
from .prefetch import prefetch_o_proj, prefetching


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
    raise TPFuseInputError(f"{type(norm).__name__} has no variance_epsilon / eps attribute: is it an RMSNorm?")


@dataclass
class StepContext:
    """What every layer of one forward step shares."""

    comm: object
    meta: StepMeta
    cos_sin: torch.Tensor
    """[max_positions, head_dim] fp32 RoPE rows ``[cos | sin]`` (the model's rotary module, evaluated once)."""
    storage: object
    """The model's :class:`~tpfuse.parallel.kv_cache.KVStorage`, or a one-block dummy when the call has no cache."""
    local: bool
    """Reductions are local (TP=1, or the no-communication floor of the benchmarks)."""
    fold_norms: bool = False
    """The step folds each add + RMSNorm into the GEMMs around it (``KVCacheConfig.fold_norms``; decided per step by
    :func:`~tpfuse.parallel.forward.forward_core`): layers take and return a :class:`PendingNorm` as ``x``."""
    fp8_weight_only: bool = False
    """FP8 layers run this step's GEMMs weight-only, with bf16 activations
    (``KVCacheConfig.fp8_weight_only_max_tokens``; decided per step by :func:`~tpfuse.parallel.forward.forward_core`):
    every norm writes bf16."""


@dataclass
class PendingNorm:
    """``x = RMSNorm(h) * weight`` not yet computed (folded RMSNorm): the next GEMM takes ``h * weight`` and scales
    each token's sums by its rstd (:func:`tpfuse.small_gemm.small_m_gemm` with ``norm_sumsq``)."""

    h: torch.Tensor
    """``[T, H]`` the residual stream, the add done."""
    weighted: torch.Tensor
    """``[T, H]`` ``h * weight``, the next GEMM's rows."""
    sumsq: torch.Tensor
    """``[H / 32, T]`` fp32 partial sums of ``h^2`` per token."""
    weight: torch.Tensor
    eps: float

    def materialize(self) -> torch.Tensor:
        """The normed rows themselves (the final norm before the LM head)."""
        return ops.add_rmsnorm(self.h, None, self.weight, self.eps)[0]


def _fuse_linears(mods) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Concatenate the weights (and biases) of ``mods`` along output features into one tensor and re-point each
    module's weight/bias at its slice of it, so the fused weight costs no extra memory and loading into the
    modules' parameters (state_dict names unchanged) writes the fused weight."""
    w = torch.cat([m.weight.detach() for m in mods]).contiguous()
    b = None
    if any(m.bias is not None for m in mods):
        bdt = next(m.bias.dtype for m in mods if m.bias is not None)  # not w.dtype: FP8 weights, model-dtype bias
        b = torch.cat([m.bias.detach() if m.bias is not None else
                       torch.zeros(m.weight.shape[0], dtype=bdt, device=w.device) for m in mods]).contiguous()
    off = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[off:off + n], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(b[off:off + n], requires_grad=False)
        off += n
    return w, b


def link_quant(layers) -> None:
    """Set each layer's ``out_quant`` to the next layer's ``in_quant``: the quant spec of a fused norm is decided
    by the GEMM that consumes its output."""
    for i, layer in enumerate(layers):
        layer.out_quant = layers[i + 1].in_quant if i + 1 < len(layers) else None


class TPDecoderLayer(nn.Module):
    """A decoder layer whose submodules are the original (now sharded) Hugging Face modules, registered under
    their original names (so ``state_dict`` keys are unchanged), run with the data flow of the module docstring.

    Called as ``layer(x, residual, next_norm_weight, next_eps, ctx) -> (x, residual)``."""

    in_quant = None
    """Quant spec of the layer's input (the previous fused norm's output): ``None`` (bf16 layers) or the FP8 format
    of its qkv GEMM (:class:`~tpfuse.parallel.fp8_layer.FP8DecoderLayer`)."""
    out_quant = None
    """Quant spec of the layer's output: the next layer's ``in_quant`` (``None`` after the last layer: the final
    norm feeds the bf16 lm_head); set by :func:`link_quant`."""

    def __init__(self, layer: nn.Module, layout: TPLayout, layer_idx: int, *, num_heads: int, num_kv_heads: int,
                 head_dim: int):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.layout, self.layer_idx = layout, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.input_norm = get_path(self, layout.input_norm)
        self.post_norm = get_path(self, layout.post_attention_norm)
        self.post_eps = norm_eps(self.post_norm)
        self._qkv_mods = [get_path(self, p) for p in layout.qkv]
        self._gate_up_mods = [get_path(self, p) for p in layout.gate_up]
        self._o = get_path(self, layout.o_proj)
        self._down = get_path(self, layout.down_proj)
        attn = get_path(self, layout.o_proj.rsplit(".", 1)[0]) if "." in layout.o_proj else self
        self.scale = float(getattr(attn, "scaling", head_dim ** -0.5))
        if layout.qk_norm is not None:
            self._q_norm, self._k_norm = (get_path(self, p) for p in layout.qk_norm)
            self.qk_eps = norm_eps(self._q_norm)
        else:
            self._q_norm = self._k_norm = None
            self.qk_eps = 0.0
        self._fused = {}
        self.refuse()

    def refuse(self) -> None:
        """(Re)build the fused qkv and gate-up weights; needed after anything replaced the parameters (``.to()``,
        loading); :meth:`forward` does it by itself when it sees that."""
        self._fused = {"qkv": _fuse_linears(self._qkv_mods), "gate_up": _fuse_linears(self._gate_up_mods)}

    def after_load(self) -> None:
        """Called after a checkpoint was loaded into the parameters (bf16: the fused weights are those parameters'
        storage already, nothing to do)."""

    def _fused_weight(self, key: str, mods) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        w, b = self._fused[key]
        ptr = w.untyped_storage().data_ptr()
        if any(m.weight.untyped_storage().data_ptr() != ptr for m in mods):
            self.refuse()
            w, b = self._fused[key]
        return w, b

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ w.T (+ b)`` of the all-reduce form: the small-M kernel where its tuned table says it beats
        ``F.linear`` at this (N, K, M bucket) (decode batches; bias fused, rounded once), else ``F.linear`` with the
        bias added in place, as always (no table row: exactly that)."""
        if small_gemm.use_kernel(x, w):
            return small_gemm.small_m_gemm(x, w, bias=b)
        y = F.linear(x, w)
        return y if b is None else y.add_(b)

    def _column(self, x: torch.Tensor, key: str, mods, ctx: StepContext) -> torch.Tensor:
        w, b = self._fused_weight(key, mods)
        meta = ctx.meta
        if not meta.sp:
            return self._linear(x, w, b)
        y = ctx.comm.all_gather_matmul(x, w, num_tokens=meta.num_tokens)
        return y if b is None else y.add_(b)

    def _gate_up_silu(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``silu_mul(x @ W_gate_up.T + b)``: one fused small-M kernel where the table says it beats the best
        unfused GEMM + ``silu_mul`` (all-reduce form), else the two ops."""
        if not ctx.meta.sp and x.shape[0] <= small_gemm.MAX_M:  # prefill: no fused-weight check before _column's
            w, b = self._fused_weight("gate_up", self._gate_up_mods)
            if small_gemm.use_kernel(x, w, silu_mul=True):
                return small_gemm.small_m_gemm(x, w, bias=b, silu_mul=True)
        return ops.silu_mul(self._column(x, "gate_up", self._gate_up_mods, ctx))

    def _row(self, a, lin: nn.Linear, residual: torch.Tensor, norm_w: torch.Tensor, eps: float, ctx: StepContext):
        """``a``: the activations, or (o_proj) the attention's :class:`~tpfuse.attention_o.AttentionPartials`."""
        if lin.bias is not None:  # replicated: added once to the sum (see the module docstring)
            residual = residual + lin.bias
        if isinstance(a, AttentionPartials):
            partial = attn_o_gemm(a, lin.weight)
        elif ctx.meta.sp:
            return ctx.comm.matmul_reduce_scatter_rmsnorm(a, lin.weight, residual, norm_w, eps)
        else:
            partial = self._linear(a, lin.weight)
        if ctx.local:
            return ops.add_rmsnorm(partial, residual, norm_w, eps)
        return ctx.comm.fused_add_rmsnorm(partial, residual, norm_w, eps)

    def can_fold_norms(self) -> bool:
        """Whether :meth:`forward` can run this layer with the folded RMSNorm: bf16 weights and norm weights, no o /
        down bias, hidden size a multiple of 32, every GEMM dimension a multiple of 16 (the small-M kernel's)."""
        w = self._o.weight
        weights = [w, self._down.weight] + [m.weight for m in self._qkv_mods + self._gate_up_mods]
        return (all(t.dtype == torch.bfloat16 for t in weights + [self.input_norm.weight, self.post_norm.weight])
                and self._o.bias is None and self._down.bias is None and w.shape[0] % small_gemm.SUMSQ_ROWS == 0
                and all(t.shape[0] % 16 == 0 and t.shape[1] % 16 == 0 for t in weights))

    def _folded_gemm(self, key: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(weight, bias, w_scale)`` of one GEMM of the folded layer (``key``: qkv, o, gate_up, down): the bf16
        weights (no scale; o / down have no bias where the layer folds)."""
        if key in ("qkv", "gate_up"):
            return (*self._fused_weight(key, self._qkv_mods if key == "qkv" else self._gate_up_mods), None)
        return (self._o if key == "o" else self._down).weight, None, None

    @staticmethod
    def _normed_gemm(x, w: torch.Tensor, b: Optional[torch.Tensor], w_scale: Optional[torch.Tensor],
                     silu_mul: bool = False) -> torch.Tensor:
        if isinstance(x, PendingNorm):
            return small_gemm.small_m_gemm(x.weighted, w, w_scale=w_scale, bias=b, silu_mul=silu_mul,
                                           norm_sumsq=x.sumsq, norm_eps=x.eps)
        return small_gemm.small_m_gemm(x, w, w_scale=w_scale, bias=b, silu_mul=silu_mul)

    @staticmethod
    def _add_pending(a, gemm, residual: torch.Tensor, norm_w: torch.Tensor, eps: float) -> PendingNorm:
        w, _, w_scale = gemm
        if isinstance(a, AttentionPartials):  # o_proj of a bf16 layer (no scale)
            h, weighted, sumsq = attn_o_gemm_add(a, w, residual, norm_w)
        else:
            h, weighted, sumsq = small_gemm.small_m_gemm_add(a, w, residual, norm_w, w_scale=w_scale)
        return PendingNorm(h, weighted, sumsq, norm_w, eps)

    def _forward_folded(self, x, residual: torch.Tensor, next_norm_weight: torch.Tensor, next_eps: float,
                        ctx: StepContext) -> Tuple[PendingNorm, torch.Tensor]:
        """The layer with its two add + RMSNorms folded into the GEMMs (``KVCacheConfig.fold_norms``); ``x`` is the
        previous layer's :class:`PendingNorm` (the first layer: the normed embedding)."""
        qkv = self._normed_gemm(x, *self._folded_gemm("qkv"))
        mid = self._add_pending(self._attention(qkv, ctx, self._o_prefetch(ctx)), self._folded_gemm("o"), residual,
                                self.post_norm.weight, self.post_eps)
        a = self._normed_gemm(mid, *self._folded_gemm("gate_up"), silu_mul=True)
        out = self._add_pending(a, self._folded_gemm("down"), mid.h, next_norm_weight, next_eps)
        return out, out.h

    def forward(self, x: torch.Tensor, residual: torch.Tensor, next_norm_weight: torch.Tensor, next_eps: float,
                ctx: StepContext) -> Tuple[torch.Tensor, torch.Tensor]:
        if ctx.fold_norms:
            return self._forward_folded(x, residual, next_norm_weight, next_eps, ctx)
        qkv = self._column(x, "qkv", self._qkv_mods, ctx)
        a = self._attention(qkv, ctx, self._o_prefetch(ctx))
        x, residual = self._row(a, self._o, residual, self.post_norm.weight, self.post_eps, ctx)
        return self._row(self._gate_up_silu(x, ctx), self._down, residual, next_norm_weight, next_eps, ctx)

    # ------------------------------------------------------------------------------------------------------------
    # attention

    def _rope_and_store(self, qkv: torch.Tensor, ctx: StepContext):
        """RoPE (after the per-head QK-norm where the model has one) in place on qkv's q and k columns, and this
        step's k, v into the cache; returns the ``[T, heads, D]`` views q, k, v."""
        t, d, hq, hk = qkv.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        meta, st = ctx.meta, ctx.storage
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
        v = qkv[:, (hq + hk) * d:].view(t, hk, d)
        kc, vc = st.key[self.layer_idx], st.value[self.layer_idx]
        if self._q_norm is None:  # Llama: one kernel ropes q and k and writes the cache
            slots = meta.slot_mapping if meta.slot_mapping is not None else st.no_slots(t)
            tp_rope.rope_kv_cache_write(q, k, v, meta.rope_pos, ctx.cos_sin, kc, vc, slots, is_neox=True,
                                        kv_scale=st.kv_scale)
            return q, k, v
        tp_rope.qk_norm_rope(qkv, self._q_norm.weight, self._k_norm.weight, ctx.cos_sin, meta.rope_pos,
                             num_heads=hq, num_kv_heads=hk, head_dim=d, eps=self.qk_eps, is_neox=True)
        if meta.slot_mapping is not None:
            st.write(self.layer_idx, meta.slot_mapping, k, v)
        return q, k, v

    def _o_prefetch(self, ctx: StepContext) -> Optional[torch.Tensor]:
        """The o_proj weight where this step prefetches it into L2 during attention
        (``KVCacheConfig.prefetch_o_proj``), else None."""
        return self._o.weight if prefetch_o_proj(ctx) else None

    def _attention(self, qkv: torch.Tensor, ctx: StepContext, prefetch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``prefetch`` (a decode step's next weight, or None): brought into L2 by the fused RoPE + attention
        kernel's programs, or by a side stream beside the unfused kernels (:mod:`tpfuse.parallel.prefetch`)."""
        meta, t = ctx.meta, qkv.shape[0]
        if meta.decode is not None and ctx.storage.cfg.fuse_rope:
            return self._rope_decode_attention(qkv, ctx, prefetch)
        with prefetching(prefetch, prefetch is not None):
            q, k, v = self._rope_and_store(qkv, ctx)
            if meta.decode is not None:
                from ..attention import decode_attention

                st = ctx.storage
                o = decode_attention(q, st.key[self.layer_idx], st.value[self.layer_idx], meta.decode.block_tables,
                                     meta.decode.seq_lens, scale=self.scale, kv_scale=st.kv_scale,
                                     max_seq_len=st.max_seq_len)
                return o.reshape(t, -1)
        return self._prefill_attention(q, k, v, ctx)

    def _rope_decode_attention(self, qkv: torch.Tensor, ctx: StepContext,
                               prefetch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A decode step's QK-norm (where the model has one), RoPE, cache write and attention in one op: the new
        token is key ``seq_lens - 1`` of its row, at ``slot_mapping`` (:func:`~tpfuse.parallel.batch.decode_meta`
        derives both from the cache index)."""
        from ..attention import rope_decode_attention

        t, d, hq, hk = qkv.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d: (hq + hk) * d].view(t, hk, d)
        v = qkv[:, (hq + hk) * d:].view(t, hk, d)
        st, meta = ctx.storage, ctx.meta
        qn = self._q_norm
        if self._wants_partials(q, st.key[self.layer_idx], ctx):
            return rope_decode_attention_partials(
                q, k, v, meta.rope_pos, ctx.cos_sin, st.key[self.layer_idx], st.value[self.layer_idx],
                meta.decode.block_tables, meta.decode.seq_lens, scale=self.scale, max_seq_len=st.max_seq_len,
                q_norm_weight=None if qn is None else qn.weight,
                k_norm_weight=None if qn is None else self._k_norm.weight, qk_eps=self.qk_eps)
        o = rope_decode_attention(q, k, v, meta.rope_pos, ctx.cos_sin, st.key[self.layer_idx],
                                  st.value[self.layer_idx], meta.decode.block_tables, meta.decode.seq_lens,
                                  scale=self.scale, kv_scale=st.kv_scale, max_seq_len=st.max_seq_len,
                                  q_norm_weight=None if qn is None else qn.weight,
                                  k_norm_weight=None if qn is None else self._k_norm.weight, qk_eps=self.qk_eps,
                                  prefetch=prefetch)
        return o.reshape(t, -1)

    def _wants_partials(self, q: torch.Tensor, key_cache: torch.Tensor, ctx: StepContext) -> bool:
        """Whether this (fused-RoPE) decode step's attention leaves its split partials for o_proj
        (``KVCacheConfig.fold_attn_combine``): outside sequence-parallel steps, where :meth:`can_fold_attn`."""
        return ctx.storage.cfg.fold_attn_combine and not ctx.meta.sp and self.can_fold_attn(q, key_cache)

    def can_fold_attn(self, q: torch.Tensor, key_cache: torch.Tensor) -> bool:
        """Whether o_proj can take the partials of this attention (:func:`~tpfuse.attention_o.partials_config`):
        its weight in q's dtype, contiguous, N a multiple of 32 (FP8 layers override this: they quantize the
        attention output)."""
        w = self._o.weight
        return (w.dtype == q.dtype and w.is_contiguous() and w.shape[0] % 32 == 0
                and partials_config(q, key_cache) is not None)

    def _prefill_attention(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        t, hq, d = q.shape
        rows = ctx.meta.prefill
        n0 = rows[0][1]
        if all(p == 0 and n == n0 for _, n, _, p in rows):  # equal fresh rows: one batched SDPA
            b = len(rows)
            q4, k4, v4 = (z.view(b, n0, -1, d).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=n0 > 1, scale=self.scale,
                                               enable_gqa=hq != k.shape[1])
            return o.transpose(1, 2).reshape(t, hq * d)
        out = q.new_empty(t, hq * d)
        for start, n, row, past in rows:
            qs = q[start:start + n].transpose(0, 1)[None]
            if past == 0:
                ks, vs = (z[start:start + n].transpose(0, 1)[None] for z in (k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=n > 1, scale=self.scale,
                                                   enable_gqa=hq != k.shape[1])
            else:  # a chunk after cached tokens: query i sees keys 0 .. past + i
                ks, vs = ctx.storage.gather(self.layer_idx, row, past + n, q.dtype)
                kpos = torch.arange(past + n, device=q.device)
                mask = kpos[None, :] <= (past + torch.arange(n, device=q.device))[:, None]
                o = F.scaled_dot_product_attention(qs, ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                                                   attn_mask=mask, scale=self.scale, enable_gqa=hq != k.shape[1])
            out[start:start + n] = o[0].transpose(0, 1).reshape(n, hq * d)
        return out
