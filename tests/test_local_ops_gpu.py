"""GPU only: the local ops together (add + RMSNorm with FP8 / NVFP4 output, SiLU * mul with per-group FP8) in one
CUDA graph replayed with new inputs and device-side scales, and under ``torch.compile(fullgraph=True)`` (in-place
residual included)."""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, capture
from local_cases import as_bytes, randn
from tpfuse import ops
from tpfuse import quant as q

pytestmark = pytest.mark.usefixtures("kernels", "poisoned_outputs")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
class TestGPU:
    def test_cuda_graph_capture_replay(self, gen):
        t, h, inter = 64, 4096, 1024
        x, r, w = (randn(gen, t, h, dtype=torch.bfloat16), randn(gen, t, h, dtype=torch.bfloat16),
                   randn(gen, h, dtype=torch.bfloat16))
        gu = randn(gen, t, 2 * inter, dtype=torch.bfloat16)
        scale = torch.tensor(0.05, device=DEVICE)
        gs = torch.tensor(100.0, device=DEVICE)

        def step():
            out, res = ops.add_rmsnorm(x, r, w, 1e-6, quant=q.FP8Static(scale))
            out2, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=q.NVFP4(gs))
            a = ops.silu_mul(gu, quant=q.FP8PerGroup(128))
            return out.data, res, out2.data, out2.scale, a.data, a.scale

        g, outs = capture(step)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            gu.copy_(torch.randn_like(gu))
            scale.fill_(0.07)  # read on device: replay must see it
            g.replay()
            torch.cuda.synchronize()
            expect = step()
            for a, b in zip(outs, expect):
                assert torch.equal(as_bytes(a), as_bytes(b))

    def test_number_scales_follow_the_op_to_the_gpu(self, gen):
        # FP8Static(0.05) / NVFP4(100.0): a Python number, placed on the op's device at the first call
        x, r, w = (randn(gen, 8, 256, dtype=torch.bfloat16), randn(gen, 8, 256, dtype=torch.bfloat16),
                   randn(gen, 256, dtype=torch.bfloat16))
        for number, make in ((0.05, q.FP8Static), (100.0, q.NVFP4)):
            got, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=make(number))
            expect, _ = ops.add_rmsnorm(x, r, w, 1e-6, quant=make(torch.tensor(number, device=DEVICE)))
            assert torch.equal(as_bytes(got.data), as_bytes(expect.data))
            assert torch.equal(as_bytes(got.scale), as_bytes(expect.scale))

    def test_torch_compile_fullgraph(self, gen):
        t, h, inter = 16, 4096, 512
        x, r, w = (randn(gen, t, h, dtype=torch.bfloat16), randn(gen, t, h, dtype=torch.bfloat16),
                   randn(gen, h, dtype=torch.bfloat16))
        w_up = randn(gen, 2 * inter, h, dtype=torch.bfloat16, scale=0.02)
        scale = torch.tensor(0.02, device=DEVICE)

        def block(x, r):
            y, r2 = ops.add_rmsnorm(x, r, w, 1e-6)
            a = ops.silu_mul(y @ w_up.t(), quant=q.FP8Static(scale))
            return a.data, r2

        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)
        got, expect = compiled(x, r), block(x, r)
        assert torch.equal(as_bytes(got[1]), as_bytes(expect[1]))
        diff = (as_bytes(got[0]) != as_bytes(expect[0])).float().mean().item()
        assert diff <= 0.01
        # in-place residual under compile
        def block_inplace(x, r):
            y, _ = ops.add_rmsnorm(x, r, w, 1e-6, residual_inplace=True)
            return y
        r_a, r_b = r.clone(), r.clone()
        ya = torch.compile(block_inplace, fullgraph=True)(x, r_a)
        yb = block_inplace(x, r_b)
        assert torch.equal(r_a, r_b) and torch.equal(ya, yb)
