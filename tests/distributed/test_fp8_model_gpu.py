"""GPU: FP8 models on tpfuse's CUDA kernels and ``torch._scaled_mm`` (TP=1 over NCCL; the model test also at the
GPU suite's TP sizes, ``cases.GPU_TPS``, on NCCL or in one-GPU mode).

* the GEMM path alone: per-token FP8 activations out of the fused add + RMSNorm (local and communicator forms)
  and SiLU-mul kernels, straight into ``scaled_gemm.mm`` with per-channel e4m3 weights, vs the fp64 oracle;
* the FP8 model (real head shapes, ``quantize_fp8``): CUDA-graph decode vs the same steps eager vs the fp64
  oracle of the converted model (e4m3 weights dequantized), every decoder GEMM on ``torch._scaled_mm``;
* greedy agreement of the FP8 tiny model with the bf16 one (>= 90% of 64 steps, teacher-forced);
* ``from_pretrained`` of bf16 and compressed-tensors FP8 checkpoints onto the GPU == the CPU shards.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from harness import run_on_ranks  # noqa: E402
from cases import run_gpu  # noqa: E402
from test_model_runtime_gpu import SHAPE, TPS, _decode_run, make_comm  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DT = torch.bfloat16


def _gemm_path(rank, world):
    import tpfuse
    from tpfuse import ops, scaled_gemm
    from tpfuse.parallel import FP8Scheme
    from tpfuse.parallel.fp8 import from_linear
    from tpfuse.tolerance import REL_ERR_FP8, assert_quant_close, rel_err

    g = torch.Generator(device="cuda").manual_seed(0)
    t, h, n, inter = 77, 1024, 2816, 1536
    comm = tpfuse.TPCommunicator(max_tokens=256, hidden_size=h, dtype=DT)
    x, res = (torch.randn(t, h, device="cuda", generator=g, dtype=DT) for _ in range(2))
    nw = 1 + 0.3 * torch.randn(h, device="cuda", generator=g, dtype=DT)
    lin = from_linear(torch.nn.Linear(h, n, bias=False, device="cuda", dtype=DT), FP8Scheme())
    w64 = lin.dequantized_weight(torch.float64)
    s = x.double() + res.double()
    norm64 = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    errs = {}
    for name, fn in (("local", ops.add_rmsnorm), ("comm", comm.fused_add_rmsnorm)):
        xq, _ = fn(x, res, nw, 1e-5, quant=tpfuse.FP8PerToken())
        assert xq.data.dtype == torch.float8_e4m3fn and tuple(xq.scale.shape) == (t, 1)
        assert_quant_close(xq, norm64, f"{name} norm output")
        out = scaled_gemm.mm(xq.data, lin.weight, xq.scale, lin.weight_scale)
        errs[name] = rel_err(out, norm64 @ w64.t())
        assert errs[name] <= REL_ERR_FP8, errs
        emul = scaled_gemm.mm_reference(xq.data, lin.weight, xq.scale, lin.weight_scale)
        assert rel_err(out, emul) <= 1e-2  # _scaled_mm == the CPU emulation up to bf16 rounding
    gu = torch.randn(t, 2 * inter, device="cuda", generator=g, dtype=DT)
    down = from_linear(torch.nn.Linear(inter, h, bias=False, device="cuda", dtype=DT), FP8Scheme())
    hq = ops.silu_mul(gu, quant=tpfuse.FP8PerToken())
    gu64 = gu.double()
    h64 = torch.nn.functional.silu(gu64[:, :inter]) * gu64[:, inter:]
    errs["silu_mul"] = rel_err(scaled_gemm.mm(hq.data, down.weight, hq.scale, down.weight_scale),
                               h64 @ down.dequantized_weight(torch.float64).t())
    assert errs["silu_mul"] <= REL_ERR_FP8, errs
    comm.close()
    return errs


def test_fused_per_token_activations_into_scaled_mm():
    assert len(run_on_ranks(_gemm_path, 1, backend="nccl", timeout_s=300)) == 1


def _fp8_model(rank, world, arch, weight, batch):
    import tpfuse
    from tpfuse import scaled_gemm
    from tpfuse.parallel import KVCacheConfig, quantize_fp8
    from tpfuse.tolerance import REL_ERR_LOGITS_FP8, rel_err

    model = quantize_fp8(mc.build(arch, seed=0, **SHAPE).to(DT), weight=weight)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (int(n),), generator=g) for n in torch.randint(1, 200, (batch,),
                                                                                                   generator=g)]
    extra = torch.randint(0, SHAPE["vocab_size"], (batch, 24), generator=g)
    refs = [mc.oracle(model, torch.cat([p, extra[r, :-1]])) for r, p in enumerate(prompts)]
    comm = make_comm(world)
    tp_model = tpfuse.parallelize(model, comm, cache=KVCacheConfig(max_batch=8, max_seq_len=1024))
    assert all(layer._mm is scaled_gemm.mm for layer in tp_model._tpfuse.layers)
    graph, mode = _decode_run(tp_model, prompts, extra, 23)
    assert mode == "decode_graph"
    tp_model._tpfuse.cache_config.cuda_graphs = False  # the same model, the same steps, eagerly
    eager, mode = _decode_run(tp_model, prompts, extra, 23)
    assert mode == "allreduce"
    errs = []
    for r in range(batch):
        # graph and eager may round a few activations to neighbouring e4m3 values (the fused norm's reduction
        # order follows the token bucket), so they are held to the FP8 budget, not to bit equality
        e_graph, e_eager = rel_err(graph[r], refs[r]), rel_err(eager[r], refs[r])
        assert max(e_graph, e_eager, rel_err(graph[r], eager[r])) <= REL_ERR_LOGITS_FP8, (r, e_graph, e_eager)
        errs.append(e_graph)
    comm.close()
    return max(errs)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("arch,weight,batch", [("llama", "per_channel", 1), ("qwen3", "per_channel", 4),
                                               ("llama", "per_tensor", 3)])
def test_fp8_model_graph_vs_eager_vs_oracle(tp, arch, weight, batch):
    assert len(run_gpu(_fp8_model, tp, arch, weight, batch, timeout_s=600)) == tp


def _quality(rank, world):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "bench"))
    from fp8_quality import fp8_quality

    return fp8_quality(1, torch.device("cuda"))


def test_fp8_tiny_model_greedy_agrees_with_bf16():
    q = run_on_ranks(_quality, 1, backend="nccl", timeout_s=600)[0]
    assert q["greedy_agreement"] >= 0.9, q


def _load(rank, world, bf16_dir, fp8_dir):
    import tpfuse
    from tpfuse.parallel import from_pretrained

    out = []
    for path in (bf16_dir, fp8_dir):
        comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=mc.HIDDEN, dtype=DT)
        model = from_pretrained(path, comm, dtype=DT)
        out.append({k: (v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v).cpu()
                    for k, v in model.state_dict().items()})
        comm.close()
    return out


def test_from_pretrained_on_gpu_equals_cpu_shards(tmp_path):
    from tpfuse.parallel import quantize_fp8

    mc.build("llama", 0).to(DT).save_pretrained(str(tmp_path / "bf16"))
    fp8 = quantize_fp8(mc.build("llama", 0).to(DT))
    fp8.save_pretrained(str(tmp_path / "fp8"))
    got = run_on_ranks(_load, 1, str(tmp_path / "bf16"), str(tmp_path / "fp8"), backend="nccl", timeout_s=300)[0]
    want = [mc.build("llama", 0).to(DT).state_dict(), fp8.state_dict()]
    for g, w in zip(got, want):
        for k, v in w.items():
            ref = v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v
            assert torch.equal(g[k], ref), k
