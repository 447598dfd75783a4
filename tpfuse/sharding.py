"""Token sharding used by the sequence-parallel ops (one rule everywhere, so ranks always agree).

A ``[T, H]`` activation is split along tokens into ``TP`` contiguous ranges of ``S = ceil(T / TP)`` rows; the last
ranges are shorter or empty when ``TP`` does not divide ``T``. Internally the ops pad ``T`` to ``S * TP`` and drop
the padding, so callers never see padded rows.

=========  =========================  ===============================================
T, TP       shard rows per rank        example
=========  =========================  ===============================================
8, 2        4, 4                       rank 1 owns tokens 4..7
5, 2        3, 2                       rank 1 owns tokens 3..4
5, 4        2, 2, 1, 0                 rank 3 owns no token (an empty ``[0, H]`` shard)
=========  =========================  ===============================================
"""

from __future__ import annotations

from typing import Tuple


def shard_rows(num_tokens: int, tp: int) -> int:
    """Rows of a full (padded) shard: ``ceil(T / TP)``."""
    return -(-num_tokens // tp)


def shard_range(num_tokens: int, tp: int, rank: int) -> Tuple[int, int]:
    """``[start, end)`` token range that ``rank`` owns."""
    s = shard_rows(num_tokens, tp)
    start = min(rank * s, num_tokens)
    return start, min(start + s, num_tokens)


def shard_len(num_tokens: int, tp: int, rank: int) -> int:
    start, end = shard_range(num_tokens, tp, rank)
    return end - start
