"""Shared inputs for the multi-rank tests: every rank builds *all* ranks' inputs from one seed, so each rank can
compute the single-process fp64 oracle itself and only compare its own output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from tpfuse import quant as q
from tpfuse import reference


@dataclass
class Inputs:
    xs: List[torch.Tensor]          # every rank's partial sum [T, H], in dtype
    residual: torch.Tensor          # [T, H], in dtype
    weight: torch.Tensor            # [H]

    def total(self) -> torch.Tensor:
        """fp64 sum of all ranks' partials."""
        return sum(x.double() for x in self.xs)


def make_inputs(seed: int, tp: int, tokens: int, hidden: int, dtype: torch.dtype, *, weight_dtype=None,
                outlier_rank: Optional[int] = None, device="cpu") -> Inputs:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=g) for _ in range(tp)]
    residual = torch.randn(tokens, hidden, generator=g)
    weight = 1 + 0.1 * torch.randn(hidden, generator=g)
    if outlier_rank is not None and tokens:
        xs[outlier_rank][tokens // 2, hidden // 3] = 300.0  # drives this row's / group's quant scale
    return Inputs(xs=[x.to(dtype).to(device) for x in xs], residual=residual.to(dtype).to(device),
                  weight=weight.to(weight_dtype or dtype).to(device))


def oracle(inp: Inputs, eps: float, *, with_residual: bool = True, gemma: bool = False,
           sum_in_dtype: bool = False):
    """fp64 (out, residual_out) of the fused add + RMSNorm over the whole group.

    ``sum_in_dtype``: the contract of the ``nccl`` path, whose collective sums the partials in the input dtype: the
    sum is rounded to that dtype before the residual add (exactly NCCL's result at TP=2: one add of two values,
    rounded once; at larger TP NCCL rounds after each add of its ring/tree, which this models only approximately).
    A quantized output is then checked against the values the path really normalised: where the partial sum and
    the residual nearly cancel, that rounding exceeds one e4m3 step of the small result."""
    total = inp.total()
    if sum_in_dtype:
        total = total.to(inp.xs[0].dtype).double()
    s = total + (inp.residual.double() if with_residual else 0)
    return reference.rmsnorm_math(s, inp.weight.double(), eps, gemma), s


def make_spec(kind: Optional[str], device, ref_out: Optional[torch.Tensor] = None):
    """A quant spec by name; NVFP4's global scale comes from the oracle's amax, as a calibrated model's would."""
    if kind is None:
        return None
    if kind == "fp8_static":
        return q.FP8Static(torch.tensor(0.05, device=device))
    if kind == "fp8_token":
        return q.FP8PerToken()
    if kind.startswith("fp8_group"):
        return q.FP8PerGroup(int(kind[len("fp8_group"):]))
    amax = ref_out.abs().amax().float() if ref_out is not None and ref_out.numel() else torch.tensor(1.0)
    gs = q.nvfp4_global_scale(amax).to(device)
    return q.NVFP4(gs, layout="linear" if kind == "nvfp4_linear" else "swizzled128x4")


QUANT_KINDS = [None, "fp8_static", "fp8_token", "fp8_group128", "fp8_group64", "nvfp4", "nvfp4_linear"]


def on_cpu(qa):
    """A quantized output with its spec's scale tensors on the CPU (the tolerance oracle quantizes on the CPU)."""
    import tpfuse

    spec = qa.spec
    if isinstance(spec, tpfuse.FP8Static):
        spec = tpfuse.FP8Static(spec.scale.cpu())
    elif isinstance(spec, tpfuse.NVFP4):
        spec = tpfuse.NVFP4(spec.global_scale.cpu(), spec.layout)
    return tpfuse.QuantizedActivation(data=qa.data.cpu(), scale=qa.scale.cpu(), spec=spec, orig_dtype=qa.orig_dtype,
                                      shape=qa.shape)
