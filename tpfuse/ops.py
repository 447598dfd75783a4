"""Local (single-GPU) stages: public functions.

Each op runs tpfuse's fused kernel on CUDA tensors when one exists for the requested form and falls back to the
plain-torch reference (:mod:`tpfuse.reference`) otherwise, so every op works on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from .quant import QuantSpec


def add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-6, *,
                quant: Optional[QuantSpec] = None, gemma: bool = False):
    """``(out, residual_out)`` of add + RMSNorm (+ quant); see :func:`tpfuse.reference.add_rmsnorm`."""
    return ref.add_rmsnorm(x, residual, weight, eps, quant=quant, gemma=gemma)


def silu_mul(x: torch.Tensor, *, quant: Optional[QuantSpec] = None):
    """``silu(x[:, :I]) * x[:, I:]`` (+ quant) for a ``[T, 2I]`` gate-up activation."""
    return ref.silu_mul(x, quant=quant)
