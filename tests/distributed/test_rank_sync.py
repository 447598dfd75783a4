"""The ranks of a parallelized model stay on the same call (CPU, gloo, fp32, TP=2):

* prefill calls that differ between ranks (prompt lengths, token ids) raise ``TPFuseMismatchError`` on every rank,
  nothing hangs, and the next matching call runs and matches the oracle; so do ranks whose lm_head split differs;
* transformers' ``generate()`` with sampling yields the same tokens on every rank even when the ranks' RNGs were
  seeded differently (before, each rank sampled from its own RNG and the ranks silently diverged).

The cost of the prefill check is printed (``-s`` shows it).
"""

import time

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from harness import run_on_ranks  # noqa: E402


def _model():
    import tpfuse
    from tpfuse.parallel import KVCacheConfig

    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=mc.HIDDEN, dtype=torch.float32)
    return tpfuse.parallelize(mc.build("llama", seed=0), comm, cache=KVCacheConfig(max_batch=4, max_seq_len=48)), comm


def _mismatched_prefills(rank, world):
    from tpfuse.errors import TPFuseMismatchError
    from tpfuse.tolerance import rel_err

    model, comm = _model()
    ids = torch.randint(0, mc.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    other_ids = ids.clone()
    other_ids[1, 3] = (other_ids[1, 3] + 1) % mc.VOCAB
    left_pad = mask.clone()
    left_pad[0, :2] = 0
    calls = {  # rank 1's call differs from rank 0's in ...
        "width": lambda: model(ids if rank == 0 else ids[:, :5], attention_mask=None),
        "ids": lambda: model(ids if rank == 0 else other_ids, attention_mask=mask),
        "lengths": lambda: model(ids, attention_mask=mask if rank == 0 else left_pad),
        "ids (no cache)": lambda: model(ids if rank == 0 else other_ids, use_cache=False),
    }
    seen = {}
    for what, call in calls.items():
        with pytest.raises(TPFuseMismatchError) as e:
            call()
        seen[what] = str(e.value)
    out = model(ids, attention_mask=mask)  # a matching call still runs, right
    err = rel_err(out.logits[0], mc.oracle(mc.build("llama", seed=0), ids[0]))
    step = model(ids[:, :1], cache=mc.cache_of(out))  # a decode step: not checked, runs
    from tpfuse.parallel.rank_sync import check_same_call

    for _ in range(5):  # warm-up
        check_same_call(comm, ids, mask, [])
    t0 = time.perf_counter()
    for _ in range(100):
        check_same_call(comm, ids, mask, [])
    cost_ms = (time.perf_counter() - t0) / 100 * 1e3
    comm.close()
    return seen, err, step.logits.shape, cost_ms


def test_mismatched_prefills_raise_on_every_rank():
    res = run_on_ranks(_mismatched_prefills, 2, timeout_s=120)
    for seen, err, shape, cost_ms in res:
        assert set(seen) == {"width", "ids", "lengths", "ids (no cache)"}, seen
        assert "inputs (width, " in seen["width"] and "inputs (ids digest, " in seen["ids"], seen
        assert "inputs (real tokens, " in seen["lengths"], seen
        assert err <= 1e-5 and shape == (2, 1, mc.VOCAB)
    print(f"\nprefill call check at TP=2 on CPU/gloo: {max(r[3] for r in res):.3f} ms per prefill")


def _mismatched_head_split(rank, world):
    import tpfuse
    from tpfuse.errors import TPFuseMismatchError
    from tpfuse.parallel import KVCacheConfig

    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=mc.HIDDEN, dtype=torch.float32)
    cfg = KVCacheConfig(max_batch=4, max_seq_len=48, vocab_parallel_head=rank != 1)  # rank 1 keeps the whole head
    model = tpfuse.parallelize(mc.build("llama", seed=0), comm, cache=cfg)
    ids = torch.randint(0, mc.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with pytest.raises(TPFuseMismatchError) as e:
        model(ids)
    comm.close()
    return str(e.value)


def test_ranks_with_different_head_splits_fail_together():
    """Ranks whose lm_head split differs (``KVCacheConfig.vocab_parallel_head``) would meet different collectives at
    the call's end: the first prefill raises on every rank, naming the setting, before any other collective."""
    for msg in run_on_ranks(_mismatched_head_split, 4, timeout_s=120):
        assert "vocab_parallel_head" in msg and "not run on any rank" in msg, msg


def _hf_sampling(rank, world):
    model, comm = _model()
    ids = torch.randint(0, mc.VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(100 + rank)  # the ranks' RNGs differ, as in any script that does not seed them alike
    a = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True, top_k=0,
                       temperature=1.5, pad_token_id=0)
    b = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True, top_k=0,
                       temperature=1.5, pad_token_id=0)
    after = torch.rand(1)  # each rank's own RNG stream is left as it was
    comm.close()
    return a, b, after


def test_hf_generate_sampling_is_identical_on_every_rank():
    (a0, b0, r0), (a1, b1, r1) = run_on_ranks(_hf_sampling, 2, timeout_s=120)
    assert torch.equal(a0, a1) and torch.equal(b0, b1), (a0, a1)
    assert not torch.equal(a0, b0)  # consecutive calls draw new seeds
    assert not torch.equal(r0, r1)
