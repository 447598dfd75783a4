"""One GPU (TP=1 over NCCL): the model runtime of ``tpfuse.parallelize`` in bf16 on tpfuse's CUDA kernels - batched
padded prefill, CUDA-graph-replayed decode vs the same steps run eagerly vs the fp64 oracle, the FP8 KV cache, and
``generate()``. (The CPU/gloo fp32 suite is ``test_model_runtime.py``; the pair runs ``test_parallelize_gpu.py``.)

Model: random weights with real head shapes (head_dim 128, GQA 16/4 heads, hidden 1024, 2 layers, vocab 4096),
redrawn at O(1) scale so a wrong slot, length, position or head moves the logits far past bf16's error.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from harness import run_on_ranks  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=4, head_dim=128, max_position_embeddings=4096)
DT = torch.bfloat16


def _model(arch, graphs=True, **cache_kw):
    import tpfuse
    from tpfuse.parallel import KVCacheConfig

    model = mc.build(arch, seed=0, **SHAPE)
    ref = mc.build(arch, seed=0, **SHAPE).to(DT)  # the oracle upcasts these bf16-rounded weights to fp64
    comm = tpfuse.TPCommunicator(max_tokens=4096, hidden_size=SHAPE["hidden_size"], dtype=DT)
    cfg = KVCacheConfig(max_batch=8, max_seq_len=1024, cuda_graphs=graphs, **cache_kw)
    return tpfuse.parallelize(model.to(DT), comm, cache=cfg), ref, comm


def _decode_run(model, prompts, extra, steps):
    """Left-padded batched prefill, then ``steps`` decode steps; returns per-row lists of logits (fp32, CPU)."""
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    out = model(ids.cuda(), attention_mask=mask.cuda())
    rows = [[out.logits[r, width - len(p):].float().cpu()] for r, p in enumerate(prompts)]
    cache = mc.cache_of(out)
    for i in range(steps):
        out = model(extra[:, i:i + 1].cuda(), cache=cache)
        cache = mc.cache_of(out)
        for r in range(b):
            rows[r].append(out.logits[r].float().cpu())
    return [torch.cat(x) for x in rows], model._tpfuse.last_mode


def _graph_vs_eager(rank, world, arch, batch, cache_dtype):
    from tpfuse.tolerance import REL_ERR_LOGITS, rel_err

    kw = {} if cache_dtype is None else dict(dtype=cache_dtype, kv_scale=0.5)
    g = torch.Generator().manual_seed(batch)
    lens = [int(x) for x in torch.randint(1, 300, (batch,), generator=g)]
    prompts = [torch.randint(0, SHAPE["vocab_size"], (n,), generator=g) for n in lens]
    steps = 40  # crosses the 256-token cache blocks for some rows; fresh tokens every replay
    extra = torch.randint(0, SHAPE["vocab_size"], (batch, steps), generator=g)
    graphed, ref_model, comm = _model(arch, True, **kw)
    got, mode = _decode_run(graphed, prompts, extra, steps)
    assert mode == "decode_graph"
    graphed._tpfuse.cache_config.cuda_graphs = False  # the same model, the same steps, eagerly
    eager, mode = _decode_run(graphed, prompts, extra, steps)
    assert mode == "allreduce"
    errs = []
    tol = REL_ERR_LOGITS[DT] * (4 if cache_dtype is not None else 1)
    for r, p in enumerate(prompts):
        ref = mc.oracle(ref_model, torch.cat([p, extra[r]])).float()
        e_graph, e_eager = rel_err(got[r], ref), rel_err(eager[r], ref)
        assert e_graph <= tol and e_eager <= tol, (r, e_graph, e_eager)
        assert rel_err(got[r], eager[r]) <= tol, (r, rel_err(got[r], eager[r]))
        errs.append(e_graph)
    comm.close()
    return max(errs)


@pytest.mark.parametrize("arch,batch,cache_dtype", [("llama", 1, None), ("llama", 3, None), ("qwen3", 8, None),
                                                    ("llama", 5, torch.float8_e4m3fn)])
def test_graph_decode_matches_eager_and_oracle(arch, batch, cache_dtype):
    errs = run_on_ranks(_graph_vs_eager, 1, arch, batch, cache_dtype, backend="nccl", timeout_s=600)
    assert errs[0] > 0


def _generate(rank, world):
    from tpfuse.parallel import generate

    model, _, comm = _model("llama")
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, SHAPE["vocab_size"], (4, 33), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    mask[3, :30] = 0
    ours = generate(model, ids, mask, max_new_tokens=24).sequences.cpu()
    hf = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, do_sample=False,
                        pad_token_id=0).cpu()
    assert torch.equal(ours, hf), (ours, hf)
    comm.close()
    return True


def test_generate_fast_loop_equals_hf_generate():
    assert run_on_ranks(_generate, 1, backend="nccl", timeout_s=600) == [True]
