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
