"""Keeping the ranks of a parallelized model on the same call: the prefill signature check and the first-rank
broadcasts that generation uses.

* :func:`check_same_call` - every prefill of a model at TP > 1 (any call that is not a one-token-per-row step on a
  live :class:`~tpfuse.parallel.TPKVCache`) first all-reduces a small int64 signature of the call: batch, width, the
  attention mask's width, real tokens, the cached tokens, and position-weighted digests of the mask and of the real
  token ids (padding ids are ignored), and the model's lm_head split (the vocabulary if the head is
  vocabulary-parallel, else 0: ranks parallelized with different ``KVCacheConfig.vocab_parallel_head`` would
  otherwise meet different collectives at the call's end). When the ranks' signatures differ, every rank raises
  :class:`~tpfuse.errors.TPFuseMismatchError` before any other collective of the call, so ranks handed different
  prompts fail together instead of aborting inside the backend or computing from different prompts; the next
  matching call runs normally. Decode steps are not checked: they stay free of host reads and extra collectives.
  Cost: one all-reduce of 16 int64 and one host read of the result per prefill; on 2 CPU ranks over gloo about
  1 ms, mostly the all-reduce's latency (``tests/distributed/test_rank_sync.py`` prints it).
* :func:`broadcast_from_first` - a tensor from the group's first rank to all (what ``generate`` does with the
  chosen tokens, and transformers' ``generate`` with the scores, see :mod:`~tpfuse.parallel.hf_generate`).

Where collectives run: on ``comm.device`` for NCCL; on CPU tensors for any other backend (gloo), since
``comm.device`` may be a GPU while the group is gloo.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from .. import collectives
from ..errors import TPFuseMismatchError

FIELDS = ("batch", "width", "mask width", "real tokens", "cached tokens", "mask digest", "ids digest",
          "ids square digest", "vocab-parallel lm_head")


def collective_device(comm) -> torch.device:
    return comm.device if comm.backend == "nccl" else torch.device("cpu")


def broadcast_from_first(comm, t: torch.Tensor) -> torch.Tensor:
    """``t`` (in place) as the group's first rank has it."""
    return collectives.broadcast_(t, dist.get_global_rank(comm.group, 0), comm.group, backend=comm.backend)


def call_signature(ids2: torch.Tensor, attention_mask: Optional[torch.Tensor], cached: List[int],
                   device: torch.device, head_split: int = 0) -> torch.Tensor:
    """``[len(FIELDS)]`` int64 on ``device``. Digests wrap around in int64 alike on every rank. ``head_split``: the
    vocabulary of a vocabulary-parallel lm_head, 0 for a replicated one."""
    ids = ids2.to(device=device, dtype=torch.int64)
    b, w = ids.shape
    mask = (torch.ones_like(ids) if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.int64))
    real = mask[:, -w:] if mask.shape[-1] >= w else torch.ones_like(ids)  # a bad mask is the forward's to reject
    pos = torch.arange(1, mask.numel() + 1, device=device).view_as(mask)
    live = ids * real
    wpos = torch.arange(1, b * w + 1, device=device).view(b, w)
    shape = torch.tensor([b, w, mask.shape[-1]], dtype=torch.int64, device=device)
    sums = torch.stack([real.sum(), torch.tensor(sum(cached), device=device), (mask * pos).sum(),
                        (live * wpos).sum(), (live * live * wpos).sum(), torch.tensor(head_split, device=device)])
    return torch.cat([shape, sums])


def check_same_call(comm, ids2: torch.Tensor, attention_mask: Optional[torch.Tensor], cached: List[int],
                    head_split: int = 0) -> None:
    """Raise :class:`TPFuseMismatchError` on every rank when the ranks' calls differ (see the module docstring)."""
    sig = call_signature(ids2, attention_mask, cached, collective_device(comm), head_split)
    both = torch.cat([sig, -sig])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=comm.group)
    got = both.tolist()
    hi, neg_lo = got[: len(FIELDS)], got[len(FIELDS):]
    differ = [f for f, a, b in zip(FIELDS, hi, neg_lo) if a != -b]
    if "vocab-parallel lm_head" in differ:
        raise TPFuseMismatchError(
            f"the ranks parallelized the model differently: its lm_head is vocabulary-parallel on some ranks and "
            f"replicated on others (this rank {comm.rank}: {'vocabulary-parallel' if head_split else 'replicated'}); "
            f"pass the same KVCacheConfig(vocab_parallel_head=...) on every rank (the call was not run on any rank)")
    if differ:
        mine = sig.tolist()
        raise TPFuseMismatchError(
            f"the ranks called the parallelized model with different inputs ({', '.join(differ)} differ; this rank "
            f"{comm.rank}: batch {mine[0]}, width {mine[1]}, {mine[3]} real tokens): every rank must pass the same "
            f"input_ids and attention_mask (the call was not run on any rank)")
