"""FP8 (e4m3) linears of the decoder: the module, the scheme, in-place conversion, and the compressed-tensors layout.

An :class:`FP8Linear` holds what a compressed-tensors FP8 checkpoint stores for one ``nn.Linear`` (same
``state_dict`` names, so ``load_sharded_safetensors`` reads such a checkpoint as is):

==================  ==========  =================================================================================
``weight``          e4m3        ``[N, K]``
``weight_scale``    fp32        ``[N, 1]`` per output channel (``"per_channel"``) or ``[1]`` (``"per_tensor"``)
``input_scale``     fp32 ``[1]``  static activation scale (``activation="static"`` only)
``bias``            model dtype ``[N]`` (optional)
==================  ==========  =================================================================================

``weight ~= e4m3(w / weight_scale) * weight_scale``, ``weight_scale = max(amax / 448, 1 / (448 * 512))`` over the
row (per channel) or the whole tensor (per tensor). Its plain ``forward`` dequantizes (so an unsharded converted
model still runs, and ``.double()`` of it is the FP8 model's fp64 oracle); the parallelized model runs the
:class:`~tpfuse.parallel.fp8_layer.FP8DecoderLayer` instead, whose GEMMs read the e4m3 bytes through
``torch._scaled_mm`` with per-token (or static) FP8 activations emitted by the fused norm / SiLU-mul kernels.

:func:`quantize_fp8` converts the decoder's linears in place: of an unsharded model (real or on the meta device,
before :func:`~tpfuse.parallel.parallelize`) or of a parallelized one (its shards; scales shared by a shard's
peers are reduced over the group first, so both orders give bit-identical shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import TPFuseInputError, TPFuseUnsupportedError
from .. import quant as q

ACTIVATIONS = ("per_token", "static")
WEIGHTS = ("per_channel", "per_tensor")


@dataclass(frozen=True)
class FP8Scheme:
    """How the decoder's linears are quantized: ``activation`` ``"per_token"`` (dynamic, one scale per token) or
    ``"static"`` (the calibrated ``input_scale``); ``weight`` ``"per_channel"`` or ``"per_tensor"``."""

    activation: str = "per_token"
    weight: str = "per_channel"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise TPFuseInputError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.weight not in WEIGHTS:
            raise TPFuseInputError(f"weight must be one of {WEIGHTS}, got {self.weight!r}")
        if self.activation == "static" and self.weight == "per_channel":
            raise TPFuseUnsupportedError("static activation scales need per-tensor weight scales: torch._scaled_mm has "
                                         "no per-tensor x row-wise form (use activation='per_token' with per_channel)")


class FP8Linear(nn.Module):
    """An ``nn.Linear`` with e4m3 weights (see the module docstring); built empty, filled by :meth:`from_linear`
    or a checkpoint."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, scheme: FP8Scheme,
                 bias_dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        f32 = dict(dtype=torch.float32, device=device)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=q.FP8_DTYPE, device=device),
                                   requires_grad=False)
        rows = out_features if scheme.weight == "per_channel" else 1
        self.weight_scale = nn.Parameter(torch.ones(rows, 1, **f32) if rows > 1 else torch.ones(1, **f32),
                                         requires_grad=False)
        self.input_scale = (nn.Parameter(torch.ones(1, **f32), requires_grad=False)
                            if scheme.activation == "static" else None)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.scheme.activation}, weight={self.scheme.weight}")


def weight_amax(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """fp32 ``[N, 1]`` row amax (per channel) or ``[1]`` tensor amax of a weight."""
    a = w.detach().float().abs()
    return a.amax(dim=1, keepdim=True) if per_channel else a.amax().reshape(1)


def quantize_weight(w: torch.Tensor, amax: torch.Tensor):
    """``(e4m3 weight, fp32 scale)`` of ``w`` for the given amax (``[N, 1]`` or ``[1]``)."""
    scale = q.fp8_dynamic_scale(amax)
    return q._fp8_cast(w.detach().float() * (1.0 / scale)), scale


def from_linear(lin: nn.Module, scheme: FP8Scheme, amax: Optional[torch.Tensor] = None) -> FP8Linear:
    """An :class:`FP8Linear` replacing ``lin`` (on its device; meta stays meta). ``amax`` overrides the weight's
    own (a row-parallel shard uses the amax of the whole row)."""
    w = lin.weight
    out = FP8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, scheme=scheme,
                    bias_dtype=w.dtype, device=w.device)
    if lin.bias is not None:
        out.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
    if w.is_meta:
        return out
    amax = weight_amax(w, scheme.weight == "per_channel") if amax is None else amax
    data, scale = quantize_weight(w, amax)
    out.weight.data.copy_(data)
    out.weight_scale.data.copy_(scale.view_as(out.weight_scale))
    return out
