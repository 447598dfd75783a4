"""``tpfuse.parallelize`` on transformers' Llama and Qwen3 (tiny random configs, fp32, gloo, TP 2 and 4).

Oracle: the same unsharded Hugging Face model run once in fp64 on the whole sequence (prefill + decode tokens),
without a KV cache: row ``i`` of its logits is what the parallelized model must produce for token ``i``, whether
that token came in the prefill or in a decode step through the KV cache. Weights are re-drawn at a scale where
attention is far from uniform and norms are far from 1, so a wrong position, mask, head split or norm weight
moves the logits well past the tolerance (``tpfuse.tolerance``, fp32).

Modes are forced with ``CommConfig(sp_min_tokens=SP_MIN)``: prefill of ``T_AR`` tokens runs the all-reduce form,
``T_SP`` tokens (not divisible by TP: uneven token shards) the sequence-parallel form, decode steps (1 token) the
all-reduce form. Each step clears ``comm.last_path`` and checks exactly which communicator ops ran.
"""

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers "
                                                            "(pip install 'tpfuse[hf]')")
pytest.importorskip("safetensors", reason="the checkpoint round trip needs safetensors")

from cases import make_comm  # noqa: E402
from harness import run_on_ranks  # noqa: E402
import model_cases  # noqa: E402
from model_cases import cache_of  # noqa: E402

T_AR, T_SP, SP_MIN, DECODE_STEPS = 6, 11, 8, 3
AR_OPS = {"fused_add_rmsnorm", "all_reduce"}  # all_reduce: the vocabulary-parallel head's logits (vocab_head)
SP_OPS = {"all_gather_matmul", "matmul_reduce_scatter_rmsnorm", "all_gather", "all_reduce"}


def _build(arch: str, seed: int):
    return model_cases.build(arch, seed)


def _oracle(model, ids):
    return model_cases.oracle(model, ids)


def _comm(world):
    return make_comm(64, torch.float32, 32, sp_min_tokens=SP_MIN)


def _step(model, comm, ids, cache, expect_mode):
    comm.last_path.clear()
    out = model(ids[None], cache=cache, use_cache=True)
    t = ids.shape[0]
    assert comm.plan(t).mode == expect_mode, (t, comm.plan(t).mode)
    assert model._tpfuse.last_mode == expect_mode
    want = SP_OPS if expect_mode == "sequence_parallel" else AR_OPS
    assert set(comm.last_path) == want, (expect_mode, comm.last_path)
    assert all(p == "reference" for p in comm.last_path.values()), comm.last_path  # CPU: the reference path
    return out.logits[0], cache_of(out)


def _run_sequence(model, comm, ids, steps, ref, what):
    """Feed ``ids`` in chunks of ``steps`` tokens through one KV cache (a prefill, then chunks / single-token
    decode steps); compare each step's logits with the oracle's rows for those positions."""
    from tpfuse.tolerance import assert_close

    cache, pos, errs = None, 0, []
    for t in steps:
        mode = "sequence_parallel" if t >= SP_MIN else "allreduce"
        logits, cache = _step(model, comm, ids[pos:pos + t], cache, mode)
        errs.append(assert_close(logits, ref[pos:pos + t], torch.float32, f"{what}: {t} tokens at {pos} ({mode})"))
        pos += t
        assert cache.get_seq_length() == pos
    return errs


def _parity(rank, world, arch, ckpt):
    import tpfuse
    from safetensors.torch import save_file

    comm = _comm(world)
    model = _build(arch, seed=0)
    ids = torch.randint(0, 128, (T_SP + DECODE_STEPS,), generator=torch.Generator().manual_seed(7))
    ref = _oracle(model, ids)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    full_q = model.model.layers[0].self_attn.q_proj.weight.shape

    tp_model = tpfuse.parallelize(model, comm)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (full_q[0] // world, full_q[1])
    assert attn.k_proj.weight.shape[0] == 4 * 16 // world and attn.o_proj.weight.shape[1] == 8 * 16 // world
    assert model.lm_head.weight.shape == (128 // world, 64)  # vocabulary-parallel: logits gathered (vocab_head)
    assert model._tpfuse.head_range == (rank * 128 // world, (rank + 1) * 128 // world)
    decode = [1] * DECODE_STEPS
    errs = _run_sequence(tp_model, comm, ids, [T_AR] + decode, ref, f"{arch} TP={world}")  # AR prefill + decode
    errs += _run_sequence(tp_model, comm, ids, [T_SP] + decode, ref, f"{arch} TP={world}")  # SP prefill + decode

    # checkpoint round trip: a model with other weights, parallelized, then filled from the file
    dist.barrier()
    other = tpfuse.parallelize(_build(arch, seed=1), comm)
    before = other(ids[None, :T_AR]).logits[0]
    assert tpfuse.tolerance.rel_err(before, ref[:T_AR]) > 0.1  # the unloaded model really differs
    loaded = tpfuse.parallel.load_sharded_safetensors(other, ckpt, comm)
    assert "model.layers.1.mlp.down_proj.weight" in loaded
    # after loading: a short prefill, then a sequence-parallel chunk on top of the cache (masked), then decode
    errs += _run_sequence(other, comm, ids, [3, T_SP - 2] + decode[:1], ref, f"{arch} TP={world} loaded")
    comm.close()
    return max(errs)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_parallelize_matches_unsharded(arch, world, tmp_path):
    if arch == "qwen3" and not hasattr(transformers, "Qwen3ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3 (needs >= 4.51)")
    errs = run_on_ranks(_parity, world, arch, str(tmp_path / "model.safetensors"))
    assert len(errs) == world and all(e <= 1e-5 for e in errs), errs


# ---------------------------------------------------------------------------------------------------------------
# a declarative layout passed by the caller, with wildcard patterns: on Mistral (Llama-shaped; full attention), which
# also has a shipped layout (test_model_families.py)


def _custom_plan(rank, world):
    import tpfuse

    torch.manual_seed(3)
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                     sliding_window=None, max_position_embeddings=64)
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # O(1) weights, as in _build
            p.mul_(20.0 if p.dim() == 2 else 1.0)
    ids = torch.randint(0, 128, (T_SP + 1,), generator=torch.Generator().manual_seed(5))
    ref = _oracle(model, ids)
    layout = tpfuse.TPLayout(column=["*.[qkv]_proj", "*.gate_proj", "*.up_proj"], row=["*.o_proj", "*.down_proj"],
                             heads={"*.q_proj": "num_attention_heads", "*.[kv]_proj": "num_key_value_heads"},
                             # older transformers (4.45) keep Mistral's rotary module in each attention block
                             rotary="model.rotary_emb" if hasattr(model.model, "rotary_emb")
                             else "model.layers.0.self_attn.rotary_emb")
    comm = _comm(world)
    tp_model = tpfuse.parallelize(model, comm, layout=layout)
    assert model.model.layers[1].self_attn.v_proj.weight.shape == (2 * 16 // world, 64)
    errs = _run_sequence(tp_model, comm, ids, [T_SP, 1], ref, f"mistral TP={world}")
    comm.close()
    return max(errs)


def test_custom_plan_other_architecture():
    assert max(run_on_ranks(_custom_plan, 2)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# errors (raised before any collective: a stand-in communicator is enough)


class _FakeComm:
    def __init__(self, tp, hidden=64, dtype=torch.float32):
        self.tp, self.rank, self.hidden_size, self.dtype = tp, 0, hidden, dtype
        self.device = torch.device("cpu")


def test_kv_heads_not_divisible_raises():
    import tpfuse

    model = _build("llama", 0)  # 8 q heads, 4 kv heads: at TP=16 the q heads cannot be split (kv heads would be
    with pytest.raises(ValueError, match="num_attention_heads=8 is not divisible by TP=16"):  # replicated)
        tpfuse.parallelize(model, _FakeComm(16))


def test_bad_layout_and_model_raise():
    import tpfuse

    with pytest.raises(ValueError, match="matches no module"):
        tpfuse.parallelize(_build("llama", 0), _FakeComm(2),
                           layout=tpfuse.TPLayout(column=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "mlp.gate_proj", "mlp.up_proj", "mlp.typo_proj"],
                                                  row=["self_attn.o_proj", "mlp.down_proj"]))
    with pytest.raises(ValueError, match="comm.dtype"):
        tpfuse.parallelize(_build("llama", 0), _FakeComm(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="no shipped TP layout"):
        tpfuse.parallelize(torch.nn.Linear(2, 2), _FakeComm(2))


def test_former_plan_names_still_work_and_warn():
    import tpfuse
    import tpfuse.parallel as tpp

    with pytest.warns(DeprecationWarning, match="TPPlan is deprecated: use TPLayout"):
        assert tpfuse.TPPlan is tpfuse.TPLayout
    with pytest.warns(DeprecationWarning, match="plan_for is deprecated"):
        assert tpp.plan_for is tpp.layout_for
    bad = tpfuse.TPLayout(column=["mlp.typo_proj"])
    with pytest.warns(DeprecationWarning, match=r"parallelize\(plan=...\) is deprecated"), \
            pytest.raises(ValueError, match="q_proj must be column-parallel"):  # plan= is the layout used
        tpfuse.parallelize(_build("llama", 0), _FakeComm(2), plan=bad)
    with pytest.raises(TypeError, match="pass layout= only"):
        tpfuse.parallelize(_build("llama", 0), _FakeComm(2), plan=bad, layout=bad)


def test_import_tpfuse_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, tpfuse; assert 'transformers' not in sys.modules and 'tpfuse.parallel' not in sys.modules;"
            "tpfuse.parallelize; tpfuse.TPLayout; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
