"""transformers' ``generate()`` on a parallelized model: the same tokens on every rank.

At TP > 1 every rank runs transformers' generation loop on its own copy of the logits. Greedy decoding agrees only
while the ranks' logits agree bit for bit (a fused all-reduce may sum in a different order per rank), and sampling
draws from each rank's own RNG: ranks would pick different tokens without any error, then feed them into the same
collectives. :func:`parallelize` therefore replaces the model's ``generate`` with :func:`tp_hf_generate`, which

* checks, before the first step, that the prompts plus ``max_new_tokens`` fit the KV cache (:func:`check_room`);
* at TP > 1, adds a logits processor that replaces every step's scores with the group's first rank's (a broadcast
  of ``[B, vocab]`` fp32 per step): transformers' own processors and warpers (temperature, top-k, top-p, ...)
  then see identical input on every rank, whatever order it applies them in;
* at TP > 1, runs the loop with every rank's RNG seeded by one seed the first rank draws from its own RNG (so
  ``torch.manual_seed`` on the ranks makes runs reproducible), and restores each rank's RNG state afterwards
  (``torch.random.fork_rng``): sampling, beam sampling included, draws the same numbers on every rank.

Everything else is transformers' ``generate`` unchanged. :func:`tpfuse.parallel.generate` is the fast path (it
broadcasts only the chosen tokens, and replays CUDA graphs without transformers' per-step host work).
"""

from __future__ import annotations

import torch

from ..errors import TPFuseInputError
from .rank_sync import broadcast_from_first, collective_device


def check_room(st, input_ids: torch.Tensor, attention_mask, max_new_tokens: int, fn: str) -> None:
    """Raise before prefill when the longest prompt + ``max_new_tokens`` would overflow the KV cache (the last new
    token is never cached, so the cache needs ``prompt + max_new_tokens - 1`` slots)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        prompt = int(attention_mask.sum(1).max())
    else:
        prompt = int(input_ids.shape[-1])
    need = prompt + max_new_tokens - 1
    if need > st.max_seq_len:
        raise TPFuseInputError(
            f"{fn}: prompts of up to {prompt} tokens + max_new_tokens={max_new_tokens} need {need} KV-cache slots "
            f"per sequence, more than max_seq_len={st.max_seq_len}: lower max_new_tokens, or pass "
            f"{st.entry}(..., cache=KVCacheConfig(max_seq_len=...)) a larger one (nothing was generated)")


class _FirstRankScores:
    """A transformers logits processor: every rank's scores become the first rank's (see the module docstring)."""

    def __init__(self, comm):
        self.comm = comm

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return broadcast_from_first(self.comm, scores.contiguous())


def _max_new_tokens(model, input_ids, generation_config, kwargs):
    cfg = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    n = kwargs.get("max_new_tokens", getattr(cfg, "max_new_tokens", None))
    if n is None:
        total = kwargs.get("max_length", getattr(cfg, "max_length", None))
        n = None if total is None or input_ids is None else total - input_ids.shape[-1]
    return n


def _shared_seed(comm) -> int:
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(collective_device(comm))
    return int(broadcast_from_first(comm, seed))


def tp_hf_generate(self, inputs=None, generation_config=None, logits_processor=None, **kwargs):
    """transformers' ``generate`` (same arguments and result), consistent across ranks: see the module docstring.
    Collective at TP > 1: call it on every rank with the same arguments."""
    from transformers import LogitsProcessorList

    st = self._tpfuse
    hf_generate = type(self).generate
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    n = _max_new_tokens(self, ids, generation_config, kwargs)
    if isinstance(ids, torch.Tensor) and isinstance(n, int) and n > 0:
        check_room(st, ids, kwargs.get("attention_mask"), n, "generate")
    if st.local:
        return hf_generate(self, inputs, generation_config=generation_config, logits_processor=logits_processor,
                           **kwargs)
    comm = st.comm
    procs = LogitsProcessorList([*(logits_processor or []), _FirstRankScores(comm)])
    seed = _shared_seed(comm)
    devices = [comm.device] if comm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        return hf_generate(self, inputs, generation_config=generation_config, logits_processor=procs, **kwargs)
