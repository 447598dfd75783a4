"""Path implementations, registered with :func:`tpfuse.dispatch.register` on import.

``reference``: the plain-torch oracle (always available). ``nccl``: native-dtype NCCL collectives plus the local
stage (NCCL groups only). GPU kernel paths (:mod:`.fused_allreduce`: tpfuse's fused all-reduce kernels over
symmetric memory; :mod:`.async_tp`: sequence parallelism and async-TP GEMMs; :mod:`.flashinfer`: FlashInfer's
fused all-reduce) register from their own modules and import CUDA, Triton or FlashInfer lazily, so importing this
package never needs them.

A backend is one module: its paths (``register(op, path, available, declines_to)``) and, if it needs device
state, one workspace allocator (:func:`.base.register_workspace`; the :class:`.base.Workspace` protocol). Adding
one means writing that module, importing it below and naming its paths in :data:`tpfuse.dispatch.PATH_DOCS`.
The import order is the order workspaces are allocated in (and released in reverse).
"""

from . import reference  # noqa: F401
from . import async_tp  # noqa: F401
from . import fused_allreduce  # noqa: F401
from . import flashinfer  # noqa: F401  (imports FlashInfer itself only when a communicator uses it)
