"""Where kernel tests run: compiled on a GPU when CUDA is present, else through the Triton interpreter on CPU.

``load(name)`` imports ``tpfuse.kernels.<name>`` (and the shared modules it uses) with ``TRITON_INTERPRET=1`` on a
CPU-only machine: Triton decides interpreted vs compiled when a ``@triton.jit`` function is defined, so the modules
are (re)imported under the variable. Triton reads the variable again at launch, and the public ops take the Triton
path on CPU only with ``TPFUSE_TRITON_CPU=1``: the ``interpreted`` fixture sets both for one test module and
restores them afterwards, so later tests (and the ranks they spawn) are unaffected. GPU runs never set them.
"""

import contextlib
import importlib
import os
import sys

import torch

ON_GPU = torch.cuda.is_available()


def gpu_only(fn):
    """Mark a test ``gpu`` and skip it without CUDA."""
    import pytest

    return pytest.mark.gpu(pytest.mark.skipif(not ON_GPU, reason="needs CUDA")(fn))
DEVICE = "cuda" if ON_GPU else "cpu"
_SHARED = ("quant_epilogue", "add_rmsnorm")
_VARS = {"TRITON_INTERPRET": "1", "TPFUSE_TRITON_CPU": "1"}


@contextlib.contextmanager
def interpreted():
    """Set the interpreter variables (CPU only) for the duration; restore the previous values after."""
    old = {k: os.environ.get(k) for k in _VARS}
    if not ON_GPU:
        os.environ.update(_VARS)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load(name: str):
    if not ON_GPU:
        with interpreted():
            for dep in _SHARED + (name,):
                full = f"tpfuse.kernels.{dep}"
                if full in sys.modules and not getattr(sys.modules[full], "_tpfuse_interpreted", False):
                    importlib.reload(sys.modules[full])
                else:
                    importlib.import_module(full)
                sys.modules[full]._tpfuse_interpreted = True
    return importlib.import_module(f"tpfuse.kernels.{name}")


def run_interpreter_suite(test_file: str, flag: str, min_cases: int) -> None:
    """Run ``test_file``'s ``case_*`` tests through the Triton interpreter in a fresh process (the environment
    variable ``flag`` tells that process it is the inner run) and fail unless they all pass and at least
    ``min_cases`` ran, none skipped."""
    import re
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1", TPFUSE_TRITON_CPU="1", CUDA_VISIBLE_DEVICES="", **{flag: "1"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "case_",
                           os.path.abspath(test_file)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= min_cases, out[-3000:]
    assert "skipped" not in out and "failed" not in out, out[-3000:]


def capture(step):
    """``step()`` once on a side stream (kernels compile outside the capture), then captured in a new CUDA graph,
    which is returned (replay it after writing new inputs into the tensors ``step`` reads)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
