"""The parallelized model's static, paged KV cache and the per-batch handle that generation passes around.

Storage (allocated once, on the first forward that uses a cache, by :class:`KVStorage`)::

    key[l], value[l]   [num_blocks, block_size, kv_heads / TP, head_dim]   per layer l, KVCacheConfig.dtype
    block_tables       [max_batch + 1, blocks_per_seq] int32               row b = the blocks of batch row b
    cos_sin            [max_positions, head_dim] fp32                      RoPE rows [cos(p f) | sin(p f)]

``num_blocks = max_batch * blocks_per_seq + 1``: batch row ``b`` owns blocks ``[b * blocks_per_seq, (b + 1) *
blocks_per_seq)``, so its cache index ``i`` is slot ``b * seq_stride + i`` (``seq_stride = blocks_per_seq *
block_size``; a static paging: the attention kernels read through ``block_tables``, so a dynamic allocator would
change only how slots are computed), and the last block is scratch - the rows that pad a CUDA-graph batch bucket write there and read only it
(``block_tables[max_batch]`` points every entry at it). The layout is :func:`tpfuse.rope.rope_kv_cache_write`'s
(``slot = block * block_size + offset``) and :func:`tpfuse.attention.decode_attention`'s.

A :class:`TPKVCache` is one batch of sequences living in the storage: row ``b`` of the batch is storage row ``b``;
``lengths[b]`` tokens of it are cached (pads are never cached: the forward packs the real tokens). A forward
without a cache starts a new batch and invalidates every older handle of the same model (one batch at a time per
model); using a stale handle raises.

Lengths are kept twice: a host list (for checks and shapes, never read back from the GPU) and a device tensor (what
the CUDA-graph decode step reads), both advanced by the forward without a host-device sync.

Capacity and the cost of a decode step: a step's work follows the batch and the lengths, not ``max_batch`` or
``max_seq_len``. The block tables are views (never copied per step) read only up to each sequence's length, and
the decode attention's launch and partitions do not depend on ``max_seq_len``
(:mod:`tpfuse.kernels.decode_attention`); the RoPE table is indexed by position; the per-step copies and device
updates (tokens, lengths, slots) are ``[B]``. ``max_batch`` enters only through the CUDA-graph bucket a batch is padded to
(:attr:`KVCacheConfig.graph_buckets`, plus ``max_batch`` itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import rope as tp_rope
from ..errors import TPFuseInputError


@dataclass(kw_only=True)
class KVCacheConfig:
    """Size and form of the parallelized model's KV cache and decode graphs (``parallelize(..., cache=...)``)."""

    max_batch: int = 8
    """Most sequences in one batch (one call's ``input_ids.shape[0]``)."""
    max_seq_len: Optional[int] = None
    """Most tokens per sequence (prompt + generated). ``None``: ``min(max_position_embeddings, 4096)``."""
    block_size: int = 256
    """Tokens per cache block (a power of two >= 16)."""
    dtype: Optional[torch.dtype] = None
    """Cache dtype: ``None`` = the model's dtype; ``torch.float8_e4m3fn`` stores ``k / kv_scale`` in e4m3."""
    kv_scale: float = 1.0
    """FP8 caches only: the dequantization scale of k and v (finite, > 0)."""
    cuda_graphs: bool = True
    """Capture the decode step (one new token per sequence) in a CUDA graph per batch bucket and replay it."""
    graph_buckets: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    """Batch sizes a decode graph is captured for (a batch runs in the smallest bucket that holds it, padded);
    buckets above ``max_batch`` are dropped and ``max_batch`` is added."""
    pdl: bool = True
    """Capture the decode graphs with programmatic dependent launch (sm_90 and later; ignored elsewhere): tpfuse's
    local Triton kernels in the step (norms, SiLU*mul, quantize, RoPE, decode attention, small-M GEMM) may be
    scheduled while the kernel before them finishes, hiding their launch behind its tail; the fused all-reduce,
    cuBLAS and torch kernels launch as always (:mod:`tpfuse.kernels.pdl`). On by default: on the full 8B (one
    H100, ``bench/results/e2e_tp1_h100_ab_4dbc35c.json``), with every GEMM on the small-M kernel as the shipped
    table now routes them at batch 1 / 8, the decode step took 0.96 / 0.99x as long in bf16 and 0.94 / 0.98x in
    per-channel FP8 (rows ``_smallall_pdl_nopf`` over the base rows without PDL); at batch 64, with the routes
    unchanged, 0.99x (bf16, FP8) and 1.00x (static FP8) (rows ``_pdl``, which had the L2 prefetch on). Where the
    step's GEMMs stay on cuBLAS it pays less or costs: bf16 at batch 8 with the old routes took 1.02x. Only on
    stacks that have it (:func:`tpfuse.kernels.pdl.stack_has_pdl`); a capture that fails with it is redone without
    it, with a warning (:mod:`tpfuse.parallel.graphs`); False captures without it."""
    fuse_rope: bool = True
    """True: decode steps rope q and the new k (after the per-head QK-norm where the model has one), write the new
    k / v into the cache and attend in one kernel (:func:`tpfuse.attention.rope_decode_attention`) instead of a
    RoPE + cache-write kernel before the decode attention: one launch fewer per layer (three or more for QK-norm
    models: their QK-norm + RoPE kernel and the cache write's copies, more of them with an FP8 cache). On by
    default: in ``bench/results/e2e_tp1_h100_rope_ab_28139fe.json`` (one H100, TP = 1, context 1024, both paths in
    one run) the decode step took 0.988 / 0.985x as long at batch 1 / 8 on Qwen3-32B (QK-norm) and 0.998 / 1.006x
    on the Llama-3.1-8B shape (one 32-step measurement a row: a tie); its GPU tests passed in the same call (``bash
    bench/gpu_run.sh fusedrope``). On the full 8B on one H200 (``e2e_tp1_h200_full_0fc9473.json``, rows ``_ropesep``)
    1.00x at batch 1 / 8 / 64 in bf16, 0.99-1.01x in FP8. False: the separate kernels. Prefill always runs the
    separate kernels."""
    fold_norms: bool = True
    """True: at TP = 1, a step of at most 64 tokens (decode; a short prefill too) runs each residual add + RMSNorm
    inside the GEMMs around it instead of a kernel of its own: o_proj and down_proj add the residual in their
    epilogue and write the next GEMM's rows times the norm weight and the sums of squares
    (:func:`tpfuse.small_gemm.small_m_gemm_add`), and the gate-up (with SiLU*mul) and the next layer's qkv scale
    each token's sums by its rstd (:func:`tpfuse.small_gemm.small_m_gemm` with ``norm_sumsq``): two kernels fewer per
    layer, every GEMM of the layer on the small-M kernel. bf16 layers without o / down biases only (others run as
    before: fp16's range may not hold the un-normalized rows ``h * w_norm``); TP > 1 keeps the fused all-reduce +
    add + RMSNorm. On: on the full 8B on one H100 at 1c5cd04 (``bench/results/e2e_tp1_h100_fold_ab_1c5cd04.json``,
    rows ``_foldnorm``, the same run) the decode step took 0.986 / 0.993 / 1.001x as long at batch 1 / 8 / 64 with
    it (0.99 / 1.00 / 1.00x on one H200 at 0fc9473, before PDL and the routing of today); its 39 GPU tests
    (``test_small_m_gemm_add.py``, ``test_fold_norms_model.py``) passed there at 1c5cd04. False: the add + RMSNorm
    kernels."""

    prefetch_o_proj: bool = False
    """True: a decode step's attention brings the o_proj weight into L2 while it runs (at small batch the attention
    leaves HBM idle; the o_proj GEMM after it then reads its weight from L2): the fused RoPE + attention kernel's
    programs issue the prefetches as they start (``fuse_rope``; ``rope_decode_attention(prefetch=)``), the unfused
    kernels run beside a side stream that does (:mod:`tpfuse.parallel.prefetch`). Values are the same either way (a
    prefetch writes nothing). Off: the side-stream form did not pay (on the full 8B, one H100, 10af663,
    ``bench/results/e2e_tp1_h100_opf_ab_10af663.json``, rows ``_opf``: 1.01 / 1.02 / 1.06x the step at batch 1 / 8 /
    64 in bf16, 1.01 / 1.02 / 1.03x in per-channel FP8, 1.00 / 1.02 / 1.03x in static FP8: its graph's fork / join
    edges break the PDL chain around the attention), nor did the in-kernel form (one H100, 0f918e6,
    ``bench/results/e2e_tp1_h100_ab_trig_0f918e6.json``, rows ``_opf``: 1.015 / 1.017 / 1.016 / 1.013x at batch 1 /
    8 / 16 / 64 in bf16, 1.018 / 1.012 / 1.011 / 1.012x in per-channel FP8, 1.016 / 1.029 / 1.021 / 1.019x in static
    FP8; its GPU tests, bit for bit with it off, passed there: ``test_gpu_next_weight_prefetch_under_pdl``,
    ``test_o_proj_prefetch_decode_same_bits``). A/B: ``bench/bench_e2e.py --opf-ab``."""
    fp8_weight_only_max_tokens: int = 0
    """FP8 layers (:func:`~tpfuse.parallel.quantize_fp8` models, FP8 checkpoints) in a step of at most this many
    tokens (a decode step; a short prefill too), in the all-reduce form: their GEMMs run weight-only on the small-M
    kernel (:func:`tpfuse.small_gemm.small_m_gemm` with a bf16 x, the e4m3 weight and its scales, converted to bf16
    in registers), so no activation is quantized: the norms write bf16, SiLU*mul rides in the gate-up's epilogue,
    no quantize kernel (:meth:`~tpfuse.parallel.fp8_layer.FP8DecoderLayer.forward_weight_only`). The weight bytes
    are the checkpoint's; the values are at least as close to the checkpoint's dequantized weights as its activation
    scheme's (per-token or static scales), which is what larger steps run. 0: never; at most 64
    (``small_gemm.MAX_M``). Off: the kernel's e4m3-weight form reads at 0.45-0.60 of the copy bandwidth (its
    weight tiles go through shared memory in 8-byte cp.async and are converted there; one H100, 66e53a3,
    ``bench/results/small_gemm_h100_w8_66e53a3.json``: the 8B's down_proj at M = 1 in 36.7 us, 1.6 TB/s), so on the
    full 8B the weight-only step took 1.46 / 1.34 / 1.68x the activation-quantized one at batch 1 / 16 / 64
    (per-channel; static 1.46 / 1.41 / 1.74x; ``e2e_tp1_h100_w8_ab_66e53a3.json``, rows ``tpfuse_fp8`` vs
    ``_actq``), 0.94x the bf16 step at batch 1. Its GPU test (the CUDA-graph decode at TP 1, RMSNorms folded and
    not, PDL bit for bit, against the fp64 oracle in bf16's budget) passed there. With the GEMMs' main loop on the
    CUDA cores instead (``small_m_gemm.FMA_MAX_M``) the batch-1 step took 1.05x the activation-quantized one (one
    H100, 2e319e0, ``e2e_tp1_h100_fma_ab_2e319e0.json``; static 1.08x)."""
    fold_attn_combine: bool = False
    """True: bf16 / fp16 decode steps whose attention is a split launch (small batches: batch 1 splits each
    sequence 16 ways) leave the split partials, each normalized by its own sum, and o_proj combines them itself
    (:mod:`tpfuse.attention_o`: each K step of o_proj lies in one head, whose combine weights scale that step's
    MMA product), instead of a combine kernel between the attention and o_proj: one launch fewer a layer, o_proj
    reading the partials (``S x`` its x's bytes, from L2) where it read x. Where :func:`tpfuse.attention_o.
    partials_config` allows it (a 16-bit cache, ``next_pow2(B) * next_pow2(splits) <= 64``), with ``fuse_rope``,
    outside sequence-parallel steps, in bf16 / fp16 layers (FP8 layers quantize the attention output); the o_proj
    weight prefetch of ``prefetch_o_proj`` is not issued in folded steps. Off: built
    and tested under the Triton interpreter only, not yet run on a GPU (``bash bench/gpu_run.sh attnfold``: its GPU
    tests and the A/B rows ``_attnfold`` of ``bench_e2e.py --attn-fold-ab``)."""

    vocab_parallel_head: bool = True
    """True: at TP > 1 each rank keeps ``ceil(vocab / TP)`` of the lm_head's rows and computes only their logits,
    and one all-reduce of the zero-padded logits gives every rank all of them
    (:mod:`~tpfuse.parallel.vocab_head`): a decode step reads ``1 / TP`` of the head's bytes on each rank, and the
    rest of that memory holds KV cache. A head tied to the input embedding stays replicated. False: every rank
    keeps the whole head and computes every logit (no collective after the last layer). On: rank 0's shard of the
    step (``bench/bench_e2e.py --head-ab``, one H100, 50df841, ``bench/results/e2e_tp1_h100_shards_head_ab_50df841.json``;
    the logits' all-reduce, like the layers', is not in a shard's step) took 0.920 / 0.927x as long as with the whole
    head at batch 1 / 16 on Llama-3.1-70B at TP 8, 0.959 / 0.963x at TP 4, 0.949 / 0.953x on the 8B at TP 2; the
    model's GPU tests with it passed at TP 2, 4 and 8 in one-GPU mode (8074730, a831093)."""

    def validate(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise TPFuseInputError(f"KVCacheConfig.max_batch must be a positive int, got {self.max_batch!r}")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 1):
            raise TPFuseInputError(f"KVCacheConfig.max_seq_len must be a positive int, got {self.max_seq_len!r}")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise TPFuseInputError(f"KVCacheConfig.block_size must be a power of two >= 16, got {bs!r}")
        if self.dtype not in (None, torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn):
            raise TPFuseInputError(f"KVCacheConfig.dtype must be None, bf16, fp16, fp32 or float8_e4m3fn, got "
                                   f"{self.dtype}")
        if not (isinstance(self.kv_scale, (int, float)) and 0 < float(self.kv_scale) < float("inf")):
            raise TPFuseInputError(f"KVCacheConfig.kv_scale must be a finite number > 0, got {self.kv_scale!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise TPFuseInputError(f"KVCacheConfig.cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if not isinstance(self.pdl, bool):
            raise TPFuseInputError(f"KVCacheConfig.pdl must be a bool, got {self.pdl!r}")
        for name in ("fuse_rope", "fold_norms", "prefetch_o_proj", "fold_attn_combine", "vocab_parallel_head"):
            if not isinstance(getattr(self, name), bool):
                raise TPFuseInputError(f"KVCacheConfig.{name} must be a bool, got {getattr(self, name)!r}")
        n = self.fp8_weight_only_max_tokens
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 64):
            raise TPFuseInputError(f"KVCacheConfig.fp8_weight_only_max_tokens must be an int in [0, 64], got {n!r}")
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.graph_buckets):
            raise TPFuseInputError(f"KVCacheConfig.graph_buckets must be positive ints, got {self.graph_buckets!r}")

    def buckets(self) -> List[int]:
        return sorted({b for b in self.graph_buckets if b < self.max_batch} | {self.max_batch})


class KVStorage:
    """The cache tensors of one parallelized model (see the module docstring for the layout)."""

    def __init__(self, cfg: KVCacheConfig, *, layers: int, kv_heads: int, head_dim: int, max_seq_len: int,
                 model_dtype: torch.dtype, device: torch.device, entry: str = "parallelize"):
        self.cfg, self.device = cfg, device
        self.entry = entry
        """The function the user built the model with (``parallelize`` / ``from_pretrained``), named in errors."""
        self.block_size = cfg.block_size
        self.max_batch, self.max_seq_len = cfg.max_batch, max_seq_len
        self.blocks_per_seq = -(-max_seq_len // cfg.block_size)
        self.seq_stride = self.blocks_per_seq * cfg.block_size
        """Slots per storage row: cache index ``i`` of row ``b`` is slot ``b * seq_stride + i``."""
        self.scratch_block = cfg.max_batch * self.blocks_per_seq
        self.dtype = cfg.dtype or model_dtype
        shape = (self.scratch_block + 1, cfg.block_size, kv_heads, head_dim)
        self.key = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(layers)]
        self.value = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(layers)]
        rows = torch.arange(cfg.max_batch + 1, dtype=torch.int32)[:, None] * self.blocks_per_seq
        tables = rows + torch.arange(self.blocks_per_seq, dtype=torch.int32)[None, :]
        tables[cfg.max_batch] = self.scratch_block
        self.block_tables_host = tables
        self.block_tables = tables.to(device)
        self.rows = torch.arange(cfg.max_batch + 1, dtype=torch.int64, device=device)
        """``[max_batch + 1]``: storage row ids (the last one is the scratch row)."""
        self.kv_scale = (torch.tensor([float(cfg.kv_scale)], dtype=torch.float32, device=device)
                         if self.dtype == torch.float8_e4m3fn else None)
        self.epoch = 0
        self.live: Optional["TPKVCache"] = None
        self._no_slots = torch.full((16,), -1, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.key + self.value)

    def describe(self) -> str:
        return (f"KV cache: {len(self.key)} layers x {self.max_batch} sequences x {self.max_seq_len} tokens "
                f"({self.blocks_per_seq} blocks of {self.block_size}), {self.key[0].shape[2]} kv heads x "
                f"{self.key[0].shape[3]} per rank, {str(self.dtype).replace('torch.', '')}: "
                f"{self.nbytes / 2 ** 30:.2f} GiB per rank")

    def no_slots(self, t: int) -> torch.Tensor:
        """``[t]`` slots of ``-1`` (RoPE without a cache write)."""
        if self._no_slots.shape[0] < t:
            self._no_slots = torch.full((max(t, 2 * self._no_slots.shape[0]),), -1, dtype=torch.int64,
                                        device=self.device)
        return self._no_slots[:t]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [T, kv_heads, D]`` at ``slots`` (all valid) of ``layer`` (the unfused form, for models whose
        RoPE ran in another kernel)."""
        if self.kv_scale is not None:
            k, v = tp_rope.cache_quant(k, self.kv_scale), tp_rope.cache_quant(v, self.kv_scale)
        for cache, x in ((self.key[layer], k), (self.value[layer], v)):
            x = x.to(cache.dtype)
            if cache.element_size() == 1:  # index_copy_ has no float8 kernels: move the bytes
                cache, x = cache.view(torch.uint8), x.view(torch.uint8)
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)

    def gather(self, layer: int, row: int, n: int, dtype: torch.dtype):
        """The first ``n`` cached ``(k, v)`` of batch row ``row``, ``[n, kv_heads, D]`` in ``dtype``."""
        blocks = self.block_tables[row, : -(-n // self.block_size)].to(torch.int64)
        out = []
        for cache in (self.key[layer], self.value[layer]):
            x = cache.index_select(0, blocks).flatten(0, 1)[:n]
            out.append(x.float().mul_(self.kv_scale).to(dtype) if self.kv_scale is not None else x.to(dtype))
        return out[0], out[1]

    def new_batch(self, batch: int) -> "TPKVCache":
        """A handle for ``batch`` new (empty) sequences; it takes the storage over (older handles become stale) only
        at :meth:`activate`, once the call that starts it has passed every check."""
        if batch > self.max_batch:
            raise TPFuseInputError(f"a batch of {batch} sequences does not fit the KV cache: KVCacheConfig."
                                   f"max_batch={self.max_batch} (pass {self.entry}(..., cache=KVCacheConfig("
                                   f"max_batch=...)))")
        return TPKVCache(self, batch, None)

    def activate(self, handle: "TPKVCache") -> None:
        if handle.epoch is None:
            self.epoch += 1
            handle.epoch, self.live = self.epoch, handle


class TPKVCache:
    """One batch of sequences in a parallelized model's KV cache: what the forward returns as its cache and takes
    back (``cache=`` / ``past_key_values=``) for the next step. See the module docstring."""

    is_compileable = False  # transformers' generate: no 4-D mask preparation, our forward takes the 2-D mask

    def __init__(self, storage: KVStorage, batch: int, epoch: Optional[int]):
        self.storage, self.batch, self.epoch = storage, batch, epoch
        self.lengths: List[int] = [0] * batch
        """Tokens cached per sequence (host copy)."""
        self.lengths_dev = torch.zeros(batch, dtype=torch.int64, device=storage.device)
        """The same on the device (what the decode step reads)."""

    def check_live(self) -> None:
        if self.storage.epoch != self.epoch:
            raise TPFuseInputError("this KV cache handle is stale: a later call without a cache started a new batch "
                                   "in the model's KV cache (one batch at a time per model)")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest sequence's cached tokens (pads are not cached)."""
        return max(self.lengths) if self.lengths else 0

    def __len__(self) -> int:
        return len(self.storage.key)

    def advance(self, counts: List[int], counts_dev=None) -> None:
        """Record ``counts[b]`` new tokens per sequence (``counts_dev``: the same on the device - a tensor or a
        number added to every row - or ``None`` to upload the host list)."""
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]
        if counts_dev is None:
            self.lengths_dev.copy_(torch.tensor(self.lengths, dtype=torch.int64), non_blocking=True)
        else:
            self.lengths_dev += counts_dev

    def __repr__(self) -> str:
        return f"TPKVCache(batch={self.batch}, lengths={self.lengths}, {self.storage.describe()})"
