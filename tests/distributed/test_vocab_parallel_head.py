"""The vocabulary-parallel lm_head (``tpfuse.parallel.vocab_head``): its row split, the logits gather (exact, any
vocabulary, chunked by ``max_tokens``), and the parallelized model at TP 2 / 4 with a vocabulary TP does not divide
(logits vs the fp64 oracle, greedy tokens vs TP = 1, a checkpoint loaded into the shards), the heads that stay
replicated (tied to the embedding, ``KVCacheConfig.vocab_parallel_head=False``). CPU, gloo, fp32."""

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from cases import make_comm  # noqa: E402
from harness import run_on_ranks  # noqa: E402

ODD_VOCAB = 131  # prime: no TP divides it; 131 x 7 tokens is not a whole number of 64-wide rows either


@pytest.mark.parametrize("vocab,tp", [(128, 2), (131, 4), (131, 8), (5, 8), (1, 2)])
def test_vocab_range_tiles_the_vocabulary(vocab, tp):
    from tpfuse.parallel.vocab_head import vocab_range

    ranges = [vocab_range(vocab, tp, r) for r in range(tp)]
    assert ranges[0][0] == 0 and ranges[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order, no overlap
    assert all(0 <= e - s <= -(-vocab // tp) for s, e in ranges)  # every rank at most ceil(V / TP) rows


def _gather(rank, world, vocab, tokens, max_tokens):
    from tpfuse.parallel.vocab_head import gather_logits, vocab_range

    comm = make_comm(16, torch.float32, max_tokens)
    g = torch.Generator().manual_seed(3)
    full = torch.randn(tokens, vocab, generator=g) * 1e4  # large values: a sum with anything but zeros would show
    full[:, ::7] = -0.0  # negative zeros stay zeros (sign aside) after the sum
    s, e = vocab_range(vocab, world, rank)
    got = gather_logits(comm, full[:, s:e].clone(), s, vocab)
    local = gather_logits(comm, full[:, s:e].clone(), s, vocab, local=True)
    comm.close()
    assert got.shape == (tokens, vocab) and got.is_contiguous()
    assert torch.equal(got, full), (got - full).abs().max()
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[s:e] = False
    assert torch.equal(local[:, s:e], full[:, s:e]) and not local[:, outside].any()  # no collective: own columns
    return True


@pytest.mark.parametrize("world,vocab,tokens,max_tokens", [(2, 128, 3, 64), (4, ODD_VOCAB, 7, 64),
                                                           (4, ODD_VOCAB, 9, 8), (3, 10, 1, 64), (2, 64, 0, 8)],
                         ids=["even", "odd", "chunked", "tp3", "no-tokens"])
def test_gather_logits_is_exact(world, vocab, tokens, max_tokens):
    """``chunked``: 9 x 131 / 16 = 74 rows in calls of at most 8 rows."""
    assert all(run_on_ranks(_gather, world, vocab, tokens, max_tokens))


def _model_case(rank, world, ckpt):
    import tpfuse
    from safetensors.torch import save_file
    from tpfuse.tolerance import REL_ERR_LOGITS, rel_err
    from tpfuse.parallel import KVCacheConfig

    cfg = KVCacheConfig(max_batch=4, max_seq_len=48, block_size=16)
    model = mc.build("llama", seed=0, vocab_size=ODD_VOCAB)
    ids = torch.randint(0, ODD_VOCAB, (12,), generator=torch.Generator().manual_seed(5))
    ref = mc.oracle(model, ids).float()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=mc.HIDDEN, dtype=torch.float32)
    tp_model = tpfuse.parallelize(model, comm, cache=cfg)
    st = tp_model._tpfuse
    s, e = st.head_range
    assert (s, e) == tpfuse.parallel.vocab_head.vocab_range(ODD_VOCAB, world, rank) and st.vocab == ODD_VOCAB
    assert model.lm_head.weight.shape == (e - s, mc.HIDDEN) and st.shards["lm_head.weight"].full_shape[0] == ODD_VOCAB
    comm.last_path.clear()
    logits = tp_model(ids[None]).logits[0]
    assert "all_reduce" in comm.last_path  # the logits came through the gather
    assert logits.shape == (12, ODD_VOCAB) and rel_err(logits, ref) <= REL_ERR_LOGITS[torch.float32]
    tokens = tpfuse.parallel.generate(tp_model, torch.stack([ids[:5], ids[5:10]]), max_new_tokens=6).sequences

    # replicated heads: the knob off; a head tied to the embedding (Llama 3.2's tie_word_embeddings)
    off = tpfuse.parallelize(mc.build("llama", seed=0, vocab_size=ODD_VOCAB), comm,
                             cache=KVCacheConfig(max_batch=4, max_seq_len=48, block_size=16, vocab_parallel_head=False))
    assert off._tpfuse.head_range is None and off.lm_head.weight.shape[0] == ODD_VOCAB
    assert "vocab_parallel_head=False" in off._tpfuse.head_replicated_why
    assert rel_err(off(ids[None]).logits[0], ref) <= REL_ERR_LOGITS[torch.float32]
    tied = tpfuse.parallelize(mc.build("llama3", seed=0), comm, cache=cfg)
    assert tied._tpfuse.head_range is None and "tied" in tied._tpfuse.head_replicated_why
    assert tied.lm_head.weight is tied.model.embed_tokens.weight

    # a checkpoint into another model's shards (the head's rows [s, e) of the file's [131, 64])
    other = tpfuse.parallelize(mc.build("llama", seed=1, vocab_size=ODD_VOCAB), comm, cache=cfg)
    assert rel_err(other(ids[None]).logits[0], ref) > 0.1
    assert "lm_head.weight" in tpfuse.parallel.load_sharded_safetensors(other, ckpt, comm)
    assert rel_err(other(ids[None]).logits[0], ref) <= REL_ERR_LOGITS[torch.float32]
    comm.close()
    return tokens


def _tp1_tokens(rank, world):
    import tpfuse
    from tpfuse.parallel import KVCacheConfig

    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=mc.HIDDEN, dtype=torch.float32)
    model = tpfuse.parallelize(mc.build("llama", seed=0, vocab_size=ODD_VOCAB), comm,
                               cache=KVCacheConfig(max_batch=4, max_seq_len=48, block_size=16))
    assert model._tpfuse.head_range is None and model._tpfuse.head_replicated_why == "TP = 1"
    ids = torch.randint(0, ODD_VOCAB, (12,), generator=torch.Generator().manual_seed(5))
    out = tpfuse.parallel.generate(model, torch.stack([ids[:5], ids[5:10]]), max_new_tokens=6).sequences
    comm.close()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_model_matches_oracle_and_tp1(world, tmp_path):
    got = run_on_ranks(_model_case, world, str(tmp_path / "model.safetensors"))
    want = run_on_ranks(_tp1_tokens, 1)[0]
    assert all(torch.equal(g, want) for g in got), (got, want)  # greedy: the same tokens on every rank as at TP = 1
