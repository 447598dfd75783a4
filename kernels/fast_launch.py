"""Eager launches of the local kernels without Triton's per-call specialization work.

``kernel[grid](*args, **consts)`` (``JITFunction.run`` in Triton 3.6) binds the arguments, specializes every one
of them (dtype and 16-byte alignment of pointers, divisibility by 16 / equality to 1 / integer width of ints),
builds a string cache key, looks the ``CompiledKernel`` up, checks the kernel's globals and then calls the
compiled kernel's launcher. On a small decode-sized call that bookkeeping costs several times the launcher itself.

:func:`launch` keeps, per kernel and per *fingerprint* of a call, the ``CompiledKernel`` that the normal JIT call
returned the first time, and launches it directly on later calls with the same fingerprint (the same launcher
call ``JITFunction.run`` makes: grid, current stream, function handle, packed metadata, every argument in
signature order, constexprs included). The fingerprint is at least as fine as Triton's specialization key:

* pointers (tensors): dtype and ``data_ptr() % 16 == 0``;
* ints: the exact value (which fixes Triton's ``== 1`` / ``% 16`` / width specialization), except the
  arguments in the kernel's ``do_not_specialize`` list, which contribute only their integer width class;
* floats: nothing (Triton never specializes a runtime float: always ``fp32``);
* the constexprs' values, ``num_warps``, ``num_stages``, the current CUDA device and the debug /
  instrumentation knobs.

Any other argument type, a kernel that is not a plain ``JITFunction`` (interpreter, a test's recorder) or pre-run
hooks send the call down the normal JIT path, as does every first call of a fingerprint; launch hooks (profilers)
get the same launch metadata and calls as from the JIT. ``TPFUSE_FAST_LAUNCH=0`` (read at import) or ``ENABLED = False`` turns the direct path off. What is
skipped: the JIT's check that the kernel's global variables did not change since it compiled (tpfuse's kernels
read only module constants).
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("TPFUSE_FAST_LAUNCH", "1") != "0"

_I32 = (-(1 << 31), (1 << 31) - 1)
_I64_MAX = (1 << 63) - 1
_Tensor = torch.Tensor
_CACHE_ATTR = "_tpfuse_compiled"
_MAX_ENTRIES = 4096
_KERNELS: list = []  # kernels that hold a cache (for clear())
STATS = {"direct": 0, "first_call": 0, "not_jit": 0, "pre_run_hooks": 0, "uncacheable_args": 0}
"""How calls went (benchmarks print it): launched directly, or through the JIT and why."""

_rt = None          # triton.knobs.runtime / compilation, JITFunction, the driver's stream getter (lazily: import
_comp = None        # tpfuse never imports Triton, and the driver is only resolved on a GPU)
_JIT = None
_stream = None


def _init():
    global _rt, _comp, _JIT
    from triton import knobs
    from triton.runtime.jit import JITFunction

    _rt, _comp, _JIT = knobs.runtime, knobs.compilation, JITFunction


def fingerprint(args, nospec=()) -> tuple | None:
    """The per-argument part of the cache key (see the module docstring), or None when an argument's type is not
    one this module knows how Triton specializes. ``nospec``: indices of ``do_not_specialize`` arguments."""
    key = []
    app = key.append
    for i, a in enumerate(args):
        tp = type(a)
        if tp is int:
            if i in nospec:
                app(0 if _I32[0] <= a <= _I32[1] else (1 if a <= _I64_MAX else 2))
            else:
                app(a)
        elif tp is float:
            app(None)
        elif isinstance(a, _Tensor):
            app(a.dtype)
            app(a.data_ptr() % 16 == 0)
        else:
            return None
    return tuple(key)


def launch(kernel, grid, args: tuple, consts: dict, num_warps: int, num_stages: int | None = None,
           pdl: bool = False) -> None:
    """``kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)``, through the cached
    ``CompiledKernel`` when this call's fingerprint was launched before. ``args``: the runtime arguments in
    signature order; ``consts``: the constexprs by name, in signature order after ``args``; ``num_stages=None``
    leaves it out of the JIT call (Triton's default), as the launchers always did for the RoPE kernels. ``pdl``:
    launch with programmatic dependent launch (``launch_pdl=True``, :mod:`.pdl`; a compile option of its own, so
    part of the cache key)."""
    if ENABLED:
        if _rt is None:
            _init()
        if type(kernel) is not _JIT:
            STATS["not_jit"] += 1
        elif kernel.pre_run_hooks:
            STATS["pre_run_hooks"] += 1
        else:
            state = getattr(kernel, _CACHE_ATTR, None)
            if state is None:
                state = _state(kernel)
            key = key_for(state[0], args, consts, num_warps, num_stages, pdl)
            if key is not None:
                cache = state[1]
                hit = cache.get(key)
                if hit is not None:
                    _direct(hit, grid, key[0], args, consts)
                    return
                STATS["first_call"] += 1
                compiled = _jit(kernel, grid, args, consts, num_warps, num_stages, pdl)
                _remember(kernel, cache, key, compiled, len(args), consts)
                return
            STATS["uncacheable_args"] += 1
    _jit(kernel, grid, args, consts, num_warps, num_stages, pdl)


def _direct(hit, grid, device, args, consts) -> None:
    """The launcher call ``JITFunction.run`` makes, launch hooks (profilers) and their metadata included."""
    run, function, meta, compiled = hit
    n = len(grid)
    g0, g1, g2 = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
    stream = _stream(device)
    enter, leave = _rt.launch_enter_hook, _rt.launch_exit_hook
    hooked = enter is not None or leave is not None
    launch_meta = compiled.launch_metadata(grid, stream, *args, *consts.values()) if hooked else None
    run(g0, g1, g2, stream, function, meta, launch_meta, enter, leave, *args, *consts.values())
    STATS["direct"] += 1

def key_for(nospec, args, consts, num_warps, num_stages, pdl=False):
    """The cache key of one call (None: not cacheable): current device, debug knobs, launch options, constexprs
    and :func:`fingerprint`."""
    fp = fingerprint(args, nospec)
    if fp is None:
        return None
    return (torch.cuda.current_device(), _rt.debug, _comp.instrumentation_mode, num_warps, num_stages, bool(pdl),
            tuple(consts.values()), fp)


def _jit(kernel, grid, args, consts, num_warps, num_stages, pdl=False):
    """The normal Triton call (also what a test's recorder / the interpreter sees: constexprs by keyword; the PDL
    launch option only when on)."""
    opts = {"launch_pdl": True} if pdl else {}
    if num_stages is None:
        return kernel[grid](*args, **consts, num_warps=num_warps, **opts)
    return kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages, **opts)


def _state(kernel):
    """``(nospec, cache)`` of a kernel: the indices of its ``do_not_specialize`` parameters (from Triton's own
    parameter records) and its ``{key: (launcher, function, packed metadata, CompiledKernel)}``."""
    nospec = frozenset(p.num for p in kernel.params if p.do_not_specialize)
    state = (nospec, {})
    setattr(kernel, _CACHE_ATTR, state)
    _KERNELS.append(kernel)
    return state


def _remember(kernel, cache, key, compiled, n_args, consts) -> None:
    global _stream
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return
    # the direct call passes constexprs positionally: they must be exactly the parameters after ``args``
    if list(consts) != list(kernel.arg_names[n_args:]):
        return
    if _stream is None:
        from triton.runtime import driver

        _stream = driver.active.get_current_stream
    if len(cache) >= _MAX_ENTRIES:
        cache.clear()
    cache[key] = (compiled.run, compiled.function, compiled.packed_metadata, compiled)


def clear(kernel=None) -> None:
    """Forget the cached compiled kernels (of one kernel, or of every kernel launched through here)."""
    for k in ([kernel] if kernel is not None else _KERNELS):
        state = getattr(k, _CACHE_ATTR, None)
        if state is not None:
            state[1].clear()


def cached_kernels(kernel) -> dict:
    """``{key: (launcher, function, packed metadata, CompiledKernel)}`` of one kernel (tests)."""
    state = getattr(kernel, _CACHE_ATTR, None)
    return {} if state is None else state[1]
