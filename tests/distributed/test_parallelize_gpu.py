"""GPU, TP = 2 / 4 / 8 (``cases.GPU_TPS``; NCCL with a GPU per rank, else one-GPU mode): ``tpfuse.parallelize`` on
transformers' ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` in bf16, through tpfuse's own GPU paths, vs the unsharded
model in fp64 on the GPU (the CPU/gloo fp32 parity is ``test_parallelize.py``).

Model: random weights (nothing downloaded) with real layer shapes, so the kernels run at the sizes a model uses:
hidden 2048, 16 q heads / 4 kv heads (replicated at TP=8), head_dim 128, MLP 5632, vocab 32000, 2 layers; weights
redrawn at O(1)
scale (norm weights ``1 + 0.3 N(0, 1)``, attention far from uniform), so a sharding, head, position or norm bug
moves the logits by 0.17 - 1 (relative) while bf16 rounding moves them by ~0.007 (``tpfuse.tolerance.
REL_ERR_LOGITS``, which documents both).

Oracle: the same unsharded HF model (the bf16 weights, upcast) run once in fp64 on the GPU over the whole sequence
without a KV cache: row ``i`` is what the parallelized model must produce for token ``i``, in a prefill or in a
decode step through the KV cache. The unsharded HF model's own bf16 error on the same tokens is returned too (it
is what the budget is measured against; the report shows both).

Steps (``CommConfig(sp_min_tokens=SP_MIN)`` pins the AR -> SP switch on every table): a prefill of ``T_AR`` tokens
(all-reduce form) + 3 decode steps; a prefill of ``T_SP`` tokens (sequence-parallel form, odd: uneven token
shards) + 3 decode steps. Each step clears ``comm.last_path`` and checks exactly which ops ran on which path (a
replayed decode graph calls no op: its paths are those recorded when it was captured, at the first decode step):

* ``table``: the paths the shipped thresholds table picks here (``plan(T).path(op)``), which must not be the
  reference path (TP=2 today: ``tpfuse_oneshot`` for the all-reduce steps, ``tpfuse_async_tp`` /
  ``tpfuse_all_gather`` at ``T_SP``, above the table's 8 MiB SP buckets at hidden 2048; TP 4 / 8: ``nccl``, which
  one-GPU mode runs through host memory, so its decode steps run eagerly: ``TPCommunicator.graph_safe``);
* ``forced``: ``CommConfig.force_paths`` pins every op to tpfuse's own kernels (``tpfuse_twoshot`` for the
  all-reduce form, so both fused all-reduce kernels run a model across the two variants), whatever the table says;
  decode steps replay CUDA graphs.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers "
                                                            "(pip install 'tpfuse[hf]')")

from cases import gpu_tp_params, run_gpu  # noqa: E402
from tpfuse.dispatch import ROUTED_AS  # noqa: E402
from model_cases import cache_of  # noqa: E402

pytestmark = [pytest.mark.gpu]

DT = torch.bfloat16
T_AR, T_SP, SP_MIN, DECODE_STEPS = 517, 2101, 1024, 3
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
             num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
AR_OPS = {"fused_add_rmsnorm"}
SP_OPS = {"all_gather_matmul", "matmul_reduce_scatter_rmsnorm", "all_gather"}
FORCED = {"fused_add_rmsnorm": "tpfuse_twoshot", "all_gather_matmul": "tpfuse_async_tp",
          "matmul_reduce_scatter": "tpfuse_async_tp", "all_gather": "tpfuse_all_gather"}
BUILD_THREADS = 8  # CPU threads per rank while drawing 225M random weights (the harness runs ranks at 1)


def _build(arch: str, seed: int = 0):
    """The real-shaped model in bf16 on the CPU, identical on every rank (seeded CPU generator)."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**SHAPE), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.Qwen3Config(**SHAPE), transformers.Qwen3ForCausalLM
    from tpfuse.models.hf_tiny import randomize_weights

    return randomize_weights(cls(cfg).eval(), seed).to(DT)


def _unsharded_logits(model, ids, dtype, dev):
    """Logits ``[T, vocab]`` of an unsharded copy of ``model`` in ``dtype`` on ``dev`` over ``ids`` (no cache)."""
    ref = copy.deepcopy(model).to(device=dev, dtype=dtype)
    with torch.no_grad():
        out = ref(ids[None].to(dev), use_cache=False).logits[0]
    del ref
    torch.cuda.empty_cache()
    return out


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _check_comm(comm, variant) -> None:
    """The communicator's tensors are on the GPU (NCCL, or gloo in one-GPU mode); pinned to tpfuse's paths, it
    holds both of tpfuse's symmetric-memory workspaces."""
    assert comm.device.type == "cuda", comm
    assert variant != "forced" or {"fused_allreduce", "async_tp"} <= set(comm.workspaces), comm


def _check_paths(comm, t, mode, variant):
    """The ops of ``mode`` ran, each on the path ``variant`` says (never the reference). Returns ``{op: path}``."""
    ran = dict(comm.last_path)
    want = SP_OPS if mode == "sequence_parallel" else AR_OPS
    assert set(ran) == want, (t, mode, ran)
    plan = comm.plan(t)
    for op, path in ran.items():
        assert path != "reference", (t, op, ran)
        if variant == "forced":  # an op routed as another (the fused row-parallel tail) takes that op's path
            want = FORCED[ROUTED_AS.get(op, op)]
            assert path == want == plan.path(op), (t, op, path, want)
        else:  # the table's choice ran (a FlashInfer path may hand a call to tpfuse's kernels: last_path says so)
            planned = plan.path(op)
            assert path == planned or (planned.startswith("flashinfer") and path.startswith("tpfuse")), \
                (t, op, path, planned)
    return ran


def _parity(rank, world, arch, variant):
    import tpfuse
    from tpfuse.tolerance import assert_logits_close, rel_err

    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        model = _build(arch)
    finally:
        torch.set_num_threads(threads)
    dev = _device()
    ids = torch.randint(0, SHAPE["vocab_size"], (T_SP + DECODE_STEPS,), generator=torch.Generator().manual_seed(7))
    ref = _unsharded_logits(model, ids, torch.float64, dev)
    hf_err = rel_err(_unsharded_logits(model, ids, DT, dev), ref)  # transformers' own bf16 error, for the report

    cfg = tpfuse.CommConfig(sp_min_tokens=SP_MIN, force_paths=FORCED if variant == "forced" else {})
    comm = tpfuse.TPCommunicator(max_tokens=T_SP, hidden_size=SHAPE["hidden_size"], dtype=DT, config=cfg)
    _check_comm(comm, variant)
    tp_model = tpfuse.parallelize(model, comm)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16 * 128 // world, 2048), attn.q_proj.weight.shape  # heads split by rank
    assert attn.k_proj.weight.shape == (max(4 // world, 1) * 128, 2048), attn.k_proj.weight.shape  # or replicated
    assert attn.q_proj.weight.device == dev and attn.q_proj.weight.dtype == DT

    steps = []
    for prefill in (T_AR, T_SP):
        cache, pos = None, 0
        for t in [prefill] + [1] * DECODE_STEPS:
            mode = "sequence_parallel" if t >= SP_MIN else "allreduce"
            comm.last_path.clear()
            with torch.no_grad():
                out = tp_model(ids[None, pos:pos + t], cache=cache, use_cache=True)
            graphed = t == 1 and comm.graph_safe(1)  # a decode step replays its graph where one can be captured
            assert comm.plan(t).mode == mode, (t, mode)
            assert model._tpfuse.last_mode == ("decode_graph" if graphed else mode), (t, model._tpfuse.last_mode)
            # a replay calls no op: the decode graph's paths are those recorded when it was captured
            ran = _check_paths(comm, t, mode, variant) if (comm.last_path or not graphed) else {"graph": "replay"}
            logits = out.logits[0]
            assert logits.shape == (t, SHAPE["vocab_size"]) and logits.dtype == DT and logits.device == dev
            err = assert_logits_close(logits, ref[pos:pos + t], DT,
                                      f"{arch} {variant}: {t} tokens at position {pos} ({mode}, {ran})")
            cache, pos = cache_of(out), pos + t
            assert cache.get_seq_length() == pos
            steps.append((t, mode, ran, round(err, 5)))
    comm.synchronize()  # raises TPFusePeerTimeout if any kernel gave up on its peer
    comm.close()
    return {"hf_bf16_err": round(hf_err, 5), "steps": steps}


@pytest.mark.parametrize("tp", gpu_tp_params())
@pytest.mark.parametrize("variant", ["table", "forced"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_parallelize_bf16_matches_unsharded(tp, arch, variant):
    if arch == "qwen3" and not hasattr(transformers, "Qwen3ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3 (needs >= 4.51)")
    res = run_gpu(_parity, tp, arch, variant, timeout_s=480)
    print(f"{arch} {variant}: {res[0]}")  # shown with -s / -rP: the per-step errors and paths
    # every rank holds replicated logits: the same steps, paths and errors
    assert all([s[:3] for s in r["steps"]] == [s[:3] for s in res[0]["steps"]] for r in res), res
    assert len(res[0]["steps"]) == 2 * (1 + DECODE_STEPS)
