"""Vocabulary-parallel lm_head: at TP > 1 each rank keeps one range of the vocabulary's rows of the lm_head and
computes only those logits; one all-reduce of the zero-padded logits gives every rank all of them.

Why: a replicated head makes every rank read the whole ``[vocab, hidden]`` weight each decode step - 2.1 GB of
Llama-3.1-70B's 128256 x 8192 bf16 head on each of 8 ranks (716 us of its rank's 8.1 ms step at batch 1 on one
H100, ``bench/results/profile_decode_tp1_h100_70B-tp8_b1_36cdb97.json``) - where a ``vocab / TP`` slice is 1/8 of
that, and it holds ``(TP - 1) / TP`` of the weight in memory the KV cache could use. vLLM, SGLang and TensorRT-LLM
shard the head the same way.

Contract (per rank; ``V`` = vocabulary, ``H`` = hidden, ``T`` = tokens whose logits are asked for):

=====================  ==================  =====================================================================
tensor                 shape               meaning
=====================  ==================  =====================================================================
lm_head ``weight``     ``[n_r, H]``        rows ``[s_r, s_r + n_r)`` of the full head (:func:`vocab_range`:
                                           ``s_r = r * ceil(V / TP)``; the last ranks may hold fewer, or none)
``x``                  ``[T, H]``          the final norm's output, the same on every rank
``part``               ``[T, n_r]``        ``x @ weight.T``: this rank's logits (``lm_head(x)``)
``buf``                ``[R * H]`` flat    zeros, ``part`` at columns ``[s_r, s_r + n_r)`` of its first ``T * V``
                                           elements viewed ``[T, V]``; ``R = ceil(T * V / H)``
result                 ``[T, V]``          ``all_reduce(buf viewed [R, H])[: T * V]``: each column has exactly
                                           one non-zero term, so the sum is exact in any dtype and order
=====================  ==================  =====================================================================

The all-reduce is the communicator's (``comm.all_reduce``: its dispatcher picks the path by ``R`` rows; ``R`` is
cut into calls of at most ``comm.max_tokens`` rows), so it runs wherever the layers' reductions run: gloo on CPU,
symmetric memory or NCCL on GPUs, inside the decode graphs. It moves ``TP`` times the bytes a gather would (the
zeros), which at decode batches is far below the head bytes it saves (at batch 1, 70B: 16 rows of 8192 against
1.84 GB of weight per rank). What must match across ranks: ``T`` (every rank computes the logits of the same
tokens, as every layer's collective already requires) and the head's split (from ``V`` and ``TP`` only).

Kept replicated (:func:`why_replicated`): a head tied to the input embedding (``tie_word_embeddings``: the
embedding needs every row), a module that is not a plain ``nn.Linear``, TP = 1, and
``KVCacheConfig.vocab_parallel_head=False``. A benchmark's no-communication floor (``TPState.local`` at TP > 1)
skips the all-reduce: its logits outside this rank's range stay zero, wrong by design like its layers'.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .layers import get_path


def vocab_range(vocab: int, tp: int, rank: int) -> Tuple[int, int]:
    """``[start, end)`` of the vocabulary rows rank ``rank`` keeps: ``ceil(V / TP)`` rows a rank, the last ranks
    fewer (``V`` need not divide by TP; a rank past the end keeps none)."""
    step = -(-vocab // tp)
    start = min(vocab, rank * step)
    return start, min(vocab, start + step)


def why_replicated(model, layout, tp: int, enabled: bool) -> Optional[str]:
    """Why the lm_head stays replicated on every rank, or ``None`` when it is sharded by vocabulary rows."""
    if tp == 1:
        return "TP = 1"
    if not enabled:
        return "KVCacheConfig.vocab_parallel_head=False"
    head = get_path(model, layout.lm_head)
    if type(head) is not nn.Linear:
        return f"{layout.lm_head} is a {type(head).__name__}, not an nn.Linear"
    if head.weight is get_path(model, layout.embed).weight:
        return "the lm_head is tied to the input embedding (tie_word_embeddings), which needs every row"
    return None


def shard_head(model, layout, tp: int, rank: int, shards: Dict[str, object]) -> Tuple[int, int]:
    """Keep this rank's :func:`vocab_range` of the lm_head's rows (weight and bias; meta tensors: shapes only) and
    record them in ``shards`` (what :func:`~tpfuse.parallel.load_sharded_safetensors` reads). Returns the range."""
    from .wrap import _shard_column

    head = get_path(model, layout.lm_head)
    start, end = vocab_range(head.out_features, tp, rank)
    _shard_column(head, layout.lm_head, ((start, end),), shards)
    return start, end


def gather_logits(comm, part: torch.Tensor, start: int, vocab: int, *, local: bool = False) -> torch.Tensor:
    """The full logits ``[T, V]`` from every rank's ``part [T, n_r]`` (columns ``[start, start + n_r)``), by one
    or more all-reduces of the zero-padded ``[R, H]`` rows (module docstring). ``local``: no collective (the
    benchmarks' no-communication floor). Graph-capturable: no host sync, shapes from ``T`` only."""
    t, hidden = part.shape[0], comm.hidden_size
    rows = -(-t * vocab // hidden)
    buf = part.new_zeros(rows * hidden)
    buf[: t * vocab].view(t, vocab)[:, start: start + part.shape[1]] = part
    if local or t == 0:
        return buf[: t * vocab].view(t, vocab)
    flat = buf.view(rows, hidden)
    cap = comm.max_tokens
    done = [comm.all_reduce(flat[i: i + cap]) for i in range(0, rows, cap)]
    out = done[0] if len(done) == 1 else torch.cat(done)
    return out.view(-1)[: t * vocab].view(t, vocab)
