"""The L2 prefetch of a decode step's next weight (``tpfuse.kernels.l2_prefetch``, ``tpfuse.parallel.prefetch``):
off CUDA a plain block; on a GPU it launches one program a 128 KB, changes no byte, and its side-stream fork / join
captures into a CUDA graph that replays with the same results. The model-level A/B (graph decode with it on equals
it off, bit for bit) is ``tests/distributed/test_model_runtime_gpu.py::test_o_proj_prefetch_decode_same_bits``."""

import types

import pytest
import torch

from tpfuse.errors import TPFuseInputError
from tpfuse.kernels import l2_prefetch as l2
from tpfuse.parallel import KVCacheConfig
from tpfuse.parallel.prefetch import prefetch_o_proj, prefetching

ON_GPU = torch.cuda.is_available()


def test_cpu_block_runs_plainly_and_launches_nothing():
    w = torch.randn(64, 32)
    ran = []
    with prefetching(w):
        ran.append(1)
    with prefetching(w, enabled=False):
        ran.append(2)
    assert ran == [1, 2] and l2.launch_l2_prefetch(w) == 0


def test_only_decode_steps_of_a_cache_with_it_on_prefetch():
    def ctx(decode, on):
        cfg = KVCacheConfig(prefetch_o_proj=on)
        return types.SimpleNamespace(meta=types.SimpleNamespace(decode=decode), storage=types.SimpleNamespace(cfg=cfg))

    assert prefetch_o_proj(ctx(object(), True))
    assert not prefetch_o_proj(ctx(None, True)) and not prefetch_o_proj(ctx(object(), False))
    assert not prefetch_o_proj(types.SimpleNamespace(meta=types.SimpleNamespace(decode=object()), storage=None))


def test_config_rejects_a_non_bool():
    with pytest.raises(TPFuseInputError, match="prefetch_o_proj"):
        KVCacheConfig(prefetch_o_proj=1).validate()
    KVCacheConfig(prefetch_o_proj=True).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (4096, 4096)), (torch.float8_e4m3fn, (1000, 77)),
                                         (torch.bfloat16, (1, 3))], ids=["8B_o", "odd_e4m3", "one_line"])
def test_gpu_prefetch_changes_nothing(dtype, shape, monkeypatch):
    from kernel_env import record_launches

    rec = record_launches(monkeypatch, l2, "_l2_prefetch_kernel")
    w = torch.randn(shape, device="cuda").to(dtype)
    before = w.view(torch.uint8).clone()
    nbytes = w.numel() * w.element_size()
    assert l2.launch_l2_prefetch(w) == -(-nbytes // 128)
    torch.cuda.synchronize()
    assert [grid for grid, _ in rec.launches] == [(-(-nbytes // (128 * l2.LINES)),)]
    assert torch.equal(w.view(torch.uint8), before)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_side_stream_prefetch_captures_and_replays():
    """The fork / join inside a graph capture (as the model's decode graph does): replays give the eager result."""
    w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)

    def step():
        y = x * 2
        with prefetching(w):
            z = y + 1  # stands for the attention the prefetch overlaps
        return z @ w.t()

    expect = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture (compiles)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expect)
