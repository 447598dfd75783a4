"""Programmatic dependent launch (PDL, sm_90 and later) of the decode step's Triton kernels.

A kernel launched with PDL (Triton's ``launch_pdl=True``: the launch attribute
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``; a programmatic edge once captured in a CUDA graph) may be
scheduled while the kernel before it in the stream still runs, so its launch and ramp-up hide behind that kernel's
tail instead of following it.

Contract of every kernel that takes the constexpr ``PDL`` (``add_rmsnorm``, ``silu_mul``, ``quantize``,
``qk_norm_rope``, ``rope_kv_cache_write``, the decode attention's split and combine kernels, the small-M GEMM and
its split-K reduce, ``attn_o_gemm``):

* its first statement is :func:`enter` (after L2 prefetches only, below): ``griddepcontrol.wait`` (every write of
  the previous grid done and visible), then ``griddepcontrol.launch_dependents`` (the next grid may be scheduled
  once every program of this one has passed its wait). Nothing is written before the wait, and nothing is read but
  the prefetches' addresses: inputs may come from the previous kernel, and outputs
  may reuse memory the previous kernel still reads (the caching allocator hands freed blocks out at once), so
  correctness never depends on where the trigger sits, as long as it follows the wait (every kernel launched with
  PDL must trigger only after its wait: the argument below needs it of the kernel before each one);
* the two kernels that stream most bytes (the small-M GEMM, the decode attention's split kernel) instead wait first
  (:func:`wait`) and let the next grid launch only after their main loop (:func:`trigger`): the next kernel's
  programs, and the L2 prefetches they issue before their own wait, then do not take SM slots and L2 from a kernel
  that still streams its weights or its KV cache (:data:`EARLY_TRIGGER`: right after their wait instead, an A/B
  knob). The order wait-before-trigger is the same, so what follows holds for them too;
* every program waits (no early exit before its wait), so a PDL grid completes only after its predecessor has:
  ordering stays transitive along a chain of PDL kernels, and a kernel after them that is launched normally (cuBLAS,
  torch ops, the fused all-reduce) waits for all of it as always;
* ``PDL=False`` (the default everywhere outside :func:`launches`) compiles to the same PTX as before the constexpr
  existed (``tests/sm90_ptx_fingerprints.txt``).

Reading ahead of the wait: :func:`prefetch_l2` may run *before* :func:`enter`. A prefetch only moves lines into
L2, which is the GPU's point of coherence (every SM's loads and stores meet there), so it can never make a later
load see stale data; what it buys is that the weight bytes a GEMM streams start arriving while the previous kernel
still runs (the small-M GEMM's ``PF_LINES``, the decode attention's ``PF_KEYS``: decode's small kernels leave the
memory system mostly idle). The addresses may come from loads before the wait only of data written two or more
kernels back (the step's lengths and block tables; the decode attention's hoisted launches and ``attn_o_gemm`` read
the lengths so): this kernel is scheduled only once every program of the kernel
before it has triggered or exited, which each does after its own wait, so every kernel before that one is
complete. ``tests/test_sm90_compile.py`` checks the order in the PTX of every PDL variant: the first
``griddepcontrol.wait`` comes before any global store or atomic and before ``griddepcontrol.launch_dependents``.

When: only while :func:`launches` is active - the model runtime's decode-graph capture with ``KVCacheConfig.pdl``
(the default) - on an NVIDIA device of compute capability 9.0 or later, with a stack that has it (:func:`wanted`:
Triton's ``gdc_wait`` / ``gdc_launch_dependents`` and a CUDA runtime >= 12.3, whose stream capture records the
programmatic edges; never on ROCm); elsewhere the same graphs are captured without it. The module imports Triton
only for the device helpers (:func:`enter`, :func:`wait`, :func:`trigger`, :func:`prefetch_l2`), and works without
it (the launch-side functions need only torch).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_ON = [False]


@contextlib.contextmanager
def launches(on: bool = True):
    """While active (and ``on``), the kernels above launch with PDL on devices that have it (:func:`wanted`)."""
    old, _ON[0] = _ON[0], bool(on)
    try:
        yield
    finally:
        _ON[0] = old


MIN_CUDA = (12, 3)  # stream capture turns PDL launches into programmatic graph edges from CUDA 12.3 on


def stack_has_pdl() -> bool:
    """Whether this torch / Triton build can launch and capture PDL kernels: an NVIDIA build (not ROCm) of CUDA >=
    :data:`MIN_CUDA`, and a Triton with the ``griddepcontrol`` intrinsics (3.3 and later; older Triton, which
    torch >= 2.6 still allows, has neither them nor ``launch_pdl``)."""
    if torch.version.hip is not None or not torch.version.cuda or triton is None:
        return False
    try:
        cuda = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    except ValueError:
        return False
    return cuda >= MIN_CUDA and all(hasattr(tl.extra.cuda, f) for f in ("gdc_wait", "gdc_launch_dependents"))


@functools.lru_cache(maxsize=None)
def _has_pdl(index: int) -> bool:
    return stack_has_pdl() and torch.cuda.get_device_capability(index) >= (9, 0)


def available(device: torch.device) -> bool:
    """Whether PDL launches happen on ``device`` inside :func:`launches` (what benchmarks record next to the
    setting they asked for: an A100, ROCm or an old stack captures without it)."""
    return device.type == "cuda" and _has_pdl(device.index if device.index is not None else
                                              torch.cuda.current_device())


def wanted(t: torch.Tensor) -> bool:
    """Whether a kernel writing ``t`` launches with PDL now: inside :func:`launches`, on an NVIDIA device of compute
    capability >= 9.0 whose stack has it (:func:`stack_has_pdl`; never on CPU, so the Triton interpreter never sees
    it; never on ROCm)."""
    return _ON[0] and t.is_cuda and _has_pdl(t.device.index if t.device.index is not None else
                                              torch.cuda.current_device())


EARLY = 2
"""The ``PDL`` constexpr of a streaming kernel that triggers right after its wait (:func:`stream_mode`)."""
EARLY_TRIGGER = False
"""The two streaming kernels (the small-M GEMM, the decode attention's split kernels) trigger right after their wait
(True) instead of after their main loop (False): the next kernel's launch then hides behind this kernel's whole
loop, not only its epilogue, and its programs may take SM slots (and issue their L2 prefetches) while this kernel
still streams. The trigger takes effect once every program of the grid has given it, so a grid of more than one
wave still launches all its programs first. Off: it made the full 8B's decode step slower (one H100, 0f918e6,
``bench/results/e2e_tp1_h100_ab_trig_0f918e6.json``, rows ``_early``): 1.076 / 1.034 / 1.049 / 1.002x at batch 1 /
8 / 16 / 64 in bf16, 1.096 / 1.083 / 1.077 / 1.004x in static FP8, 1.000 / 1.015 / 0.988 / 1.012x in per-channel
FP8 (the next kernel's waiting programs take the SM slots and issue slots of a kernel still streaming); with 4 MiB
of L2 prefetch a GEMM launch too (``_earlypf``) 1.092 / 1.041 / 1.062 / 1.011x in bf16. Its builds give the same
bits (``test_graph_decode_through_the_kernel_and_with_pdl_matches_the_oracle``, mode "early", passed there at TP 1
and one-GPU TP 2)."""


def stream_mode(on: bool):
    """The ``PDL`` constexpr of a streaming kernel's launch: :data:`EARLY` where ``on`` and
    :data:`EARLY_TRIGGER`, else ``on`` (the trigger after the main loop; False: no PDL)."""
    return EARLY if on and EARLY_TRIGGER else on


def launch_options(pdl: bool) -> dict:
    """The Triton launch keyword for ``pdl`` (none when off: the JIT call stays exactly what it was)."""
    return {"launch_pdl": True} if pdl else {}


try:
    import triton
    import triton.language as tl
except ImportError:  # tpfuse without Triton: the launchers that would call this never run
    triton = None

if triton is not None:
    EARLY_C: tl.constexpr = tl.constexpr(EARLY)  # the JIT reads only constexpr globals

    @triton.jit
    def prefetch_l2(ptrs, mask):
        """``prefetch.global.L2`` of the line holding each element of ``ptrs`` where ``mask`` (one instruction per
        element: give one pointer per 128-byte line). Compiled code only (inline PTX: never under the
        interpreter, where PDL is never on)."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def wait(PDL: tl.constexpr):
        """A streaming kernel's first statement (after L2 prefetches): the wait of :func:`enter` alone, or with
        ``PDL == EARLY`` (:func:`stream_mode`) the wait and the trigger right after it, as :func:`enter`."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            if PDL == EARLY_C:
                tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def trigger(PDL: tl.constexpr):
        """A streaming kernel's ``launch_dependents``, after its main loop (module docstring); nothing with
        ``PDL == EARLY`` (it triggered in :func:`wait`)."""
        if PDL and PDL != EARLY_C:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def enter(PDL: tl.constexpr):
        """A PDL kernel's first statement (module docstring); nothing when ``PDL`` is False."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
