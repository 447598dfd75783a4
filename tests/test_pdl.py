"""Programmatic dependent launch (``tpfuse.kernels.pdl``) on CPU: when it is on, and that every launcher of a kernel
that takes ``PDL`` passes the constexpr and Triton's ``launch_pdl`` together, inside ``pdl.launches`` only. The
kernels themselves are stubbed (the recorder below never launches): their PDL variants compile for sm_90 in
tests/sm90_compile_cases.py (``<case> pdl``), and the GPU test is
tests/distributed/test_small_m_model.py::test_graph_decode_through_the_kernel_and_with_pdl_matches_the_oracle."""

import pytest
import torch

from tpfuse.errors import TPFuseInputError


class _Stub:
    """Stands in for a kernel: records the launch keywords, launches nothing."""

    def __init__(self):
        self.kw = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kw.append(kw)


def _stub(monkeypatch, module, name):
    stub = _Stub()
    monkeypatch.setattr(module, name, stub)
    return stub


def _launch_all(monkeypatch):
    """Every PDL-taking launcher once on small CPU tensors, kernels stubbed; returns ``{kernel name: [kw, ...]}``."""
    from tpfuse.kernels import (add_rmsnorm, decode_attention, quantize, rope, silu_mul, small_m_configs,
                                small_m_gemm)
    from tpfuse.quant import QuantFormat

    s = {n: _stub(monkeypatch, m, n) for m, n in (
        (add_rmsnorm, "_add_rmsnorm_kernel"), (silu_mul, "_silu_mul_kernel"), (quantize, "_quantize_kernel"),
        (rope, "_qk_norm_rope_kernel"), (rope, "_rope_kv_cache_kernel"), (decode_attention, "_split_kernel"),
        (decode_attention, "_combine_kernel"), (small_m_gemm, "_small_m_gemm_kernel"),
        (small_m_gemm, "_split_k_reduce_kernel"), (small_m_gemm, "_small_m_gemm_norm_kernel"),
        (small_m_gemm, "_split_k_reduce_add_kernel"), (small_m_gemm, "_small_m_gemm_serial_kernel"),
        (quantize, "_quantize_amax_kernel"))}
    bf = torch.bfloat16
    x, w = torch.zeros(4, 64, dtype=bf), torch.ones(64, dtype=bf)
    add_rmsnorm.launch_add_rmsnorm(x, x.clone(), w, 1e-6, x.clone(), x.clone(), x, None, QuantFormat.NONE, 16, False)
    silu_mul.launch_silu_mul(torch.zeros(4, 128, dtype=bf), x.clone(), x, None, QuantFormat.NONE, 16)
    fp8 = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
    quantize.launch_quantize(x, fp8, torch.zeros(4, 1), None, QuantFormat.FP8_PER_TOKEN, 16)
    quantize.launch_quantize_from_amax(x, torch.ones(2, 4), fp8.clone(), torch.zeros(4, 1))
    pos, cs = torch.zeros(4, dtype=torch.int64), torch.zeros(64, 32)
    rope.launch_qk_norm_rope(torch.zeros(4, 6 * 32, dtype=bf), w[:32], w[:32], cs, pos, 4, 1, 32, 1e-6, True, False)
    q, k = torch.zeros(4, 4, 32, dtype=bf), torch.zeros(4, 1, 32, dtype=bf)
    cache = torch.zeros(2, 16, 1, 32, dtype=bf)
    rope.launch_rope_kv_cache_write(q, k, k.clone(), pos, cs, cache, cache.clone(), pos, True, None)
    decode_attention.launch_decode_attention(q, cache, cache.clone(), torch.zeros(4, 2, dtype=torch.int32),
                                             torch.full((4,), 20, dtype=torch.int32), q.clone(), 0.1,
                                             max_seq_len=32, num_splits=2)
    for serial in (True, False):  # split-K reduced in the GEMM's last programs, or by the reduce kernel
        monkeypatch.setattr(small_m_gemm, "SERIAL", serial)
        small_m_gemm.launch_small_m_gemm(torch.zeros(4, 1024, dtype=bf), torch.zeros(64, 1024, dtype=bf), None,
                                         None, None, x.clone(), None, False, "bf16", "cpu", 132,
                                         config=small_m_configs.GemmConfig(split_k=2))
    h = torch.zeros(4, 64, dtype=bf)  # the folded RMSNorm's producer (ADD_RES), split-K: + its reduce
    small_m_gemm.launch_small_m_gemm(torch.zeros(4, 1024, dtype=bf), torch.zeros(64, 1024, dtype=bf), None, None,
                                     None, h, None, False, "bf16", "cpu", 132,
                                     config=small_m_configs.GemmConfig(split_k=2),
                                     add=(h.clone(), w, h.clone(), torch.zeros(2, 4)))
    return {n: stub.kw for n, stub in s.items()}


STREAMING = {"_split_kernel", "_small_m_gemm_kernel", "_small_m_gemm_norm_kernel", "_small_m_gemm_serial_kernel"}
"""The kernels whose trigger follows their main loop (``pdl.wait`` / ``pdl.trigger``; :data:`pdl.EARLY_TRIGGER`)."""


@pytest.mark.parametrize("on,early", [(False, False), (True, False), (False, True), (True, True)])
def test_every_launcher_passes_pdl_with_its_launch_option(monkeypatch, on, early):
    """``PDL`` is the launch option's bool, but :data:`pdl.EARLY` for the streaming kernels with PDL on and
    ``EARLY_TRIGGER`` (never without PDL)."""
    from tpfuse.kernels import fast_launch, pdl

    monkeypatch.setattr(fast_launch, "ENABLED", False)  # the JIT-style call: what a kernel object receives
    monkeypatch.setattr(pdl, "wanted", lambda t: on)  # CPU tensors: pretend an sm_90 device inside launches()
    monkeypatch.setattr(pdl, "EARLY_TRIGGER", early)
    launched = _launch_all(monkeypatch)
    for name, kws in launched.items():
        assert len(kws) == 1, (name, kws)
        kw = kws[0]
        want = pdl.EARLY if (on and early and name in STREAMING) else on
        assert kw["PDL"] == want and type(kw["PDL"]) is type(want), (name, kw, want)
        assert kw.get("launch_pdl", False) is on, (name, kw)  # the option only when on: the JIT call as before


def test_pdl_is_wanted_only_inside_launches_on_a_cuda_device():
    from tpfuse.kernels import pdl

    t = torch.zeros(1)
    assert not pdl.wanted(t)
    with pdl.launches(True):
        assert not pdl.wanted(t)  # CPU tensors never (the interpreter has no griddepcontrol)
        with pdl.launches(False):
            assert not pdl._ON[0]
        assert pdl._ON[0]
    assert not pdl._ON[0]
    assert pdl.launch_options(True) == {"launch_pdl": True} and pdl.launch_options(False) == {}


def test_pdl_needs_a_stack_that_has_it(monkeypatch):
    """PDL is on by default, so a stack without it must turn it off, not fail at capture: ROCm, a CUDA runtime
    before 12.3, a CPU-only build or a Triton without the griddepcontrol intrinsics."""
    from tpfuse.kernels import pdl

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert pdl.stack_has_pdl()  # Triton 3.6 (the test pin) has gdc_wait / gdc_launch_dependents
    for cuda in ("12.2", "11.8", None, "unknown"):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        assert not pdl.stack_has_pdl(), cuda
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not pdl.stack_has_pdl()
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delattr(pdl.tl.extra.cuda, "gdc_wait")  # a Triton before 3.3
    assert not pdl.stack_has_pdl()


def test_kv_cache_config_pdl_is_a_bool():
    from tpfuse.parallel import KVCacheConfig

    KVCacheConfig(pdl=False).validate()
    assert KVCacheConfig().pdl is True  # on since the end-to-end A/B (e2e_tp1_h100_ab_4dbc35c.json)
    from tpfuse.kernels import decode_attention, small_m_gemm

    assert small_m_gemm.PREFETCH_BYTES == 0 and decode_attention.PREFETCH is False  # the prefetches did not pay
    with pytest.raises(TPFuseInputError, match="pdl must be a bool"):
        KVCacheConfig(pdl=1).validate()


def test_small_m_gemm_prefetch_lines_follow_the_budget(monkeypatch):
    """The PDL launch's L2 prefetch per weight row: the budget spread over the rows, within one program's K range,
    a power of two, capped by lines and pointers; PREFETCH_BYTES = 0 turns it off."""
    from tpfuse.kernels import small_m_gemm as smg

    monkeypatch.setattr(smg, "PREFETCH_BYTES", 16 << 20)
    assert smg.prefetch_lines(6144, 4096, 1, 2, 32) == 16  # 8B qkv: 2730 B a row -> 21 lines -> 16
    assert smg.prefetch_lines(28672, 4096, 1, 2, 64) == 4  # gate_up: 585 B a row
    assert smg.prefetch_lines(4096, 14336, 1, 2, 32) == smg.MAX_PF_LINES  # down: 4 KB a row, capped
    assert smg.prefetch_lines(4096, 14336, 1, 1, 256) == smg.MAX_PF_POINTERS // 256  # pointer cap
    assert smg.prefetch_lines(1024, 512, 4, 2, 64) == 2  # the program's K range: 128 elements = 256 B
    assert smg.prefetch_lines(1 << 20, 4096, 1, 2, 64) == 0  # under one line a row
    monkeypatch.setattr(smg, "PREFETCH_BYTES", 0)
    monkeypatch.setattr(smg, "PREFETCH_MAX_M", 0)
    assert smg.prefetch_lines(6144, 4096, 1, 2, 32) == 0
    monkeypatch.setattr(smg, "PREFETCH_MAX_M", 1)  # the rule: PREFETCH_SMALL_BYTES at M <= PREFETCH_MAX_M
    assert smg.prefetch_lines(6144, 4096, 1, 2, 32, 1) == 1 and smg.prefetch_lines(6144, 4096, 1, 2, 32, 2) == 0
    assert smg.prefetch_lines(1280, 8192, 1, 2, 32, 1) == 4  # the 70B TP 8 rank's qkv: 819 B a row
    assert smg.prefetch_lines(28672, 4096, 1, 2, 64, 1) == 0  # the 8B's gate-up: 36 B a row


def test_available_says_whether_pdl_runs_on_a_device(monkeypatch):
    """What the benchmarks record beside the PDL they asked for: never on CPU; on CUDA where the device and stack
    have it."""
    from tpfuse.kernels import pdl

    assert not pdl.available(torch.device("cpu"))
    monkeypatch.setattr(pdl, "_has_pdl", lambda index: index == 0)
    assert pdl.available(torch.device("cuda", 0)) and not pdl.available(torch.device("cuda", 1))
