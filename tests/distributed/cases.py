"""Shared pieces of the multi-rank tests.

* Inputs: every rank builds *all* ranks' inputs from one seed (:func:`make_inputs`), so each rank can compute the
  single-process fp64 oracle itself (:func:`oracle`) and only compare its own output.
* :func:`make_comm` builds a communicator; :func:`assert_path_ran` checks that the path that ran is the one
  ``plan()`` reports; :func:`assert_each_raises` checks that each bad call raises (on this rank) and a good call
  right after still works.
* :func:`every_world` makes a test that runs a rank function on each (TP size, backend) of :data:`WORLDS`.
* :func:`fused_ar_graph_replays` (GPU): a CUDA graph of two fused all-reduce + RMSNorm calls replayed with fresh data.
* The GPU suite's TP sizes: :data:`GPU_TPS` (``TPFUSE_TEST_TP``, default ``2,4,8``); :func:`gpu_tp_params` makes them
  pytest parameters and :func:`run_gpu` runs a rank function at one of them, on NCCL where the machine has a GPU
  per rank and in one-GPU mode otherwise (``harness.gpu_backend``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import pytest
import torch

from harness import available_backends, gpu_backend, run_on_ranks
from tpfuse import quant as q
from tpfuse import reference

GPU_TPS = tuple(int(x) for x in os.environ.get("TPFUSE_TEST_TP", "2,4,8").split(",") if x.strip())
"""TP sizes of the GPU suite (``TPFUSE_TEST_TP=4`` runs one: a GPU call per TP size fits the device's limits)."""
# TP 1, 2, 4 on gloo (CPU) and on NCCL where there is a GPU per rank; one-GPU mode at the GPU suite's TP sizes
WORLDS = ([(w, b) for w in (1, 2, 4) for b in available_backends(w) if b != "onegpu"]
          + [(w, "onegpu") for w in GPU_TPS if "onegpu" in available_backends(w)])
WORLD_IDS = [f"tp{w}-{b}" for w, b in WORLDS]


def gpu_tp_params(tps=None):
    """The GPU suite's TP sizes as pytest parameters (id ``tp<N>-<backend>``), skipped on a machine without CUDA."""
    out = []
    for tp in tps or GPU_TPS:
        b = gpu_backend(tp)
        out.append(pytest.param(tp, id=f"tp{tp}-{b or 'cpu'}",
                                marks=[pytest.mark.gpu, pytest.mark.skipif(b is None, reason="needs a CUDA GPU")]))
    return out


def run_gpu(fn: Callable, tp: int, *args, timeout_s: float = 300.0, **kwargs):
    """``run_on_ranks`` at TP ``tp`` on this machine's GPU backend. In one-GPU mode the ranks' contexts take turns
    on the device (every cross-rank wait costs a time slice), so the limit grows with TP."""
    backend = gpu_backend(tp)
    scale = max(1, tp // 2) if backend == "onegpu" else 1
    return run_on_ranks(fn, tp, *args, backend=backend, timeout_s=timeout_s * scale, **kwargs)


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
    # drawn where they are used: on a GPU every rank draws all ranks' partials (the oracle needs them), which on the
    # CPU (one thread per rank) dominated the large GPU cases at TP 8. Same seed and device -> same values on every rank
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=g, device=dev) for _ in range(tp)]
    residual = torch.randn(tokens, hidden, generator=g, device=dev)
    weight = 1 + 0.1 * torch.randn(hidden, generator=g, device=dev)
    if outlier_rank is not None and tokens:
        xs[outlier_rank][tokens // 2, hidden // 3] = 300.0  # drives this row's / group's quant scale
    return Inputs(xs=[x.to(dtype).to(device) for x in xs], residual=residual.to(dtype).to(device),
                  weight=weight.to(weight_dtype or dtype).to(device))


def oracle(inp: Inputs, eps: float, *, with_residual: bool = True, gemma: bool = False):
    """fp64 (out, residual_out) of the fused add + RMSNorm over the whole group."""
    s = inp.total() + (inp.residual.double() if with_residual else 0)
    return reference.rmsnorm_math(s, inp.weight.double(), eps, gemma), s


def norm_of_residual(residual_out: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False):
    """fp64 RMSNorm of a path's own ``residual_out``: the oracle of its quantized output where the path rounds the
    partial sum to the input dtype before the norm. That is the ``nccl`` path's contract: NCCL (and gloo in one-GPU
    mode) add the partials in the input dtype, in the order of their ring or tree, which no fp64 model reproduces
    beyond TP=2; where the sum and the residual nearly cancel, that rounding exceeds one e4m3 step of the small
    result. So the residual is checked against :func:`oracle` (the dtype's budget) and the norm + quantization
    against this, to one quantization step (the dynamic scales to ``scale_rtol`` 2^-7: the path normalises the fp32
    sum, this the sum rounded once more)."""
    return reference.rmsnorm_math(residual_out.double(), weight.double(), eps, gemma)


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


def make_comm(hidden: int, dtype: torch.dtype, max_tokens: int, *, group=None, force: Optional[str] = None,
              force_ops=("fused_add_rmsnorm", "all_reduce"), **config):
    """A ``TPCommunicator`` on ``group`` (``None``: the default group) with ``CommConfig(**config)``; ``force``: a
    path pinned for ``force_ops`` (``CommConfig.force_paths``)."""
    import tpfuse

    if force:
        config["force_paths"] = {op: force for op in force_ops}
    return tpfuse.TPCommunicator(group, max_tokens=max_tokens, hidden_size=hidden, dtype=dtype,
                                 config=tpfuse.CommConfig(**config))


def assert_path_ran(comm, op: str, num_tokens: int, what: str = "", expect: Optional[str] = None) -> str:
    """The path ``op`` last ran on is the one ``comm.plan(num_tokens)`` reports (and ``expect`` where given);
    returns it."""
    ran, planned = comm.last_path[op], comm.plan(num_tokens).path(op)
    assert ran == planned, f"{what} {op}: ran {ran} but plan() says {planned}"
    assert expect is None or ran == expect, f"{what} {op}: ran {ran}, expected {expect}"
    return ran


def assert_each_raises(comm, bad_calls, then: Callable[[str], None], exc=None) -> None:
    """Each ``(name, call, match)`` of ``bad_calls``: ``call(comm)`` raises ``exc`` (default ``TPFuseInputError``)
    matching ``match`` on this rank; then ``then(name)`` makes a good call and checks it (the communicator stays
    usable). Run on every rank, every rank raises."""
    from tpfuse.errors import TPFuseInputError

    for name, call, match in bad_calls:
        with pytest.raises(exc or TPFuseInputError, match=match):
            call(comm)
        then(name)


def every_world(rank_fn: Callable):
    """A test (bind it to a ``test_*`` name) running ``rank_fn(rank, world, backend)`` on each (TP size, backend)
    of :data:`WORLDS`; every rank must return True."""

    @pytest.mark.parametrize("world,backend", WORLDS, ids=WORLD_IDS)
    def test(world, backend):
        assert run_on_ranks(rank_fn, world, backend, backend=backend) == [True] * world

    test.__doc__ = rank_fn.__doc__
    return test


def fused_ar_graph_replays(comm, rank: int, world: int, t: int, h: int, dtype, eps: float, *, replays: int,
                           check_every: int, check_out2: Callable) -> int:
    """GPU: a CUDA graph of two ``fused_add_rmsnorm`` calls (the second FP8-static quantized, on the first's
    residual output) replayed ``replays`` times with fresh inputs copied into the static tensors; every
    ``check_every``-th replay and the last checked against the fp64 oracle, the quantized output by
    ``check_out2(out2, res1, weight, oracle, what)``. Returns how many replays were checked."""
    from kernel_env import capture
    from tpfuse.tolerance import assert_close

    dev = comm.device
    inp = make_inputs(60, world, t, h, dtype, device=dev)
    sx, sres, w = inp.xs[rank].clone(), inp.residual.clone(), inp.weight
    spec = q.FP8Static(torch.tensor(0.05, device=dev))

    def step():
        out1, res1 = comm.fused_add_rmsnorm(sx, sres, w, eps)
        out2, res2 = comm.fused_add_rmsnorm(res1, res1, w, eps, quant=spec)
        return out1, res1, out2, res2

    g, (out1, res1, out2, res2) = capture(step)
    gen = torch.Generator(device=dev)
    checked = 0
    for it in range(replays):
        gen.manual_seed(1000 + it)
        xs = [torch.randn(t, h, device=dev, generator=gen).to(dtype) for _ in range(world)]
        r = torch.randn(t, h, device=dev, generator=gen).to(dtype)
        sx.copy_(xs[rank])
        sres.copy_(r)
        g.replay()
        if it % check_every == 0 or it == replays - 1:
            s = sum(x.double() for x in xs) + r.double()
            assert_close(res1, s, dtype, f"graph replay {it} residual_out 1")
            assert_close(out1, reference.rmsnorm_math(s, w.double(), eps), dtype, f"graph replay {it} out 1")
            s2 = res1.double() * world + res1.double()
            assert_close(res2, s2, dtype, f"graph replay {it} residual_out 2")
            check_out2(out2, res1, w, reference.rmsnorm_math(s2, w.double(), eps), f"graph replay {it} out 2")
            checked += 1
    return checked
