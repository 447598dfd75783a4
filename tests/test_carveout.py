"""kernels/carveout.py: the preferred shared-memory carveout set on every loaded tpfuse kernel and, through Triton's
load hook, on the ones loaded later; reset to the driver's default. CPU: a recording stand-in for libcuda; GPU
(``gpu`` marker): the attribute read back from the driver and the kernels' results unchanged."""

import pytest
import torch

from kernel_env import ON_GPU
from tpfuse.kernels import carveout


class _FakeCuda:
    def __init__(self):
        self.calls = []

    def cuFuncSetAttribute(self, function, attr, value):  # noqa: N802 - the driver's name
        self.calls.append((function.value, attr.value, value.value))
        return 0


def test_every_kernel_of_the_package_is_found():
    names = {getattr(k, "__name__", None) or k.fn.__name__ for k in carveout.tpfuse_kernels()}
    assert {"_small_m_gemm_kernel", "_rope_split_kernel", "_combine_kernel", "_add_rmsnorm_kernel"} <= names


def test_sets_loaded_and_later_kernels_then_resets(monkeypatch):
    from triton import knobs

    fake = _FakeCuda()
    monkeypatch.setitem(carveout._STATE, "libcuda", fake)
    monkeypatch.setattr(carveout, "loaded_functions", lambda kernels=None: [111, 222])
    seen = []
    monkeypatch.setattr(knobs.runtime, "kernel_load_end_hook", lambda *a: seen.append(a[1]))
    assert carveout.set_carveout(100) == 2
    assert fake.calls == [(111, 9, 100), (222, 9, 100)]
    assert knobs.runtime.kernel_load_end_hook is carveout._on_load
    knobs.runtime.kernel_load_end_hook("module", 333, "k", None, "h")  # a kernel loaded later
    assert fake.calls[-1] == (333, 9, 100) and seen == [333]  # the hook that was there still runs
    assert carveout.set_carveout(None) == 2
    assert fake.calls[-2:] == [(111, 9, -1), (222, 9, -1)]
    assert knobs.runtime.kernel_load_end_hook is not carveout._on_load
    knobs.runtime.kernel_load_end_hook("module", 444, "k", None, "h")
    assert seen == [333, 444] and fake.calls[-1][0] != 444
    with pytest.raises(ValueError, match="0-100"):
        carveout.set_carveout(101)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_carveout_reads_back_and_keeps_the_bits():
    import ctypes

    from tpfuse import small_gemm

    x = torch.randn(3, 4096, device="cuda").to(torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda").to(torch.bfloat16)
    before = small_gemm.small_m_gemm(x, w)
    try:
        assert carveout.set_carveout(100) > 0
        lib = ctypes.CDLL("libcuda.so.1")
        for f in carveout.loaded_functions():
            v = ctypes.c_int()
            assert lib.cuFuncGetAttribute(ctypes.byref(v), ctypes.c_int(9), ctypes.c_void_p(f)) == 0
            assert v.value == 100
        assert torch.equal(small_gemm.small_m_gemm(x, w), before)
    finally:
        carveout.set_carveout(None)
