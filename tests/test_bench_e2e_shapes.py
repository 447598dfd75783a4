"""``bench/e2e_models.py``: the per-rank shard shapes of ``bench_e2e.py``'s ``<model>/tp<N>`` rows against what
``tpfuse.parallelize`` actually leaves on rank 0 (tiny models of every architecture, TP 2 and 4 on gloo, kv heads
split and replicated), the byte counts behind the memory floor and ``--layers fit``, and the option parsing."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import e2e_models as em  # noqa: E402

# tiny shapes in SHAPES' form: GQA llama (2 kv heads: split at TP 2, replicated at TP 4), Qwen3's q/k norms,
# Qwen2's q/k/v biases, Phi-3's fused qkv / gate_up (head_dim not given: derived from hidden / heads)
TINY = {
    "llama": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=128),
    "qwen3": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=16, intermediate_size=96),
    "qwen2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    "phi3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
}
VOCAB = 96


def _hf(arch, shape, layers=2):
    import torch
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, f"{em.ARCHS[arch]}ForCausalLM")
    return cls(em.hf_config(arch, shape, layers, VOCAB)).eval()


def _shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _rank0_shapes(rank, world):
    """Every TINY model parallelized at TP=``world``: rank 0's parameter shapes and its layer's head counts."""
    import torch

    import tpfuse
    from tpfuse.parallel import KVCacheConfig

    out = {}
    for arch, shape in TINY.items():
        comm = tpfuse.TPCommunicator(max_tokens=32, hidden_size=shape["hidden_size"], dtype=torch.float32)
        model = tpfuse.parallelize(_hf(arch, shape), comm, cache=KVCacheConfig(max_batch=1, max_seq_len=32,
                                                                               block_size=16))
        layer = model._tpfuse.layers[0]
        out[arch] = (_shapes(model), layer.num_heads, layer.num_kv_heads)
        comm.close()
    return out if rank == 0 else None


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_shapes_match_parallelize_rank0(tp):
    pytest.importorskip("transformers")
    from harness import run_on_ranks

    got = run_on_ranks(_rank0_shapes, tp)[0]
    for arch, shape in TINY.items():
        cfg = em.shard_config(shape, tp)
        params, heads, kv_heads = got[arch]
        want = dict(_shapes(_hf(arch, cfg)), **{"lm_head.weight": (em.head_rows(f"8B/tp{tp}", VOCAB),
                                                                cfg["hidden_size"])})  # vocabulary-parallel rows
        assert want == params, (arch, tp)  # every parameter: layers, embedding, lm_head, norms
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (heads, kv_heads), (arch, tp)


def test_shard_shape_rules_of_the_real_models():
    assert em.shard_shape("70B", 8)[1] == dict(em.SHAPES["70B"][1], num_attention_heads=8, num_key_value_heads=1,
                                               intermediate_size=3584)
    assert em.shard_shape("70B", 4)[1]["num_key_value_heads"] == 2
    arch, s = em.shard_shape("8B", 2)
    assert arch == "llama" and (s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"],
                                s["hidden_size"], s["head_dim"]) == (16, 4, 7168, 4096, 128)
    s = em.shard_shape("70B", 16)[1]  # 8 kv heads at TP 16: replicated, one per rank
    assert (s["num_attention_heads"], s["num_key_value_heads"]) == (4, 1)
    s = em.shard_shape("Phi-3-medium", 2)[1]  # head_dim made explicit: hidden / (heads / TP) is not it
    assert (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]) == (20, 5, 128)
    with pytest.raises(ValueError, match="num_attention_heads=28"):
        em.shard_shape("Qwen2.5-7B", 8)
    with pytest.raises(ValueError, match="num_key_value_heads=10"):
        em.shard_shape("Phi-3-medium", 4)


def test_names_and_row_fields():
    assert em.parse_name("70B/tp8") == ("70B", 8) and em.parse_name("Qwen3-32B") == ("Qwen3-32B", None)
    for bad in ("7B", "70B/tp0", "70B/8"):
        with pytest.raises(ValueError):
            em.parse_name(bad)
    spec = em.Spec(name="70B/tp8", layers=80, vocab=128256)
    assert spec.fields() == dict(model="70B/tp8 shard", layers=80, vocab=128256, shard_of="70B", tp_shard=8)
    assert em.Spec(name="8B", layers=4, vocab=32000).fields() == dict(model="8B", layers=4, vocab=32000)
    assert em.model_shape("8B/tp2") == em.shard_shape("8B", 2)


def test_layers_vocab_and_capacities():
    assert em.resolve_layers("full", "70B/tp4") == 80 and em.resolve_layers(4, "8B") == 4
    assert em.resolve_layers("fit", "8B") is None
    assert em.resolve_vocab(None, 4, "8B") == 32000  # the earlier runs' vocabulary with an int --layers
    assert em.resolve_vocab(None, "full", "Qwen3-32B") == 151936
    assert em.resolve_vocab("real", 4, "70B/tp8") == 128256 and em.resolve_vocab("50000", "fit", "8B") == 50000
    assert em.parse_capacities("8x1152,256x1152,") == [(8, 1152), (256, 1152)]
    for bad in ("8", "8x", "0x1152", "8x1k"):
        with pytest.raises(ValueError):
            em.parse_capacities(bad)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_byte_counts_match_the_hf_model(arch):
    pytest.importorskip("transformers")
    shape = TINY[arch]
    model = _hf(arch, shape, layers=3)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert em.layer_params(arch, shape) == per_layer
    assert em.fixed_params(shape, VOCAB) == sum(p.numel() for p in model.parameters()) - 3 * per_layer
    assert em.fixed_params(shape, VOCAB, head=7) == em.fixed_params(shape, VOCAB) - (VOCAB - 7) * shape["hidden_size"]


def test_head_rows_of_a_shard():
    assert em.head_rows("70B/tp8", 128256) == 16032 and em.head_rows("8B", 128256) == 128256
    assert em.head_rows("8B/tp2", 131) == 66 and em.head_rows("70B/tp8", 128256, "replicated") == 128256
    with pytest.raises(ValueError):
        em.head_rows("8B/tp2", 131, "sharded")


def test_real_8b_bytes_and_fit():
    arch, shape = em.SHAPES["8B"]
    total = 32 * em.layer_params(arch, shape) + em.fixed_params(shape, 128256)
    assert total == 8_030_261_248  # Llama-3.1-8B's parameter count
    # 64 x 1072 tokens: 5 blocks of 256 per sequence + the scratch block, 8 kv heads x 128, K and V, bf16
    assert em.kv_bytes_per_layer(shape, 64, 1072) == 2 * (64 * 5 + 1) * 256 * 8 * 128 * 2
    kw = dict(vocab=128256, max_batch=64, max_seq_len=1072, tokens=65536, headroom_bytes=6 << 30, cap=32)
    layers, budget = em.fit_layers(arch, shape, free_bytes=79 << 30, **kw)
    assert layers == 32  # a whole 8B fits an 80 GB card: capped at the real count
    split = em.fit_layers(arch, shape, free_bytes=40 << 30, head=64128, **kw)[1]  # a TP 2 rank's head rows
    assert split["fixed"] == 2 * em.fixed_params(shape, 128256, 64128) < em.fit_layers(
        arch, shape, free_bytes=40 << 30, **kw)[1]["fixed"]
    layers, budget = em.fit_layers(arch, shape, free_bytes=40 << 30, **kw)
    room = (40 << 30) - budget["fixed"] - budget["activations"] - budget["headroom"]
    assert 0 < layers < 32 and layers * budget["per_layer"] <= room < (layers + 1) * budget["per_layer"]
    assert em.fit_layers(arch, shape, free_bytes=8 << 30, **kw)[0] == 0
    assert "layers fit" in em.describe_budget(layers, budget)


def test_bench_e2e_imports_and_keeps_its_defaults():
    import bench_e2e

    a = bench_e2e.parse_args([])
    assert (a.layers, a.vocab, a.kv_capacities, a.tag, a.hf_after) == (4, None, [], "", False)
    a = bench_e2e.parse_args(["--layers", "full", "--models", "70B/tp8,8B", "--kv-capacities", "8x1152,64x1152"])
    assert a.layers == "full" and a.kv_capacities == [(8, 1152), (64, 1152)]
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--layers", "most"])
    assert bench_e2e.VOCAB == 32000
    # the decode-row variants: none by default, those of each flag, and --small-m-everywhere only with a table
    assert bench_e2e.variants(a) == []
    V = bench_e2e.Variant
    assert bench_e2e.variants(bench_e2e.parse_args(["--pdl-ab"])) == [V("_nopdl", pdl=False),
                                                                        V("_prefetch", pdl=True, prefetch=True)]
    both = bench_e2e.parse_args(["--pdl-ab", "--small-m-table", "t.json"])
    assert [v.suffix for v in bench_e2e.variants(both)] == ["_smallm", "_nopdl", "_prefetch"]
    assert bench_e2e.variants(both)[0] == V("_smallm", "t.json")  # PDL as the default
    # --small-m-everywhere: the table routing every swept GEMM (needs the table), with --pdl-ab also without PDL
    every = bench_e2e.parse_args(["--pdl-ab", "--small-m-table", "t.json", "--small-m-everywhere"])
    assert bench_e2e.variants(every)[3:] == [V("_smallall", "t.json", everywhere=True),
                                              V("_smallall_nopdl", "t.json", pdl=False, everywhere=True)]
    # --rope-ab / --combine-ab / --fold-ab: the decode step with KVCacheConfig.fuse_rope /
    # decode_attention.FUSE_COMBINE / KVCacheConfig.fold_norms the other way than its default, all else the model's
    from tpfuse.kernels import decode_attention as dak
    from tpfuse.parallel import KVCacheConfig

    flip, comb, fold = not KVCacheConfig().fuse_rope, not dak.FUSE_COMBINE, not KVCacheConfig().fold_norms
    assert bench_e2e.variants(bench_e2e.parse_args(["--rope-ab", "--combine-ab", "--fold-ab"])) == [
        V("_fusedrope" if flip else "_ropesep", fuse_rope=flip),
        V("_fusedcomb" if comb else "_combkern", fuse_combine=comb),
        V("_foldnorm" if fold else "_normkern", fold_norms=fold)]
    f16 = not dak.FP8_F16
    assert bench_e2e.variants(bench_e2e.parse_args(["--f16-ab"])) == [V("_f16" if f16 else "_bf16loop", fp8_f16=f16)]
    af = not KVCacheConfig().fold_attn_combine
    assert bench_e2e.variants(bench_e2e.parse_args(["--attn-fold-ab"])) == [
        V("_attnfold" if af else "_attncomb", attn_fold=af)]
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--small-m-everywhere"])
    assert (a.kv_fp8, bench_e2e.parse_args(["--kv-fp8"]).kv_fp8) == (False, True)


def test_small_m_everywhere_routes_every_swept_row(tmp_path):
    """load_table(everywhere=True) turns a row that lost to the library into a routed one, with its tuned config."""
    import json

    import bench_e2e
    from tpfuse.kernels import small_m_configs as smc

    cfg = {"block_n": 32, "block_k": 256, "split_k": 1, "num_warps": 4, "num_stages": 4}
    rows = [{"arch": "sm90", "scheme": "bf16", "n": 4096, "k": 4096, "m_bucket": 1, "config": cfg,
             "beats_library": False, "kernel_us": 15.0, "library_us": 14.0}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"schema": 1, "source": None, "rows": rows}))
    assert [r["beats_library"] for r in bench_e2e.load_table(str(path))["rows"]] == [False]
    every = bench_e2e.load_table(str(path), everywhere=True)
    assert [r["beats_library"] for r in every["rows"]] == [True]
    parsed = smc.parse(every)
    assert len(parsed) == 1 and all(r.beats_library and r.config.block_k == 256 for r in parsed.values())


def test_a_bad_small_m_table_fails_before_any_model(tmp_path):
    import bench_e2e

    bad = tmp_path / "t.json"
    bad.write_text('{"schema": 1, "rows": [{"arch": "sm90", "scheme": "bf16", "n": 64, "k": 64, "m_bucket": 3, '
                   '"config": {}, "beats_library": true}]}')
    with pytest.raises(ValueError, match="m_bucket 3"):
        bench_e2e.main(["--small-m-table", str(bad), "--models", "8B"])
