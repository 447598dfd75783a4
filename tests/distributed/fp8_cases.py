"""Shared FP8 GEMM inputs and fp64 oracles for the multi-rank tests (CPU: test_fp8_gemm.py; GPU:
test_async_tp_gpu.py). Like cases.py, every rank builds every rank's operands from one seed, so each rank computes
the single-process oracle itself.

``kind``: ``"tensor"`` (per-tensor scales) or ``"row"`` (per-token x, per-output-channel weight). Rows of x and of
the weights are scaled by ``2^U(-4, 4)`` first, so row-wise scales differ by up to 256x between rows: a scale
applied to the wrong rows (or dropped) is far outside the bf16 tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from tpfuse import quant as q
from tpfuse.sharding import shard_range

KINDS = ("tensor", "row")


def quantize(x: torch.Tensor, kind: str):
    """``(e4m3 data, fp32 scale)``: per-tensor scale ``[]`` or per-row ``[rows, 1]`` (tpfuse.quant's rules)."""
    if kind == "row":
        return q.fp8_quantize_per_token(x)
    scale = q.fp8_dynamic_scale(x.float().abs().amax()) if x.numel() else torch.ones((), device=x.device)
    return q.fp8_quantize_static(x, scale), scale.reshape(())


def dequant(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.double() * scale.double()


def _spread_rows(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    f = torch.exp2(torch.empty(t.shape[0], 1, device=t.device).uniform_(-4, 4, generator=g))
    return t * f


@dataclass
class AGCase:
    xq: torch.Tensor        # [T, H] e4m3, every rank's shard rows in order
    xs: torch.Tensor        # [] or [T, 1]
    wq: List[torch.Tensor]  # per rank [N_shard, H] e4m3
    ws: List[torch.Tensor]  # per rank [] or [N_shard, 1]

    def shard(self, rank: int, world: int):
        s, e = shard_range(self.xq.shape[0], world, rank)
        xs = self.xs if self.xs.dim() == 0 else self.xs[s:e]
        return self.xq[s:e].contiguous(), xs.contiguous()

    def oracle(self, rank: int) -> torch.Tensor:
        return dequant(self.xq, self.xs) @ dequant(self.wq[rank], self.ws[rank]).t()


def ag_case(seed: int, world: int, t: int, h: int, n_shard: int, kind: str, device="cpu",
            w_seed=None) -> AGCase:
    """``w_seed``: draw the weights from their own seed (static weights, fresh activations per ``seed``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = _spread_rows(torch.randn(t, h, generator=g, device=device), g)
    xq, xs = quantize(x, kind)  # row-local or one global scale: equal to quantizing each rank's shard
    if w_seed is not None:
        g = torch.Generator(device=device).manual_seed(w_seed)
    wq, ws = [], []
    for _ in range(world):
        w = _spread_rows(torch.randn(n_shard, h, generator=g, device=device) / h ** 0.5, g)
        a, b = quantize(w, kind)
        wq.append(a)
        ws.append(b)
    return AGCase(xq, xs, wq, ws)


@dataclass
class RSCase:
    xq: List[torch.Tensor]  # per rank [T, K_shard] e4m3
    xs: List[torch.Tensor]  # per rank [] or [T, 1]
    wq: List[torch.Tensor]  # per rank [H, K_shard] e4m3
    ws: List[torch.Tensor]  # per rank [] or [H, 1]

    def total(self, start: int = 0, end=None) -> torch.Tensor:
        """fp64 ``sum_q (x_q * sx_q) @ (w_q * sw_q).T`` over every rank, rows ``[start, end)``."""
        rows = slice(start, end)
        return sum(dequant(x[rows], sx if sx.dim() == 0 else sx[rows]) @ dequant(w, sw).t()
                   for x, sx, w, sw in zip(self.xq, self.xs, self.wq, self.ws))

    def total_of_rounded(self, dtype: torch.dtype) -> torch.Tensor:
        """fp64 of what an unfused GPU path reduces: each rank's GEMM output rounded to ``dtype`` (``_scaled_mm``
        writes bf16), summed, and the sum rounded to ``dtype`` (the collective's result)."""
        parts = [RSCase([x], [sx], [w], [sw]).total().to(dtype).double()
                 for x, sx, w, sw in zip(self.xq, self.xs, self.wq, self.ws)]
        return sum(parts).to(dtype).double()


def rs_case(seed: int, world: int, t: int, h: int, k_shard: int, kind: str, device="cpu",
            w_seed=None) -> RSCase:
    """``w_seed``: as in :func:`ag_case`."""
    g = torch.Generator(device=device).manual_seed(seed)
    gw = g if w_seed is None else torch.Generator(device=device).manual_seed(w_seed)
    out = RSCase([], [], [], [])
    for _ in range(world):
        x = _spread_rows(torch.randn(t, k_shard, generator=g, device=device), g)
        w = _spread_rows(torch.randn(h, k_shard, generator=gw, device=device) / (k_shard * world) ** 0.5, gw)
        for (a, b), dl, sl in ((quantize(x, kind), out.xq, out.xs), (quantize(w, kind), out.wq, out.ws)):
            dl.append(a)
            sl.append(b)
    return out
