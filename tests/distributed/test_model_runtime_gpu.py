"""GPU, TP = 1 and the GPU suite's sizes (``cases.GPU_TPS``: 2 / 4 / 8; NCCL with a GPU per rank, else one-GPU
mode): the model runtime of ``tpfuse.parallelize`` in bf16 on tpfuse's CUDA kernels - batched padded prefill,
CUDA-graph-replayed decode vs the same steps run eagerly vs the fp64 oracle, the FP8 KV cache, ``generate()``
(greedy == transformers' ``generate``; sampled: the same tokens on every rank), and ``from_pretrained`` of bf16 and
FP8 (compressed-tensors) checkpoints vs the unsharded model. (The CPU/gloo fp32 suite is ``test_model_runtime.py``.)

Model: random weights with real head shapes (head_dim 128, GQA 16/4 heads: at TP=8 the 4 KV heads are replicated,
hidden 1024, 2 layers, vocab 4096), redrawn at O(1) scale so a wrong slot, length, position or head moves the
logits far past bf16's error. At TP > 1 the all-reduce is pinned to ``tpfuse_oneshot`` (``model_cases.GRAPH_SAFE``): the
shipped TP 4 / 8 rows route it to NCCL, which one-GPU mode runs as host collectives that a CUDA graph cannot
capture (``TPCommunicator.graph_safe``).
"""

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from kernel_env import LaunchRecorder  # noqa: E402
from cases import GPU_TPS, gpu_tp_params, run_gpu  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TPS = gpu_tp_params((1,) + GPU_TPS)

SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=4, head_dim=128, max_position_embeddings=4096)
DT = torch.bfloat16


def make_comm(world, max_tokens=4096, hidden=SHAPE["hidden_size"]):
    """The communicator of these tests: at TP > 1 the all-reduce on tpfuse's graph-capturable kernel."""
    import tpfuse

    cfg = tpfuse.CommConfig(force_paths=mc.GRAPH_SAFE if world > 1 else {})
    return tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=hidden, dtype=DT, config=cfg)


def _model(arch, world, graphs=True, **cache_kw):
    import tpfuse
    from tpfuse.parallel import KVCacheConfig

    model = mc.build(arch, seed=0, **SHAPE)
    ref = mc.build(arch, seed=0, **SHAPE).to(DT)  # the oracle upcasts these bf16-rounded weights to fp64
    comm = make_comm(world)
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


def _graph_vs_eager(rank, world, arch, batch, cache_dtype, fuse_rope=None, fuse_combine=None, fp8_f16=None):
    from tpfuse.tolerance import REL_ERR_LOGITS, rel_err

    import tpfuse.attention as ta
    from tpfuse.kernels import decode_attention as dak

    if fuse_combine is not None:  # this rank's process only (spawned)
        dak.FUSE_COMBINE = fuse_combine
    if fp8_f16 is not None:
        dak.FP8_F16 = fp8_f16
    combines = {name: LaunchRecorder(getattr(dak, name))  # which kernels ran (this rank's process only)
                for name in ("_split_combine_kernel", "_rope_split_combine_kernel", "_combine_kernel",
                             "_split_kernel", "_rope_split_kernel")}
    for name, rec in combines.items():
        setattr(dak, name, rec)

    kw = {} if cache_dtype is None else dict(dtype=cache_dtype, kv_scale=0.5)
    if fuse_rope is not None:
        kw["fuse_rope"] = fuse_rope
    fused_calls = []
    fused = ta.rope_decode_attention
    ta.rope_decode_attention = lambda *a, **k: (fused_calls.append(1), fused(*a, **k))[1]  # which path ran
    g = torch.Generator().manual_seed(batch)
    lens = [int(x) for x in torch.randint(1, 300, (batch,), generator=g)]
    prompts = [torch.randint(0, SHAPE["vocab_size"], (n,), generator=g) for n in lens]
    steps = 40  # crosses the 256-token cache blocks for some rows; fresh tokens every replay
    extra = torch.randint(0, SHAPE["vocab_size"], (batch, steps), generator=g)
    try:
        graphed, ref_model, comm = _model(arch, world, True, **kw)
        got, mode = _decode_run(graphed, prompts, extra, steps)
        assert mode == "decode_graph"
        graphed._tpfuse.cache_config.cuda_graphs = False  # the same model, the same steps, eagerly
        eager, mode = _decode_run(graphed, prompts, extra, steps)
        assert mode == "allreduce"
    finally:
        ta.rope_decode_attention = fused
    assert bool(fused_calls) == graphed._tpfuse.cache_config.fuse_rope, len(fused_calls)
    if fuse_combine is not None:  # which combine ran (prefill never launches one: it attends without splits)
        kinds = {name for name, rec in combines.items() if rec.launches}
        assert kinds and (kinds <= {"_split_combine_kernel", "_rope_split_combine_kernel"}) == fuse_combine, kinds
    if fp8_f16 is not None:  # every decode attention launch on the e4m3 cache took the fp16 loop (or not)
        f16 = [kw.get("F16_MMA", False) for rec in combines.values() for _, kw in rec.launches if "F16_MMA" in kw]
        assert f16 and all(f == fp8_f16 for f in f16), f16
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


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("arch,batch,cache_dtype", [("llama", 1, None), ("llama", 3, None), ("qwen3", 8, None),
                                                    ("llama", 5, torch.float8_e4m3fn)])
def test_graph_decode_matches_eager_and_oracle(tp, arch, batch, cache_dtype):
    errs = run_gpu(_graph_vs_eager, tp, arch, batch, cache_dtype, timeout_s=600)
    assert all(e > 0 for e in errs)


@pytest.mark.parametrize("fuse_rope", [True, False], ids=["fused", "apart"])
@pytest.mark.parametrize("arch,cache_dtype", [("llama", None), ("qwen3", torch.float8_e4m3fn)])
def test_rope_decode_paths_match_eager_and_oracle(arch, cache_dtype, fuse_rope):
    """Both decode paths whatever the default (TP = 1): ``KVCacheConfig(fuse_rope=True)``, the step's RoPE
    (QK-norm) and cache write inside the decode attention kernel, and ``False``, their own kernels before it; a
    batch of 3 in the graph bucket of 4 (a pad row on the scratch block)."""
    errs = run_gpu(_graph_vs_eager, 1, arch, 3, cache_dtype, fuse_rope, timeout_s=600)
    assert all(e > 0 for e in errs)


@pytest.mark.parametrize("arch,cache_dtype,fuse_rope", [("llama", None, True), ("qwen3", torch.float8_e4m3fn, True),
                                                      ("llama", None, False)])
def test_fused_combine_decode_matches_eager_and_oracle(arch, cache_dtype, fuse_rope):
    """``decode_attention.FUSE_COMBINE`` (off by default): the decode attention's combine in its split kernel's
    last programs, through the model's graphs (counters allocated by the eager warm-up, re-armed by each replay)
    and eagerly, with and without the fused RoPE; only the fused kernels ran."""
    errs = run_gpu(_graph_vs_eager, 1, arch, 3, cache_dtype, fuse_rope, True, timeout_s=600)
    assert all(e > 0 for e in errs)


@pytest.mark.parametrize("arch,fuse_rope", [("qwen3", True), ("llama", True), ("llama", False)])
def test_fp8_f16_decode_matches_eager_and_oracle(arch, fuse_rope):
    """``decode_attention.FP8_F16`` (off by default): the e4m3 cache's tile loop in fp16 through the model's graphs
    (captured with PDL, the default) and eagerly, with the fused RoPE (QK-norm for qwen3) and apart; every decode
    attention launch took it."""
    errs = run_gpu(_graph_vs_eager, 1, arch, 3, torch.float8_e4m3fn, fuse_rope, None, True, timeout_s=600)
    assert all(e > 0 for e in errs)


def _generate(rank, world):
    from tpfuse.parallel import generate

    model, _, comm = _model("llama", world)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, SHAPE["vocab_size"], (4, 33), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    mask[3, :30] = 0
    ours = generate(model, ids, mask, max_new_tokens=24).sequences.cpu()
    hf = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, do_sample=False,
                        pad_token_id=0).cpu()
    assert torch.equal(ours, hf), (ours, hf)
    sampled = generate(model, ids, mask, max_new_tokens=24, do_sample=True, temperature=1.5, top_k=50,
                       seed=rank).sequences.cpu()  # a different seed per rank: rank 0's choice must win everywhere
    comm.close()
    return ours, sampled


@pytest.mark.parametrize("tp", TPS)
def test_generate_fast_loop_equals_hf_generate(tp):
    res = run_gpu(_generate, tp, timeout_s=600)
    greedy, sampled = res[0]
    assert all(torch.equal(g, greedy) and torch.equal(s, sampled) for g, s in res), "ranks generated differently"
    assert not torch.equal(sampled, greedy)  # sampling at temperature 1.5 really sampled


def _from_pretrained(rank, world, path, fp8):
    """``from_pretrained`` (each rank reads its shard) of a saved checkpoint: batched prefill and graph decode vs the
    fp64 oracle of the unsharded model that was saved."""
    from tpfuse.parallel import KVCacheConfig, from_pretrained, quantize_fp8
    from tpfuse.tolerance import REL_ERR_LOGITS, REL_ERR_LOGITS_FP8, rel_err

    comm = make_comm(world)
    model = from_pretrained(path, comm, dtype=DT, cache=KVCacheConfig(max_batch=4, max_seq_len=512))
    ref_model = mc.build("llama", seed=0, **SHAPE).to(DT)
    ref_model = quantize_fp8(ref_model) if fp8 else ref_model  # what the test saved
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (n,), generator=g) for n in (37, 5, 120)]
    extra = torch.randint(0, SHAPE["vocab_size"], (3, 12), generator=g)
    got, mode = _decode_run(model, prompts, extra, 12)
    assert mode == "decode_graph"
    tol = REL_ERR_LOGITS_FP8 if fp8 else REL_ERR_LOGITS[DT]
    errs = [rel_err(got[r], mc.oracle(ref_model, torch.cat([p, extra[r]])).float()) for r, p in enumerate(prompts)]
    assert max(errs) <= tol, errs
    comm.close()
    return max(errs)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_from_pretrained_matches_unsharded(tp, fp8, tmp_path):
    from tpfuse.parallel import quantize_fp8

    model = mc.build("llama", seed=0, **SHAPE).to(DT)
    (quantize_fp8(model) if fp8 else model).save_pretrained(str(tmp_path))
    assert all(e > 0 for e in run_gpu(_from_pretrained, tp, str(tmp_path), fp8, timeout_s=600))


def _o_proj_prefetch_same_bits(rank, world, arch, batch, fp8, fuse_rope):
    """The model's graph decode with ``KVCacheConfig.prefetch_o_proj`` off, then on (graphs captured again): the
    same logits bit for bit, and the prefetch issued only with it on: by the fused RoPE + attention kernel
    (``fuse_rope``: its launches with ``PF_NEXT``) or by the side stream's kernel beside the unfused ones."""
    from tpfuse.kernels import decode_attention as dak
    from tpfuse.kernels import l2_prefetch as l2

    rec = LaunchRecorder(l2._l2_prefetch_kernel)
    l2._l2_prefetch_kernel = rec  # this rank's process only (spawned)
    in_kernel, next_prefetch = [], dak.next_prefetch
    dak.next_prefetch = lambda t, programs: (lambda kw: in_kernel.append(kw.get("PF_NEXT", 0)) or kw)(
        next_prefetch(t, programs))
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, SHAPE["vocab_size"], (int(n),), generator=g) for n in torch.randint(1, 300, (batch,),
                                                                                                     generator=g)]
    steps = 12
    extra = torch.randint(0, SHAPE["vocab_size"], (batch, steps), generator=g)
    import tpfuse
    from tpfuse.parallel import KVCacheConfig, quantize_fp8

    base = mc.build(arch, seed=0, **SHAPE).to(DT)
    comm = make_comm(world)
    model = tpfuse.parallelize(quantize_fp8(base) if fp8 else base, comm,
                               cache=KVCacheConfig(max_batch=8, max_seq_len=1024, fuse_rope=fuse_rope))
    runs = []
    for on in (False, True):
        model._tpfuse.cache_config.prefetch_o_proj = on
        model._tpfuse.graphs = None  # captured again with the flag
        n0, k0 = len(rec.launches), len(in_kernel)
        got, mode = _decode_run(model, prompts, extra, steps)
        assert mode == "decode_graph"
        side, fused = len(rec.launches) - n0, sum(n > 0 for n in in_kernel[k0:])
        assert (side == 0) if fuse_rope else (fused == 0), (fuse_rope, side, fused)
        runs.append((got, side + fused))
    comm.close()
    (off, n_off), (got_on, n_on) = runs
    assert n_off == 0 and n_on > 0, (n_off, n_on)
    for a, b in zip(off, got_on):
        assert torch.equal(a, b)
    return n_on


@pytest.mark.parametrize("fuse_rope", [True, False], ids=["in_kernel", "side_stream"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_o_proj_prefetch_decode_same_bits(fp8, fuse_rope):
    """``KVCacheConfig.prefetch_o_proj`` (TP = 1): the o_proj weight prefetched into L2 inside the captured decode
    graph, by the fused attention kernel or from a side stream, changes no value (bf16 layers and per-channel FP8
    layers)."""
    assert all(n > 0 for n in run_gpu(_o_proj_prefetch_same_bits, 1, "llama", 3, fp8, fuse_rope, timeout_s=600))
