"""Device kernels of tpfuse (installed as ``tpfuse.kernels``).

Kernels are written in Triton (CUDA only where Triton cannot express the op). Every module here imports Triton
lazily or at module import; ``import tpfuse`` never imports this package, so tpfuse works without Triton.
Each kernel module pairs with a launcher (allocation, grid choice) and a public op in ``tpfuse``; the plain-torch
reference that tests compare against lives in :mod:`tpfuse.reference`.
"""
