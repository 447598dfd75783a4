"""The model runtime of ``tpfuse.parallelize`` (CPU, gloo, fp32; TP 1 / 2 / 4): batched padded prefill, decode of
sequences at different lengths through the static paged KV cache, Hugging Face ``generate()`` and
``tpfuse.parallel.generate``, the FP8 cache, and the errors that must come before any collective.

Oracle: the unsharded HF model in fp64 over each whole sequence without a cache (:mod:`model_cases`); a row of its
logits is what the parallelized model must produce for that token, whatever call (prefill, padded batch, decode
step) the token came in. Decode steps run :func:`tpfuse.attention.decode_attention` (its reference on CPU), so the
paged cache layout, slot mapping and per-row lengths are all checked against the oracle.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from harness import run_on_ranks  # noqa: E402

LENGTHS = (7, 3, 5)  # one prompt per row: a batch of different lengths
DECODE_STEPS = 16


def _real(logits_row, mask_row):
    return logits_row[mask_row.bool()]


def _batched(rank, world, arch, fuse_rope):
    """Left- and right-padded batched prefill == the oracle == one call per prompt; then DECODE_STEPS decode steps
    per row, each row at its own length (``fuse_rope``: through :func:`tpfuse.attention.rope_decode_attention`, the
    default, or the separate RoPE + cache-write op before :func:`tpfuse.attention.decode_attention`)."""
    import tpfuse.attention as ta
    from tpfuse.tolerance import assert_close, rel_err

    model, ref_model, comm = mc.tp_model(arch, world, fuse_rope=fuse_rope)
    fused_calls = []
    fused = ta.rope_decode_attention
    ta.rope_decode_attention = lambda *a, **kw: (fused_calls.append(1), fused(*a, **kw))[1]  # which path ran
    prompts = mc.prompts(LENGTHS)
    g = torch.Generator().manual_seed(3)
    extra = torch.randint(0, mc.VOCAB, (len(prompts), DECODE_STEPS), generator=g)
    refs = [mc.oracle(ref_model, torch.cat([p, extra[b]])) for b, p in enumerate(prompts)]
    errs = []
    for left in (True, False):
        ids, mask = mc.padded(prompts, left)
        out = model(ids, attention_mask=mask)
        for b, p in enumerate(prompts):
            errs.append(assert_close(_real(out.logits[b], mask[b]), refs[b][: len(p)], torch.float32, f"row {b}"))
            assert out.logits[b][~mask[b].bool()].abs().max() == 0 if len(p) < ids.shape[1] else True
    singles = [model(p[None]).logits[0] for p in prompts]  # one call per prompt (each a new batch)
    ids, mask = mc.padded(prompts, left=True)
    out = model(ids, attention_mask=mask)
    for b, p in enumerate(prompts):
        assert rel_err(_real(out.logits[b], mask[b]), singles[b]) <= 1e-6, "batched != separate calls"
    cache = mc.cache_of(out)
    assert cache.lengths == list(LENGTHS)
    try:
        for i in range(DECODE_STEPS):
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
            out = model(extra[:, i:i + 1], attention_mask=mask, cache=cache)
            cache = mc.cache_of(out)
            for b, p in enumerate(prompts):
                errs.append(assert_close(out.logits[b, 0], refs[b][len(p) + i], torch.float32, f"decode {i} row {b}"))
    finally:
        ta.rope_decode_attention = fused
    assert len(fused_calls) == (DECODE_STEPS * len(model._tpfuse.layers) if fuse_rope else 0), len(fused_calls)
    assert cache.lengths == [n + DECODE_STEPS for n in LENGTHS]
    # T == B without being a decode step: row 0 brings 2 tokens, row 1 none, row 2 one
    more = torch.randint(0, mc.VOCAB, (3, 2), generator=g)
    new_mask = torch.tensor([[1, 1], [0, 0], [0, 1]])
    out = model(more, attention_mask=torch.cat([mask, new_mask], dim=1), cache=cache)
    done = [len(p) + DECODE_STEPS for p in prompts]
    for b, cols in ((0, [0, 1]), (2, [1])):
        seq = torch.cat([prompts[b], extra[b], more[b, cols]])
        ref = mc.oracle(ref_model, seq)[done[b]:]
        errs.append(assert_close(out.logits[b, cols], ref, torch.float32, f"uneven step row {b}"))
    assert mc.cache_of(out).lengths == [done[0] + 2, done[1], done[2] + 1]
    assert model._tpfuse.last_mode == "allreduce"  # CPU: eager decode (graphs are CUDA only)
    comm.close()
    return max(errs)


@pytest.mark.parametrize("arch,world,fuse_rope", [("llama", 1, True), ("llama", 4, True), ("qwen3", 2, True),
                                                  ("llama", 2, False), ("qwen3", 1, False)])
def test_batched_prefill_and_decode_match_unsharded(arch, world, fuse_rope):
    errs = run_on_ranks(_batched, world, arch, fuse_rope)
    assert max(errs) <= 1e-5, errs


def _generate(rank, world):
    """Greedy: HF ``generate()`` on the parallelized model and ``tpfuse.parallel.generate`` produce the unsharded
    HF model's tokens for a left-padded batch. Sampling: reproducible per seed, identical on every rank."""
    from tpfuse.parallel import generate

    model, ref_model, comm = mc.tp_model("llama", world)
    ids, mask = mc.padded(mc.prompts(LENGTHS, 5), left=True)
    want = ref_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got_hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = generate(model, ids, mask, max_new_tokens=8).sequences
    assert torch.equal(got_hf, want), (got_hf, want)
    assert torch.equal(got, want), (got, want)
    s1 = generate(model, ids, mask, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=4)
    s2 = generate(model, ids, mask, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=4)
    assert torch.equal(s1.sequences, s2.sequences) and s1.new_tokens == 6
    hf_sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert hf_sampled.shape == (ids.shape[0], ids.shape[1] + 4)
    comm.close()
    return s1.sequences


@pytest.mark.parametrize("world", [1, 2])
def test_generate_greedy_matches_unsharded_hf(world):
    seqs = run_on_ranks(_generate, world)
    assert all(torch.equal(s, seqs[0]) for s in seqs), "sampled tokens differ between ranks"


def _fp8_cache(rank, world):
    """An FP8 e4m3 KV cache (``KVCacheConfig(dtype=float8_e4m3fn, kv_scale)``): decode logits within FP8's error
    of the oracle (the prefill attends to its fresh bf16/fp32 k, v; decode steps read the quantized cache)."""
    from tpfuse.tolerance import rel_err

    model, ref_model, comm = mc.tp_model("qwen3", world, dtype=torch.float8_e4m3fn, kv_scale=0.05)
    assert model._tpfuse.cache_storage().key[0].dtype == torch.float8_e4m3fn
    p = mc.prompts(LENGTHS)[0]
    nxt = torch.randint(0, mc.VOCAB, (4,), generator=torch.Generator().manual_seed(2))
    ref = mc.oracle(ref_model, torch.cat([p, nxt]))
    out = model(p[None])
    cache, errs = mc.cache_of(out), []
    for i in range(len(nxt)):
        out = model(nxt[None, i:i + 1], cache=cache)
        cache = mc.cache_of(out)
        errs.append(rel_err(out.logits[0, 0], ref[len(p) + i]))
    comm.close()
    return max(errs)


def test_fp8_kv_cache_decode():
    errs = run_on_ranks(_fp8_cache, 2)
    assert 0 < max(errs) <= 0.08, errs  # FP8's ~6% per element, averaged; > 0 proves the cache really is e4m3


def _errors(rank, world):
    """Each bad call raises on every rank before any collective; the next good call still matches the oracle."""
    from tpfuse.errors import TPFuseInputError
    from tpfuse.tolerance import rel_err

    model, ref_model, comm = mc.tp_model("llama", world)
    p = mc.prompts(LENGTHS)[0]
    seen = []

    def expect(exc, fn):
        with pytest.raises(exc) as e:
            fn()
        seen.append(type(e.value).__name__)

    expect(TPFuseInputError, lambda: model(torch.zeros(5, 2, dtype=torch.long)))  # batch > max_batch (4)
    expect(TPFuseInputError, lambda: model(torch.zeros(1, 65, dtype=torch.long), use_cache=False))  # > max_tokens
    out = model(p[None])
    stale = mc.cache_of(out)
    expect(TPFuseInputError, lambda: model(torch.zeros(1, 45, dtype=torch.long), cache=stale))  # > max_seq_len
    expect(TPFuseInputError, lambda: model(torch.zeros(5, 2, dtype=torch.long)))  # a rejected new batch ...
    model(p[None, :1], cache=stale)  # ... leaves the live batch usable
    model(p[None])  # a new batch: the old handle is stale
    expect(TPFuseInputError, lambda: model(p[None, :1], cache=stale))
    expect(NotImplementedError, lambda: model(p[None], output_attentions=True))
    expect(TPFuseInputError, lambda: model(p[None], attention_mask=torch.zeros(1, len(p), dtype=torch.long)))
    logits, cache = model(p[None], return_dict=False)  # a tuple, as HF's return_dict=False
    assert rel_err(logits[0], mc.oracle(ref_model, p)) <= 1e-5
    comm.close()
    return seen


def test_bad_calls_raise_on_every_rank_before_any_collective():
    seen = run_on_ranks(_errors, 2)
    assert seen[0] == seen[1] and len(seen[0]) == 7, seen
