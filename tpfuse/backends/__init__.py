"""Path implementations, registered with :func:`tpfuse.dispatch.register` on import.

``reference``: the plain-torch oracle (always available). ``nccl``: native-dtype NCCL collectives plus the local
stage (NCCL groups only). GPU kernel paths (symmetric memory, FlashInfer) register from their own modules and import
CUDA, Triton or FlashInfer lazily, so importing this package never needs them.
"""

from . import reference  # noqa: F401
from . import async_tp  # noqa: F401
from . import symm  # noqa: F401
from . import flashinfer  # noqa: F401  (imports FlashInfer itself only when a communicator uses it)
