"""Where kernel tests run: compiled on a GPU when CUDA is present, else through the Triton interpreter on CPU.

The one interpreter mechanism of the suite. Triton decides interpreted vs compiled when a ``@triton.jit`` function
is defined (its own ``tl.sum`` & co. when ``triton.language`` is imported; an interpreted kernel cannot call a
compiled-mode library function), and ``kernels/quant_epilogue.py`` reads ``SOFT_CAST`` from the environment at
import. So on a CPU-only machine :func:`prepare` imports Triton and every kernel module once, under
``TRITON_INTERPRET=1``, before any test module is collected (``tests/conftest.py`` calls it at import), and
restores the environment afterwards: later imports of ``triton`` anywhere in the process find the interpreted
library, and ranks spawned by the multi-rank harness start without the variable. GPU machines import nothing here.

Contracts:

* :func:`kernels` returns the kernel modules (interpreted on CPU, asserted); the ``kernels`` fixture of
  ``tests/conftest.py`` hands them to a test and sets ``TRITON_INTERPRET=1`` (Triton reads it again at launch) and
  ``TPFUSE_TRITON_CPU=1`` (the public ops take the Triton path on CPU tensors) for that test only.
* :func:`jit` is ``triton.jit`` for a test's own kernels: interpreted on CPU, compiled on a GPU.
* :func:`clean_env` is the environment for a subprocess that must compile for a real GPU target (no interpreter).
* :func:`poisoned` makes a tensor of 0xFF bytes (NaN in bf16, fp16, fp32 and e4m3fn) for outputs a kernel must
  overwrite or leave alone.
* :func:`record_launches` records a kernel's launches (grid, keyword arguments) and launches it.
* :func:`capture` records a CUDA graph of a step; :func:`gpu_only` marks a test ``gpu`` and skips it without CUDA.
"""

import contextlib
import importlib
import os
import sys
import types

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# dependency order: a module that imports another's @jit functions by name is imported after it
KERNEL_MODULES = ("pdl", "quant_epilogue", "signals", "add_rmsnorm", "quantize", "silu_mul", "reduce_slots", "rope",
                  "small_m_gemm", "attn_o_gemm",
                  "decode_attention", "fused_allreduce")
INTERPRETER_VARS = {"TRITON_INTERPRET": "1", "TPFUSE_TRITON_CPU": "1"}
POISON = 0xFF  # NaN in bf16, fp16, fp32 and e4m3fn


def gpu_only(fn):
    """Mark a test ``gpu`` and skip it without CUDA."""
    import pytest

    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs CUDA")(fn))


@contextlib.contextmanager
def interpreted():
    """Set the interpreter variables (CPU only) for the duration; restore the previous values after."""
    old = {k: os.environ.get(k) for k in INTERPRETER_VARS}
    if not ON_GPU:
        os.environ.update(INTERPRETER_VARS)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def prepare() -> None:
    """CPU only, once per process: import ``triton.language`` and the kernel modules under the interpreter. Fails
    if Triton was already imported in compiled mode (its library functions cannot be re-made)."""
    if ON_GPU or getattr(sys.modules.get("tpfuse.kernels.quant_epilogue"), "_tpfuse_interpreted", False):
        return
    with interpreted():
        import triton.language as tl

        assert _is_interpreted(tl.sum), "triton was imported without TRITON_INTERPRET before tests/conftest.py ran"
        for name in KERNEL_MODULES:
            full = f"tpfuse.kernels.{name}"
            mod = importlib.reload(sys.modules[full]) if full in sys.modules else importlib.import_module(full)
            mod._tpfuse_interpreted = True


def kernels() -> types.SimpleNamespace:
    """The kernel modules by short name (``kernels().rope``); on CPU checked to be the interpreted ones."""
    prepare()
    mods = {name: importlib.import_module(f"tpfuse.kernels.{name}") for name in KERNEL_MODULES}
    if not ON_GPU:
        assert _is_interpreted(mods["add_rmsnorm"]._add_rmsnorm_kernel), "kernel modules are not interpreted"
    return types.SimpleNamespace(**mods)


def jit(fn):
    """``triton.jit`` for a kernel defined in a test: interpreted on CPU (like the kernel modules), compiled on a
    GPU. Define such kernels at module level (Triton compiles them from their source)."""
    import triton

    with interpreted():
        return triton.jit(fn)


def clean_env() -> dict:
    """This process's environment without the interpreter variables: for a subprocess that compiles for a real
    GPU target offline (Triton's compiler runs on the CPU)."""
    return {k: v for k, v in os.environ.items() if k not in INTERPRETER_VARS}


def poisoned(shape, dtype, device="cpu"):
    """A ``dtype`` tensor of ``shape`` whose every byte is :data:`POISON`."""
    shape = tuple(shape)
    nbytes = shape[:-1] + (shape[-1] * dtype.itemsize,)
    return torch.full(nbytes, POISON, dtype=torch.uint8, device=device).view(dtype)


class LaunchRecorder:
    """Stands in for a kernel object: records (grid, constexpr / launch keyword args) and launches the real one."""

    def __init__(self, kernel, launches=None):
        self.kernel, self.launches = kernel, [] if launches is None else launches

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.launches.append((tuple(grid), dict(kw)))
            return self.kernel[grid](*args, **kw)
        return run


def record_launches(monkeypatch, module, kernel_name, launches=None):
    """Replace ``module.<kernel_name>`` by a :class:`LaunchRecorder` for the test; return the recorder. Recorders
    given one ``launches`` list record into it in launch order."""
    rec = LaunchRecorder(getattr(module, kernel_name), launches)
    monkeypatch.setattr(module, kernel_name, rec)
    return rec


def capture(step):
    """``step()`` once on a side stream (kernels compile outside the capture), then captured in a new CUDA graph.
    Returns ``(graph, outputs of the captured step())``: replay the graph after writing new inputs into the
    tensors ``step`` reads; the captured outputs hold each replay's results."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs
