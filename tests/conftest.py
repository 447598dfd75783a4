"""Suite-wide setup: the test folders on ``sys.path`` (spawned ranks import by basename), the Triton interpreter
prepared once on a CPU-only machine (tests/kernel_env.py), the rank pools shut down at the end, and the fixtures
shared across files (``gen``, ``kernels``, ``poisoned_outputs``, ``poisoned_small_m``)."""

import os
import sys

import pytest

# the harness and the test modules are imported by basename in spawned ranks too (spawn copies sys.path)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
sys.path.insert(0, os.path.dirname(__file__))

import kernel_env  # noqa: E402

# before any test module is collected: Triton and the kernel modules interpreted on a CPU-only machine
kernel_env.prepare()


def pytest_sessionfinish(session, exitstatus):
    from harness import shutdown_pools

    shutdown_pools()


@pytest.fixture
def gen():
    """A fresh, seeded generator per test (random data every test, reproducible runs)."""
    import torch

    return torch.Generator().manual_seed(1234)


@pytest.fixture
def kernels(monkeypatch):
    """The kernel modules (``kernels.add_rmsnorm`` ...) for a test that runs Triton kernels: compiled on a GPU; on a
    CPU-only machine interpreted, with ``TRITON_INTERPRET=1`` and ``TPFUSE_TRITON_CPU=1`` set for this test only
    (the public ops then take the Triton path on CPU tensors). See tests/kernel_env.py."""
    if not kernel_env.ON_GPU:
        for name, value in kernel_env.INTERPRETER_VARS.items():
            monkeypatch.setenv(name, value)
    return kernel_env.kernels()


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every output buffer the local ops allocate is filled with 0xFF bytes first (tests/local_cases.py)."""
    from local_cases import poison_outputs

    poison_outputs(monkeypatch)


@pytest.fixture
def poisoned_small_m(monkeypatch):
    """The small-M GEMM's outputs start as NaN, so unwritten elements show: ``tpfuse.small_gemm.alloc_out`` (its
    outputs) and ``torch.empty`` as that module calls it (the partial sums / maxima)."""
    import torch

    from tpfuse import small_gemm

    alloc, empty = small_gemm.alloc_out, torch.empty

    def poisoned_alloc(*args):
        return alloc(*args).fill_(float("nan"))

    def poisoned_empty(*args, **kw):
        t = empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(small_gemm, "alloc_out", poisoned_alloc)
    monkeypatch.setattr(small_gemm.torch, "empty", poisoned_empty)
