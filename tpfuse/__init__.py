"""tpfuse: fused communication + compute for tensor-parallel LLM inference.

``import tpfuse`` needs only torch: CUDA, Triton and FlashInfer are imported lazily by the paths that use them.
"""

import os as _os

# kernels/ sits beside tpfuse/ in the repository and installs as tpfuse.kernels. When tpfuse is imported straight
# from a checkout (`python -m tpfuse.demo` in the repo root, PYTHONPATH=repo), let `tpfuse.kernels` resolve to that
# directory too, so source-tree and installed runs import the same kernels.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_here, "..", "kernels", "__init__.py")):
    __path__.append(_os.path.dirname(_here))  # noqa: F821 (package __path__)

from . import attention, quant, sharding, tolerance  # noqa: E402,F401
from .communicator import TPCommunicator, detect_arch
from .config import CommConfig
from .dispatch import OpChoice, Plan
from .distributed import init_distributed
from .errors import (TPFuseClosedError, TPFuseError, TPFuseInputError, TPFuseMismatchError, TPFusePeerError,
                     TPFusePeerTimeout, ThresholdsError)
from .ops import add_rmsnorm, quantize, silu_mul
from .rope import qk_norm_rope, rope_kv_cache_write
from .quant import FP8PerGroup, FP8PerToken, FP8Static, NVFP4, QuantizedActivation

__version__ = "0.1.0"

_LAZY = {"parallelize": "tpfuse.parallel", "TPLayout": "tpfuse.parallel", "parallel": "tpfuse.parallel",
         "TPPlan": "tpfuse.parallel"}  # TPPlan: deprecated (tpfuse.parallel warns)


def __getattr__(name):
    # lazy: tpfuse.parallel is only imported on first use (it never imports transformers either)
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(_LAZY[name])
        return mod if name == "parallel" else getattr(mod, name)
    raise AttributeError(f"module 'tpfuse' has no attribute {name!r}")

__all__ = [
    "TPCommunicator", "CommConfig", "Plan", "OpChoice", "init_distributed", "detect_arch",
    "FP8Static", "FP8PerToken", "FP8PerGroup", "NVFP4", "QuantizedActivation",
    "add_rmsnorm", "silu_mul", "quantize", "qk_norm_rope", "rope_kv_cache_write", "parallelize", "TPLayout",
    "TPFuseError", "TPFuseInputError", "TPFuseMismatchError", "TPFuseClosedError", "TPFusePeerError",
    "TPFusePeerTimeout", "ThresholdsError",
]
