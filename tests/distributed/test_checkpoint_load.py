"""Shard-at-load: ``tpfuse.parallel.from_pretrained`` builds the model on the meta device and reads only this rank's
slices of a ``save_pretrained`` checkpoint (CPU, gloo, fp32, TP 1 / 2 / 4; Llama and Qwen3, and at TP=2 the
families whose reads differ: Qwen2's biased q/k/v, Phi-3's fused q/k/v and gate/up read by their parts).

Oracle for the shards: the full model built with real weights and ``parallelize``-d (slicing in memory): every
tensor of the two must be bit-identical, including kv heads replicated when there are fewer than TP. Oracle for
the logits: the unsharded fp64 model (``model_cases.oracle``), so the rebuilt rotary module and the replicated
kv-head choice are checked end to end, in the all-reduce and the sequence-parallel form.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")
pytest.importorskip("safetensors", reason="checkpoints need safetensors")

import model_cases as mc  # noqa: E402
from cases import make_comm  # noqa: E402
from harness import run_on_ranks  # noqa: E402

SP_MIN = 8
ATTN0 = "model.layers.0.self_attn."
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _comm(dtype=torch.float32):
    return make_comm(mc.HIDDEN, dtype, 32, sp_min_tokens=SP_MIN)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), set(sa) ^ set(sb)
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(_bits(sa[k]), _bits(sb[k]))]
    assert not bad, bad
    assert a._tpfuse.shards == b._tpfuse.shards


def _logits_vs_oracle(model, ref, ids, what):
    from tpfuse.tolerance import assert_close

    errs = []
    for t in (5, 11):  # all-reduce form, then sequence-parallel (11 >= SP_MIN tokens; uneven token shards)
        out = model(ids[None, :t], use_cache=False)
        errs.append(assert_close(out.logits[0], ref[:t], torch.float32, f"{what}: {t} tokens"))
    return max(errs)


def _meta_vs_full(rank, world, arch, path, over):
    from tpfuse.parallel import from_pretrained

    import tpfuse

    if rank == 0:
        mc.build(arch, 0, **over).save_pretrained(path)
    dist.barrier()
    comm = _comm()
    loaded = from_pretrained(path, comm, dtype=torch.float32)
    full = tpfuse.parallelize(mc.build(arch, 0, **over), comm)
    assert_same_state(loaded, full)
    ids = torch.randint(0, mc.VOCAB, (11,), generator=torch.Generator().manual_seed(3))
    err = _logits_vs_oracle(loaded, mc.oracle(mc.build(arch, 0, **over), ids), ids, f"{arch} TP={world}")
    out = {"err": err, "kv_heads": loaded._tpfuse.kv_heads,
           "attn": {k[len(ATTN0):]: v for k, v in loaded._tpfuse.shards.items() if k.startswith(ATTN0)}}
    comm.close()
    return out


@pytest.mark.parametrize("arch,world", [("llama", 1), ("qwen3", 2), ("llama", 4)])
def test_meta_load_equals_full_load(arch, world, tmp_path):
    res = run_on_ranks(_meta_vs_full, world, arch, str(tmp_path / "ckpt"), {})
    assert all(r["err"] <= 1e-5 for r in res), res
    assert all(r["kv_heads"] == 4 // world for r in res)


@pytest.mark.parametrize("world", [4])
def test_kv_heads_fewer_than_tp_are_replicated(world, tmp_path):
    # 8 q heads, 2 kv heads at TP=4: ranks 0, 1 keep kv head 0 (their q heads 0-3 use it), ranks 2, 3 kv head 1
    res = run_on_ranks(_meta_vs_full, world, "llama", str(tmp_path / "ckpt"), {"num_key_value_heads": 2})
    assert [r["kv_heads"] for r in res] == [1] * world
    assert [r["attn"]["k_proj.weight"].ranges for r in res] == [((0, 16),)] * 2 + [((16, 32),)] * 2
    assert all(r["err"] <= 1e-5 for r in res), res


@pytest.mark.parametrize("arch,param,ranges", [
    ("qwen2", "q_proj.bias", [((0, 64),), ((64, 128),)]),  # Qwen2's q/k/v biases are read with their rows
    # Phi-3, 4 q heads and 2 kv heads of 16: rank r reads q heads 2r, 2r+1, then kv head r of k and of v
    ("phi3", "qkv_proj.weight", [((0, 32), (64, 80), (96, 112)), ((32, 64), (80, 96), (112, 128))]),
])
def test_family_checkpoint_round_trip(arch, param, ranges, tmp_path):
    res = run_on_ranks(_meta_vs_full, 2, arch, str(tmp_path / "ckpt"), {})
    assert all(r["err"] <= 1e-5 for r in res), res
    assert [r["attn"][param].ranges for r in res] == ranges


def test_tied_embeddings_stay_tied(tmp_path):
    # tie_word_embeddings: the checkpoint holds only model.embed_tokens.weight; lm_head must be the same tensor
    res = run_on_ranks(_tied, 2, str(tmp_path / "ckpt"))
    assert all(r["tied"] and r["err"] <= 1e-5 for r in res), res


def _tied(rank, world, path):
    res = _meta_vs_full(rank, world, "qwen3", path, {"tie_word_embeddings": True})
    from tpfuse.parallel import from_pretrained

    comm = _comm()
    model = from_pretrained(path, comm, dtype=torch.float32)
    res["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    comm.close()
    return res


def test_kv_heads_neither_dividing_raise():
    import tpfuse

    class Comm:
        tp, rank, hidden_size, dtype, device = 4, 0, 96, torch.float32, torch.device("cpu")

    model = mc.build("llama", 0, hidden_size=96, num_attention_heads=12, num_key_value_heads=6, head_dim=16)
    with pytest.raises(ValueError, match="num_key_value_heads=6 is not divisible by TP=4"):
        tpfuse.parallelize(model, Comm())


def test_reader_rows_columns_scalars_and_fp8(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from tpfuse.parallel import st_reader

    monkeypatch.setattr(st_reader, "CHUNK_BYTES", 64)  # many chunks per tensor
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 12, generator=g).to(torch.bfloat16), "s": torch.tensor(0.25),
               "f8": torch.randn(9, 16, generator=g).to(torch.float8_e4m3fn), "v": torch.randn(5, generator=g)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with st_reader.SafetensorsFile(str(tmp_path / "t.safetensors")) as fh:
        out = torch.empty(10, 12, dtype=torch.float32)
        fh.read_into("w", out, 0, 20, 30)
        assert torch.equal(out, tensors["w"][20:30].float())
        cols = torch.empty(37, 5, dtype=torch.bfloat16)
        fh.read_into("w", cols, 1, 3, 8)
        assert torch.equal(cols, tensors["w"][:, 3:8])
        s = torch.empty((), dtype=torch.float32)
        fh.read_into("s", s)
        assert float(s) == 0.25
        f8 = torch.empty(9, 16, dtype=torch.float8_e4m3fn)
        fh.read_into("f8", f8)
        assert torch.equal(f8.view(torch.uint8), tensors["f8"].view(torch.uint8))
        v = torch.empty(2)
        fh.read_into("v", v, 0, 1, 3)
        assert torch.equal(v, tensors["v"][1:3])


def test_mixed_meta_and_real_model_raises():
    import tpfuse

    class Comm:
        tp, rank, hidden_size, dtype, device = 2, 0, mc.HIDDEN, torch.float32, torch.device("cpu")

    model = mc.build("llama", 0)
    model.lm_head.to_empty(device="meta")
    with pytest.raises(ValueError, match="both on the meta device and materialised"):
        tpfuse.parallelize(model, Comm())


def test_bench_load_cpu_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_load.py"), "--shape", "tiny", "--device",
                    "cpu", "--dir", str(tmp_path / "ckpt")], check=True, env=env, timeout=300)
    res = json.load(open(tmp_path / "load_tp1_cpu.json"))
    row = res["rows"][0]
    assert row["shard_bytes"] > 0 and row["host_peak_over_baseline_bytes"] > 0
    assert row["max_abs_diff_vs_full_load"] == 0.0
