"""FP8 quality on the tiny model (``tpfuse.models.hf_tiny``, O(1) random weights): the bf16 parallelized model and
its FP8 conversion (``quantize_fp8``: per-token activations, per-channel weights), both greedy for ``steps`` tokens
from ``prompts`` random prompts (collective: every rank calls it with the same arguments).

Reported:
* ``greedy_agreement``: over the bf16 model's greedy continuations, the fraction of the ``steps`` positions where
  the FP8 model, fed the same prefix, picks the same next token (target >= 0.9);
* ``free_run_agreement``: the fraction of positions where the two models' own greedy sequences agree (after a
  first disagreement they continue from different contexts, so this measures when that happens, not quality);
* ``fp8_logits_rel_err`` / ``bf16_logits_rel_err``: the prefill+continuation logits vs the fp64 oracle of the
  FP8 model (e4m3 weights dequantized) / of the bf16 model.
"""

from __future__ import annotations

import copy

import torch


def _model(tp: int, dev, fp8: bool):
    import tpfuse
    from tpfuse.models import hf_tiny
    from tpfuse.parallel import KVCacheConfig, quantize_fp8

    m = hf_tiny.build(tp=tp, layers=2, max_positions=512).to(torch.bfloat16)
    if fp8:
        quantize_fp8(m)
    ref = copy.deepcopy(m)  # the oracle runs the unsharded (converted) model: copied before parallelize
    comm = tpfuse.TPCommunicator(max_tokens=256, hidden_size=m.config.hidden_size, dtype=torch.bfloat16)
    model = tpfuse.parallelize(m, comm, cache=KVCacheConfig(max_batch=1, max_seq_len=256))
    return model, comm, (lambda ids: hf_tiny.oracle_logits(ref, ids))


def fp8_quality(tp: int, dev, steps: int = 64, prompts: int = 4, prompt_len: int = 8) -> dict:
    from tpfuse.parallel import generate
    from tpfuse.tolerance import rel_err

    bf, bf_comm, bf_oracle = _model(tp, dev, fp8=False)
    f8, f8_comm, f8_oracle = _model(tp, dev, fp8=True)
    g = torch.Generator().manual_seed(0)
    agree, free, err8, err16 = [], [], [], []
    for _ in range(prompts):
        p = torch.randint(0, bf.config.vocab_size, (1, prompt_len), generator=g).to(dev)
        seq = generate(bf, p, max_new_tokens=steps).sequences
        seq8 = generate(f8, p, max_new_tokens=steps).sequences
        free.append(float((seq[0, prompt_len:] == seq8[0, prompt_len:]).float().mean()))
        ctx = seq[:, :-1]
        l8 = f8(ctx, use_cache=False).logits[0]
        l16 = bf(ctx, use_cache=False).logits[0]
        agree.append(float((l8[prompt_len - 1:].argmax(-1) == seq[0, prompt_len:]).float().mean()))
        err8.append(rel_err(l8.cpu(), f8_oracle(ctx[0].cpu())))
        err16.append(rel_err(l16.cpu(), bf_oracle(ctx[0].cpu())))
    bf_comm.close()
    f8_comm.close()
    mean = (lambda xs: round(sum(xs) / len(xs), 4))
    return dict(steps=steps, prompts=prompts, greedy_agreement=mean(agree), greedy_agreement_min=min(agree),
                free_run_agreement=mean(free), fp8_logits_rel_err=mean(err8), bf16_logits_rel_err=mean(err16))


if __name__ == "__main__":  # one process, CPU or one GPU
    import common  # the script's folder is on sys.path

    with common.rank_context("nccl" if torch.cuda.is_available() else "gloo", single_process=True) as ranks:
        print(fp8_quality(1, ranks.device))
