"""Preferred L1 / shared-memory split ("carveout") of tpfuse's compiled Triton kernels: an A/B knob, off.

Why it exists: Nsight Compute on the 8B TP 2 shard's batch-1 decode step (one H100, 1b1ce8a,
``bench/results/ncu_decode_h100_8Btp2_b1_1b1ce8a.json``) shows consecutive kernels of a layer running under
different splits (add + RMSNorm 16 KB of shared memory, the small-M GEMMs and the rope + split attention 233 KB, the
combine 102 KB). An SM changes its split only when it is idle, which can cost programmatic dependent launch the
overlap it is there for. :func:`set_carveout` gives every tpfuse kernel the same preference
(``CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT``, percent of the unified memory as shared memory; -1: the
driver's default): the kernels loaded so far, and through Triton's ``kernel_load_end_hook`` the ones loaded later.
Decode graphs must be captured after a change (``bench_e2e.py --carveout-ab`` drops them, as every variant does).

Not yet run on a GPU (no device time was left when it was written): ``bash bench/gpu_run.sh carveout`` is its A/B.
Contract: the driver call is ``cuFuncSetAttribute`` through ctypes on ``libcuda`` (the attribute of a loaded
``CUfunction``; nothing is allocated or shared); a failing call raises with the CUresult.
"""

from __future__ import annotations

import ctypes
import importlib
import pkgutil

ATTR_PREFERRED_CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
DEFAULT = -1  # CU_SHAREDMEM_CARVEOUT_DEFAULT
_STATE = {"percent": None, "chained": None, "libcuda": None}


def _driver_set(function: int, percent: int) -> None:
    lib = _STATE["libcuda"]
    if lib is None:
        lib = _STATE["libcuda"] = ctypes.CDLL("libcuda.so.1")
    rc = lib.cuFuncSetAttribute(ctypes.c_void_p(function), ctypes.c_int(ATTR_PREFERRED_CARVEOUT),
                                ctypes.c_int(percent))
    if rc != 0:
        raise RuntimeError(f"cuFuncSetAttribute(PREFERRED_SHARED_MEMORY_CARVEOUT, {percent}) failed: CUresult {rc}")


def tpfuse_kernels() -> list:
    """Every Triton kernel of ``tpfuse.kernels`` (module attributes that are JIT functions, or their interpreted
    form under ``TRITON_INTERPRET``, which has no compiled variants)."""
    out = []
    for info in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        mod = importlib.import_module(f"{__package__}.{info.name}")
        out += [v for v in vars(mod).values() if hasattr(v, "arg_names") and hasattr(v, "fn")]
    return out


def loaded_functions(kernels=None) -> list:
    """The ``CUfunction`` handles of the compiled variants of ``kernels`` (default :func:`tpfuse_kernels`) that are
    loaded on some device."""
    out = []
    for k in tpfuse_kernels() if kernels is None else kernels:
        for entry in getattr(k, "device_caches", {}).values():
            out += [c.function for c in entry[0].values() if getattr(c, "function", None)]
    return out


def _on_load(module, function, name, metadata_group, hash_):
    if _STATE["percent"] is not None:
        _driver_set(function, _STATE["percent"])
    if _STATE["chained"] is not None:
        _STATE["chained"](module, function, name, metadata_group, hash_)


def set_carveout(percent) -> int:
    """Prefer ``percent`` (0-100) of the unified L1 / shared memory as shared memory in every tpfuse kernel loaded
    now or later (None: back to the driver's default for the loaded ones, no hook). Returns how many loaded
    kernels it set."""
    from triton import knobs

    if percent is not None and not 0 <= int(percent) <= 100:
        raise ValueError(f"carveout is a percentage 0-100 or None, got {percent}")
    _STATE["percent"] = None if percent is None else int(percent)
    if percent is not None and knobs.runtime.kernel_load_end_hook is not _on_load:
        _STATE["chained"] = knobs.runtime.kernel_load_end_hook
        knobs.runtime.kernel_load_end_hook = _on_load
    elif percent is None and knobs.runtime.kernel_load_end_hook is _on_load:
        knobs.runtime.kernel_load_end_hook, _STATE["chained"] = _STATE["chained"], None
    functions = loaded_functions()
    for f in functions:
        _driver_set(f, DEFAULT if percent is None else int(percent))
    return len(functions)
