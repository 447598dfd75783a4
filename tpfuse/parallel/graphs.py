"""CUDA-graph decode: the whole decode step (embedding -> every layer -> final norm -> lm_head) captured once per
batch bucket and replayed.

Static inputs of a bucket of ``Bb`` rows (written before each replay; rows ``>= B`` pad the batch):

==============  ===============  =================================================================================
buffer          shape            content
==============  ===============  =================================================================================
``ids``         [Bb] int64       the new token of each row (pad rows: 0)
``cache_pos``   [Bb] int64       cache index of the new token = tokens already cached (pad rows: 0)
``rope_pos``    [Bb] int64       its RoPE position, in the graphs captured for explicit ``position_ids`` only (the
                                 others rotate by ``cache_pos``)
``rows``        [Bb] int64       storage row of each batch row (pad rows: the scratch row, whose blocks are scratch)
``tables``      [Bb, blocks]     those rows' block tables
==============  ===============  =================================================================================

``rows`` and ``tables`` change only when the batch size changes; inside the graph the slots and sequence lengths
are derived on the device (:func:`~tpfuse.parallel.batch.decode_meta`), so a replay needs no host-side metadata
and no sync. The
graphs share one memory pool; the collectives inside them are the communicator's graph-safe kernels, captured in
the same order on every rank (every rank runs the same steps). The logits buffer is overwritten by the next replay:
:meth:`DecodeGraphs.run` returns a copy. With ``KVCacheConfig.pdl`` (the default) the warm-up and the capture run
inside :func:`tpfuse.kernels.pdl.launches`: tpfuse's Triton kernels are captured with programmatic dependent launch;
if that capture raises, the bucket is captured again without it (a warning says why) and so are later buckets.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from ..errors import TPFuseError
from .batch import StepMeta, decode_meta


class _BucketGraph:
    def __init__(self, bucket: int, explicit_rope: bool, storage,
                 step: Callable[[torch.Tensor, StepMeta], torch.Tensor], pool, pdl: bool = False):
        dev = storage.device
        self.bucket, self.storage, self.step = bucket, storage, step
        self.ids = torch.zeros(bucket, dtype=torch.int64, device=dev)
        self.cache_pos = torch.zeros(bucket, dtype=torch.int64, device=dev)
        self.rope_pos = torch.zeros(bucket, dtype=torch.int64, device=dev) if explicit_rope else self.cache_pos
        self.rows = torch.full((bucket,), storage.max_batch, dtype=torch.int64, device=dev)
        self.tables = storage.block_tables.index_select(0, self.rows)
        self.active = 0
        self.pdl = pdl
        from ..kernels import pdl as pdl_launch  # imports Triton: only once a graph is captured

        try:
            with pdl_launch.launches(pdl):
                self._capture(pool)
        except RuntimeError as e:
            if not pdl or isinstance(e, TPFuseError):  # tpfuse's own errors (a peer, a misuse) are not PDL's
                raise
            # PDL is on by default: a driver / stack that cannot capture it must cost the speed-up, not the decode;
            # every rank runs the same stack, so at TP > 1 all of them take this path and capture again alike
            warnings.warn(f"tpfuse: capturing the decode graph with programmatic dependent launch failed ({e}); "
                          f"captured without it (KVCacheConfig(pdl=False) skips the attempt)", stacklevel=3)
            self.pdl = False
            self._capture(pool)

    def _body(self) -> torch.Tensor:
        return self.step(self.ids, decode_meta(self.storage, self.rows, self.tables, self.cache_pos, self.rope_pos))

    def _capture(self, pool) -> None:
        # warm up on a side stream (Triton compiles, cuBLAS picks its kernels), every row on the scratch block
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._body()

    def run(self, ids: torch.Tensor, cache_pos: torch.Tensor, rope_pos: Optional[torch.Tensor]) -> torch.Tensor:
        b = ids.shape[0]
        if self.active != b:  # a new batch size in this bucket: reset the pad rows onto the scratch row
            rows = self.storage.rows
            self.rows.copy_(torch.where(rows[: self.bucket] < b, rows[: self.bucket], self.storage.max_batch))
            self.tables.copy_(self.storage.block_tables.index_select(0, self.rows))
            for buf in (self.ids, self.cache_pos, self.rope_pos):
                buf.zero_()
            self.active = b
        self.ids[:b].copy_(ids)
        self.cache_pos[:b].copy_(cache_pos)
        if rope_pos is not None:
            self.rope_pos[:b].copy_(rope_pos)
        self.graph.replay()
        return self.logits[:b].clone()


class DecodeGraphs:
    """The decode graphs of one parallelized model, captured lazily per bucket (``KVCacheConfig.graph_buckets``)."""

    def __init__(self, storage, buckets, step: Callable[[torch.Tensor, StepMeta], torch.Tensor], pdl: bool = False):
        self.storage, self.buckets, self.step, self.pdl = storage, sorted(buckets), step, pdl
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: Dict[Tuple[int, bool], _BucketGraph] = {}

    def bucket(self, b: int) -> int:
        return next(x for x in self.buckets if x >= b)

    def run(self, ids: torch.Tensor, cache_pos: torch.Tensor, rope_pos: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, vocab]`` of one decode step of ``B = ids.shape[0]`` rows (storage rows ``0 .. B-1``);
        ``rope_pos`` ``None``: rotate by the cache index."""
        key = (self.bucket(ids.shape[0]), rope_pos is not None)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = _BucketGraph(*key, self.storage, self.step, self.pool, self.pdl)
            self.pdl = g.pdl  # a failed PDL capture is not tried again for the other buckets
        return g.run(ids, cache_pos, rope_pos)
