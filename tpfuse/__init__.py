"""tpfuse: fused communication + compute for tensor-parallel LLM inference.

``import tpfuse`` needs only torch: CUDA, Triton and FlashInfer are imported lazily by the paths that use them.
"""

from . import quant, sharding, tolerance  # noqa: F401
from .communicator import TPCommunicator, detect_arch
from .config import CommConfig
from .dispatch import OpChoice, Plan
from .distributed import init_distributed
from .errors import (TPFuseClosedError, TPFuseError, TPFuseInputError, TPFuseMismatchError, TPFusePeerTimeout)
from .ops import add_rmsnorm, silu_mul
from .quant import FP8PerGroup, FP8PerToken, FP8Static, NVFP4, QuantizedActivation

__version__ = "0.1.0"

__all__ = [
    "TPCommunicator", "CommConfig", "Plan", "OpChoice", "init_distributed", "detect_arch",
    "FP8Static", "FP8PerToken", "FP8PerGroup", "NVFP4", "QuantizedActivation",
    "add_rmsnorm", "silu_mul",
    "TPFuseError", "TPFuseInputError", "TPFuseMismatchError", "TPFuseClosedError", "TPFusePeerTimeout",
]
