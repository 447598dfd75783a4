"""The FP8 decoder layer: :class:`~tpfuse.parallel.layers.TPDecoderLayer`'s data flow with e4m3 GEMMs whose
activations come quantized out of the fused kernels (no separate quantize kernel before qkv, gate-up or down)::

    qkv = scaled_mm(x_fp8, W_qkv_fp8)           x_fp8: the previous fused all-reduce + add + RMSNorm's FP8 output
    attention (bf16, unchanged)
    a_fp8 = quantize(attn)                       the one standalone quantize (attention emits bf16)
    x_fp8, residual = *fused_add_rmsnorm(scaled_mm(a_fp8, W_o_fp8), residual, post_norm, quant=gate-up format)
    gu = scaled_mm(x_fp8, W_gate_up_fp8)
    h_fp8 = silu_mul(gu, quant=down format)      (per-token with small_gemm.AMAX_CHAIN_MAX_M, off by default:
                                                  gate-up + SiLU*mul -> bf16 h + partial maxima of |h|, then
                                                  ops.quantize_from_amax)
    x, residual = *fused_add_rmsnorm(scaled_mm(h_fp8, W_down_fp8), residual, NEXT norm, quant=next qkv format)

(sequence-parallel form: ``all_gather_matmul`` / ``matmul_reduce_scatter_rmsnorm`` with the same FP8 operands).

In the all-reduce form, decode-sized GEMMs (M <= 64) run tpfuse's small-M kernel (:mod:`tpfuse.small_gemm`, the
same e4m3 operands and scales) only where its tuned table says it beats ``_scaled_mm`` there, and gate-up +
SiLU*mul + static FP8 quantization as one kernel only where that beats the pair; no table row: ``_scaled_mm``.
Everything is decided when the layer is built: each GEMM gets its e4m3 weight (q/k/v and gate/up fused into one
tensor whose slices are the modules' ``weight`` parameters), the weight scale in the form ``_scaled_mm`` takes
with that activation (``[N, 1]`` with per-token activations; one scalar with static ones), and the
quant spec of its input. Per-tensor weight scales of fused modules are unified by requantizing each module's
weight to the group's largest scale (as vLLM does), in place, so the parameters stay a consistent checkpoint.

Weight-only steps (``StepContext.fp8_weight_only``: ``KVCacheConfig.fp8_weight_only_max_tokens``, off by default:
measured slower, its docstring says by how much; all-reduce form, decode-sized) run the bf16 layer's data flow on the
same e4m3 weights and scales instead (:meth:`FP8DecoderLayer.forward_weight_only`; at TP = 1 with the RMSNorms
folded as in bf16 layers, ``KVCacheConfig.fold_norms``)::

    qkv = small_m_gemm(x, W_qkv_fp8, w_scale)                   x: bf16, the previous fused norm's output
    attention (bf16, unchanged)
    x, residual = *fused_add_rmsnorm(small_m_gemm(attn, W_o_fp8, w_scale), residual, post_norm)
    h = small_m_gemm(x, W_gate_up_fp8, w_scale, silu_mul=True)  SiLU*mul in the epilogue, bf16 h
    x, residual = *fused_add_rmsnorm(small_m_gemm(h, W_down_fp8, w_scale), residual, NEXT norm)

two kernels a layer fewer than the per-token form (no SiLU*mul + quantize, no quantize of the attention output),
the same weight bytes; the activations stay bf16 (no activation scale is applied: the static scheme's input scales
would only clamp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..errors import TPFuseInputError
from .. import ops
from .. import quant as q
from .. import scaled_gemm
from .. import small_gemm
from .layers import StepContext, TPDecoderLayer, _fuse_linears


@dataclass
class FP8Gemm:
    """One GEMM of the layer: e4m3 ``weight [N, K]``, its ``_scaled_mm`` ``scale``, optional ``bias`` and the
    quant spec of its input activation."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: Optional[torch.Tensor]
    in_spec: object


def _fuse_scales(mods) -> torch.Tensor:
    """Per-channel: one ``[N, 1]`` scale whose row slices become the modules' ``weight_scale`` parameters."""
    s = torch.cat([m.weight_scale.detach() for m in mods]).contiguous()
    off = 0
    for m in mods:
        n = m.weight_scale.shape[0]
        m.weight_scale = torch.nn.Parameter(s[off:off + n], requires_grad=False)
        off += n
    return s


def build_gemm(mods: List[torch.nn.Module]) -> FP8Gemm:
    scheme = mods[0].scheme
    w, b = _fuse_linears(mods)
    dev = w.device
    if scheme.weight == "per_channel":
        scale = _fuse_scales(mods)
    else:  # derived (filled by sync_gemm): [N, 1] for row-wise activation scales, a scalar for static ones
        scale = torch.ones((w.shape[0], 1) if scheme.activation == "per_token" else (), device=dev)
    spec = (q.FP8PerToken() if scheme.activation == "per_token"
            else q.FP8Static(torch.ones((), dtype=torch.float32, device=dev)))
    g = FP8Gemm(weight=w, scale=scale, bias=b, in_spec=spec)
    sync_gemm(g, mods)
    return g


@torch.no_grad()
def sync_gemm(g: FP8Gemm, mods) -> None:
    """Recompute (in place: captured CUDA graphs keep their pointers) what ``g`` derives from the modules'
    parameters: per-tensor weight scales unified to their max, the static input scale (max of the modules')."""
    scheme = mods[0].scheme
    if scheme.weight == "per_tensor":
        top = torch.stack([m.weight_scale.reshape(()) for m in mods]).amax()
        for m in mods:
            if len(mods) > 1:  # requantize to the shared scale (exact when the module's scale is the max)
                deq = scaled_gemm.dequantize(m.weight, m.weight_scale)
                m.weight.copy_(q._fp8_cast(deq * (1.0 / top)))
            m.weight_scale.fill_(top)
        g.scale.copy_(top.expand_as(g.scale))
    if scheme.activation == "static":
        g.in_spec.scale.copy_(torch.stack([m.input_scale.reshape(()) for m in mods]).amax())


class FP8DecoderLayer(TPDecoderLayer):
    """A :class:`TPDecoderLayer` whose q/k/v/o/gate/up/down modules are
    :class:`~tpfuse.parallel.fp8.FP8Linear` (see the module docstring)."""

    def can_fold_norms(self) -> bool:
        """In weight-only steps only (:func:`~tpfuse.parallel.forward.can_fold_norms` asks that): bf16 activations
        and norm weights, no o / down bias, hidden size a multiple of 32, the weight-only GEMMs' shapes. The
        activation-quantizing form quantizes its GEMMs' inputs in the norm kernels: never folded."""
        return (self.can_run_weight_only() and self._o.bias is None and self._down.bias is None
                and self.input_norm.weight.dtype == self.post_norm.weight.dtype == torch.bfloat16
                and self._g["o"].weight.shape[0] % small_gemm.SUMSQ_ROWS == 0)

    def can_fold_attn(self, q, key_cache) -> bool:
        """Never: the activation scheme quantizes the attention output, the weight-only one multiplies e4m3
        weights (``KVCacheConfig.fold_attn_combine`` is for bf16 / fp16 layers)."""
        return False

    def _folded_gemm(self, key: str):
        """``(weight, bias, w_scale)``: the e4m3 GEMM and its scale (weight-only, folded)."""
        g = self._g[key]
        return g.weight, g.bias, g.scale

    def refuse(self) -> None:
        if self.post_norm.weight.dtype != torch.bfloat16:
            raise TPFuseInputError(f"FP8 layers need a bf16 model (torch._scaled_mm writes bf16), got "
                                   f"{self.post_norm.weight.dtype}: convert the model with .to(torch.bfloat16) first")
        self._mm = scaled_gemm.mm_for(self._o.weight.device)
        self._g = {"qkv": build_gemm(self._qkv_mods), "gate_up": build_gemm(self._gate_up_mods),
                   "o": build_gemm([self._o]), "down": build_gemm([self._down])}
        self.in_quant = self._g["qkv"].in_spec
        self._fused = {}

    def after_load(self) -> None:
        for key, mods in (("qkv", self._qkv_mods), ("gate_up", self._gate_up_mods), ("o", [self._o]),
                          ("down", [self._down])):
            sync_gemm(self._g[key], mods)

    def _fp8_mm(self, a, g: FP8Gemm, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``a @ W.T (+ bias)`` of a quantized activation in the all-reduce form: the small-M kernel where its tuned
        table says it beats ``_scaled_mm`` at this (scheme, N, K, M bucket) (bias fused), else ``_scaled_mm`` (its
        CPU emulation off CUDA) with the bias added in place, as always. The activation scales are the fused norm
        / SiLU*mul / quantize kernels' own (per token ``[M, 1]``, or the static scalar)."""
        if small_gemm.use_kernel(a.data, g.weight, x_scale=a.scale, w_scale=g.scale):
            return small_gemm.small_m_gemm(a.data, g.weight, x_scale=a.scale, w_scale=g.scale, bias=bias)
        y = self._mm(a.data, g.weight, a.scale, g.scale)
        return y if bias is None else y.add_(bias)

    def _fp8_column(self, x, g: FP8Gemm, ctx: StepContext) -> torch.Tensor:
        if not ctx.meta.sp:
            return self._fp8_mm(x, g, g.bias)
        y = ctx.comm.all_gather_matmul(x, g.weight, num_tokens=ctx.meta.num_tokens, w_scale=g.scale)
        return y if g.bias is None else y.add_(g.bias)

    def _fp8_gate_up_silu(self, x, ctx: StepContext):
        """``silu_mul(gate-up GEMM, quant=down's input format)``: one fused small-M kernel (static FP8 output) where
        the table says it beats the unfused pair; per-token FP8 needs the whole row's amax: the SiLU*mul + quantize
        kernel (one program a row), or where :func:`~tpfuse.small_gemm.use_amax_chain` says so (off by default)
        gate-up + SiLU*mul writing bf16 h and its partial maxima, which :func:`~tpfuse.ops.quantize_from_amax`
        turns into the scale over many programs a row."""
        g, spec = self._g["gate_up"], self._g["down"].in_spec
        if (not ctx.meta.sp and type(spec) is q.FP8PerToken
                and small_gemm.use_amax_chain(x.data, g.weight, x_scale=x.scale, gate_up_scale=g.scale)):
            h, amax = small_gemm.small_m_gemm_amax(x.data, g.weight, x_scale=x.scale, w_scale=g.scale, bias=g.bias,
                                                   silu_mul=True)
            return ops.quantize_from_amax(h, amax)
        if (not ctx.meta.sp and type(spec) is q.FP8Static
                and small_gemm.use_kernel(x.data, g.weight, x_scale=x.scale, w_scale=g.scale, silu_mul=True,
                                          out_scale=spec.scale)):
            h = small_gemm.small_m_gemm(x.data, g.weight, x_scale=x.scale, w_scale=g.scale, bias=g.bias,
                                        silu_mul=True, out_scale=spec.scale)
            return q.QuantizedActivation(data=h, scale=spec.scale, spec=spec, orig_dtype=torch.bfloat16,
                                         shape=h.shape)
        return ops.silu_mul(self._fp8_column(x, g, ctx), quant=spec)

    def _fp8_row(self, a, g: FP8Gemm, residual, norm_w, eps: float, ctx: StepContext, quant):
        if g.bias is not None:  # replicated: added once to the sum
            residual = residual + g.bias
        if ctx.meta.sp:
            return ctx.comm.matmul_reduce_scatter_rmsnorm(a, g.weight, residual, norm_w, eps, quant=quant,
                                                          w_scale=g.scale)
        partial = self._fp8_mm(a, g)
        if ctx.local:
            return ops.add_rmsnorm(partial, residual, norm_w, eps, quant=quant)
        return ctx.comm.fused_add_rmsnorm(partial, residual, norm_w, eps, quant=quant)

    def can_run_weight_only(self) -> bool:
        """Whether :meth:`forward_weight_only` can run: every GEMM dimension a multiple of 16 (the small-M kernel's;
        the gate-up's SiLU*mul half too)."""
        return (all(g.weight.shape[0] % 16 == 0 and g.weight.shape[1] % 16 == 0 for g in self._g.values())
                and self._g["gate_up"].weight.shape[0] % 32 == 0)

    @staticmethod
    def _w8(x: torch.Tensor, g: FP8Gemm, bias: Optional[torch.Tensor] = None, silu_mul: bool = False):
        return small_gemm.small_m_gemm(x, g.weight, w_scale=g.scale, bias=bias, silu_mul=silu_mul)

    def _w8_row(self, a: torch.Tensor, g: FP8Gemm, residual, norm_w, eps: float, ctx: StepContext):
        if g.bias is not None:  # replicated: added once to the sum
            residual = residual + g.bias
        partial = self._w8(a, g)
        if ctx.local:
            return ops.add_rmsnorm(partial, residual, norm_w, eps)
        return ctx.comm.fused_add_rmsnorm(partial, residual, norm_w, eps)

    def forward_weight_only(self, x: torch.Tensor, residual: torch.Tensor, next_norm_weight: torch.Tensor,
                            next_eps: float, ctx: StepContext):
        """The layer with bf16 activations and its e4m3 weights (module docstring, "Weight-only steps")."""
        g = self._g
        qkv = self._w8(x, g["qkv"], g["qkv"].bias)
        a = self._attention(qkv, ctx, self._o_prefetch(ctx))
        x, residual = self._w8_row(a, g["o"], residual, self.post_norm.weight, self.post_eps, ctx)
        h = self._w8(x, g["gate_up"], g["gate_up"].bias, silu_mul=True)
        return self._w8_row(h, g["down"], residual, next_norm_weight, next_eps, ctx)

    def forward(self, x, residual: torch.Tensor, next_norm_weight: torch.Tensor, next_eps: float,
                ctx: StepContext):
        if ctx.fp8_weight_only:
            fwd = self._forward_folded if ctx.fold_norms else self.forward_weight_only
            return fwd(x, residual, next_norm_weight, next_eps, ctx)
        g = self._g
        qkv = self._fp8_column(x, g["qkv"], ctx)
        a = ops.quantize(self._attention(qkv, ctx, self._o_prefetch(ctx)), g["o"].in_spec)  # o's e4m3 bytes
        x, residual = self._fp8_row(a, g["o"], residual, self.post_norm.weight, self.post_eps, ctx,
                                    g["gate_up"].in_spec)
        h = self._fp8_gate_up_silu(x, ctx)
        return self._fp8_row(h, g["down"], residual, next_norm_weight, next_eps, ctx, self.out_quant)
