"""GPU soak at TP=2 (NCCL with two GPUs, else one-GPU mode): one captured decode step of a parallelized model
replayed ``TPFUSE_SOAK_REPLAYS`` times (default 2,000, as in ``bench/gpu_run.sh``'s ``onegpu`` step; its ``soak``
step runs 100,000) with a fresh token per row every replay, the logits checked against the fp64 oracle every 1,000
replays and at the last: nothing drifts (no stale flag, epoch or buffer parity after many replays of the fused
all-reduce), nothing hangs.

The step (one decoder layer: its attention and MLP all-reduces; 100,000 replays took 36 s in one-GPU mode under MPS
on one H100): a batch of 4 prompts is prefilled and decoded once (which captures the bucket's graph); every replay
then writes a new random token at the same cache position of each row (``cache_pos`` stays put, so the cache never
fills) and reads the logits of that token, which depend on the whole prefix through the KV cache. The oracle is the
unsharded model in fp64 over prefix + that token. Both ranks draw the same tokens (one seeded generator).
"""

import os

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from cases import gpu_tp_params, run_gpu  # noqa: E402
from test_model_runtime_gpu import SHAPE, make_comm  # noqa: E402

pytestmark = [pytest.mark.gpu]
DT = torch.bfloat16
REPLAYS = int(os.environ.get("TPFUSE_SOAK_REPLAYS", "2000"))
CHECK_EVERY = 1000
BATCH, PROMPT = 4, 32
SOAK_SHAPE = dict(SHAPE, num_hidden_layers=1)  # two fused all-reduces per step: the replays are what is soaked


def _soak(rank, world, replays):
    import tpfuse
    from tpfuse.parallel import KVCacheConfig
    from tpfuse.parallel.forward import _graphs
    from tpfuse.tolerance import REL_ERR_LOGITS, rel_err

    model = mc.build("llama", seed=0, **SOAK_SHAPE)
    ref64 = mc.build("llama", seed=0, **SOAK_SHAPE).to(DT).double()  # the oracle: bf16-rounded weights in fp64
    comm = make_comm(world)
    model = tpfuse.parallelize(model.to(DT), comm, cache=KVCacheConfig(max_batch=BATCH, max_seq_len=64))
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, SHAPE["vocab_size"], (BATCH, PROMPT + 1), generator=g)
    out = model(prefix[:, :PROMPT].cuda())
    cache = mc.cache_of(out)
    out = model(prefix[:, PROMPT:].cuda(), cache=cache)  # the first decode step captures the bucket's graph
    assert model._tpfuse.last_mode == "decode_graph"
    graphs, cache = _graphs(model), mc.cache_of(out)
    pos = cache.lengths_dev.clone()  # every replay writes its token at position PROMPT + 1
    gen = torch.Generator(device="cuda").manual_seed(2)  # the same tokens on every rank
    checked, worst = 0, 0.0
    for it in range(replays):
        ids = torch.randint(0, SHAPE["vocab_size"], (BATCH,), device="cuda", generator=gen)
        logits = graphs.run(ids, pos, None)
        if it % CHECK_EVERY == 0 or it == replays - 1:
            with torch.no_grad():
                ref = ref64(torch.cat([prefix, ids[:, None].cpu()], 1), use_cache=False).logits[:, -1].float()
            for r in range(BATCH):
                err = rel_err(logits[r].float().cpu(), ref[r])
                assert err <= REL_ERR_LOGITS[DT], (it, r, err)
                worst = max(worst, err)
            checked += 1
    comm.synchronize()  # raises TPFusePeerTimeout if any replay's kernel gave up on its peer
    comm.close()
    return checked, round(worst, 5)


@pytest.mark.parametrize("tp", gpu_tp_params((2,)))
def test_decode_graph_soak(tp, record_property):
    res = run_gpu(_soak, tp, REPLAYS, timeout_s=max(600, REPLAYS // 100))
    expect = len(range(0, REPLAYS, CHECK_EVERY)) + ((REPLAYS - 1) % CHECK_EVERY != 0)
    assert all(c == expect for c, _ in res), res
    worst = max(w for _, w in res)
    for key, value in (("replays", REPLAYS), ("checks_per_rank", expect), ("worst_logits_rel_err", worst)):
        record_property(key, value)  # into the JUnit XML: bench/tools/junit_summary.py keeps them
    print(f"soak: {REPLAYS} replays, {expect} checks per rank, worst logits error {worst}")
