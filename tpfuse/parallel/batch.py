"""From a Hugging Face style call (padded ``input_ids [B, L]``, ``attention_mask``, ``position_ids``) to the packed
token batch the decoder runs.

The decoder never sees padding: the real tokens of all rows are packed into ``[T, ...]`` (row-major: row 0's tokens,
then row 1's), so the communicator moves ``T x hidden`` activations, not ``B x L x hidden``. Per packed token:

=================  =========  ======================================================================================
tensor             shape      meaning
=================  =========  ======================================================================================
``ids``            [T] int64  token ids
``rope_pos``       [T] int64  RoPE position: ``position_ids`` where given, else the cache index below
``slot_mapping``   [T] int64  KV-cache slot ``block * block_size + offset`` of the token's cache index
                              ``lengths[b] + j`` (``j``-th real token of row ``b`` in this call); ``-1`` without a
                              cache (nothing is written)
=================  =========  ======================================================================================

A call is a **decode step** when every row brings exactly one token (not merely ``T == B``: a row may bring none
while another brings two): attention then runs
:func:`tpfuse.attention.decode_attention` over the cache (``block_tables [B, blocks]``, ``seq_lens [B]`` including
the new token), and on CUDA the whole step can be a CUDA-graph replay. Any other call is a **prefill** (one
``(start, n, row, past)`` entry per row with tokens) and runs causal SDPA per row (over the cached prefix where
``past > 0``).

Host-device traffic: with no ``attention_mask`` (or one on the host) nothing is read back from the GPU; a mask on
the GPU is read once per call (its zeros decide the shapes), and so are ``position_ids`` of a prefill (checked
against the RoPE table) - transformers' ``generate()`` passes both on every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..errors import TPFuseInputError
from .kv_cache import TPKVCache


@dataclass
class DecodeMeta:
    """Attention metadata of a decode step (one token per row)."""

    block_tables: torch.Tensor
    """[B, blocks_per_seq] int32."""
    seq_lens: torch.Tensor
    """[B] int64, cached tokens including this step's."""


@dataclass
class StepMeta:
    """What every layer of one forward step shares (see the module docstring)."""

    num_tokens: int
    rope_pos: torch.Tensor
    slot_mapping: Optional[torch.Tensor]
    """``None``: no cache in this call (RoPE only, nothing stored)."""
    decode: Optional[DecodeMeta] = None
    prefill: Tuple[Tuple[int, int, int, int], ...] = ()
    """Per row with tokens: ``(start in the packed batch, tokens, batch row, cached tokens before)``."""
    sp: bool = False
    """Sequence-parallel form (token shards between the collectives)."""


@dataclass
class PackedCall:
    """One call's packed tokens, their metadata, and how to put per-token results back into ``[B, L]``."""

    ids: torch.Tensor
    meta: StepMeta
    batch: int
    width: int
    """``L``, the padded call width."""
    counts: List[int]
    """Real tokens per row."""
    token_index: Optional[torch.Tensor]
    """[T] flat index ``b * L + j`` of each packed token in ``[B, L]``; ``None`` when there is no padding."""
    decode_step: bool = False
    """One token per row with a cache: ``meta`` holds only ``rope_pos`` (``None``: the cache index); the rest comes
    from :meth:`decode_meta`."""

    def decode_meta(self, cache: TPKVCache) -> StepMeta:
        st, b = cache.storage, self.batch
        pos = cache.lengths_dev
        return decode_meta(st, st.rows[:b], st.block_tables[:b], pos, pos if self.meta.rope_pos is None
                           else self.meta.rope_pos)


def _new_token_mask(attention_mask: Optional[torch.Tensor], b: int, width: int) -> Optional[torch.Tensor]:
    """Host bool ``[B, L]`` of the call's real tokens, or ``None`` when all are real."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < width:
        raise TPFuseInputError(f"attention_mask must be [batch={b}, >= {width}] (2-D, the cached columns first), "
                               f"got {tuple(attention_mask.shape)}")
    m = attention_mask[:, -width:]
    m = (m.cpu() if m.device.type != "cpu" else m).bool()
    return None if bool(m.all()) else m


def check_fits(cache: Optional[TPKVCache], counts: List[int]) -> None:
    if cache is None:
        return
    limit = cache.storage.max_seq_len
    for row, (have, new) in enumerate(zip(cache.lengths, counts)):
        if have + new > limit:
            raise TPFuseInputError(f"sequence {row} would hold {have + new} tokens (cached {have} + {new} new), more "
                                   f"than the KV cache's max_seq_len={limit} (KVCacheConfig.max_seq_len)")


def decode_meta(storage, rows: torch.Tensor, tables: torch.Tensor, cache_pos: torch.Tensor,
                rope_pos: torch.Tensor) -> StepMeta:
    """Metadata of a decode step, computed on the device in two kernels (graph-capturable): batch row ``i`` is
    storage row ``rows[i]`` (block table ``tables[i]``) and its new token goes to cache index ``cache_pos[i]``."""
    slots = torch.add(cache_pos, rows, alpha=storage.seq_stride)  # the static paging: see KVStorage
    return StepMeta(num_tokens=cache_pos.shape[0], rope_pos=rope_pos, slot_mapping=slots,
                    decode=DecodeMeta(block_tables=tables, seq_lens=cache_pos + 1))


def _rope_pos(position_ids, b, width, token_index, cache_pos, device):
    if position_ids is None:
        return cache_pos.to(device, non_blocking=True)
    if position_ids.shape != (b, width):
        raise TPFuseInputError(f"position_ids must be [{b}, {width}] like input_ids, got {tuple(position_ids.shape)}")
    pos = position_ids.reshape(-1).to(device)
    return pos if token_index is None else pos.index_select(0, token_index)


def pack(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
         cache: Optional[TPKVCache], device: torch.device) -> PackedCall:
    """Pack a ``[B, L]`` call (see the module docstring). Raises :class:`TPFuseInputError` before any GPU work when
    the call does not fit the cache. A decode step's metadata is left for :meth:`PackedCall.decode_meta` (built on
    the device, or inside the CUDA graph)."""
    b, width = input_ids.shape
    mask = _new_token_mask(attention_mask, b, width)
    counts = [width] * b if mask is None else mask.sum(1).tolist()
    check_fits(cache, counts)
    t = sum(counts)
    if t == 0:
        raise TPFuseInputError("the call has no real tokens (attention_mask is all zeros over input_ids)")
    flat_ids = input_ids.reshape(-1).to(device)
    if cache is not None and all(c == 1 for c in counts):  # one token per row: a decode step
        token_index = None if mask is None else mask.reshape(-1).nonzero().squeeze(1).to(device)
        ids = flat_ids if token_index is None else flat_ids.index_select(0, token_index)
        rope_pos = None if position_ids is None else _rope_pos(position_ids, b, width, token_index, None, device)
        meta = StepMeta(num_tokens=t, rope_pos=rope_pos, slot_mapping=None)
        return PackedCall(ids=ids, meta=meta, batch=b, width=width, counts=counts, token_index=token_index,
                          decode_step=True)
    past = cache.lengths if cache is not None else [0] * b
    if mask is None:
        token_index = None
        ids = flat_ids
        rows = torch.arange(b).repeat_interleave(width)
        within = torch.arange(width).repeat(b)
    else:
        nz = mask.reshape(-1).nonzero().squeeze(1)
        token_index = nz.to(device)
        ids = flat_ids.index_select(0, token_index)
        rows = nz // width
        within = torch.cat([torch.arange(c) for c in counts])
    cache_pos = torch.tensor(past, dtype=torch.int64)[rows] + within
    slot = None
    if cache is not None:
        st = cache.storage
        blocks = st.block_tables_host[rows, cache_pos // st.block_size].to(torch.int64)
        slot = (blocks * st.block_size + cache_pos % st.block_size).to(device, non_blocking=True)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    prefill = tuple((starts[r], counts[r], r, past[r]) for r in range(b) if counts[r])
    meta = StepMeta(num_tokens=t, rope_pos=_rope_pos(position_ids, b, width, token_index, cache_pos, device),
                    slot_mapping=slot, prefill=prefill)
    return PackedCall(ids=ids, meta=meta, batch=b, width=width, counts=counts, token_index=token_index)
