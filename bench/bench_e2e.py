"""End-to-end benchmark through the product: ``tpfuse.parallelize(<HF model>)`` at real layer shapes (Llama-3.1-8B,
Llama-3.1-70B, Qwen3-32B, ...; random bf16 weights, nothing downloaded; the models: ``bench/e2e_models.py``).

    torchrun --standalone --nproc-per-node=N bench/bench_e2e.py [--models 8B,70B,Qwen3-32B] [--layers 4|full|fit]
        [--vocab real|N] [--decode-batches 1,8,64] [--context 1024] [--prefill 1024,4096,8192]
        [--compile-batches 1,64] [--hf-models 8B] [--hf-after] [--kv-capacities 8x1152,8x32768]
        [--fit-headroom-gib 6] [--flashinfer] [--no-fp8] [--small-m-table PATH] [--pdl-ab [--prefetch-kib N]]
        [--rope-ab] [--opf-ab] [--tile-ab] [--small-m-everywhere] [--kv-fp8] [--tag TAG]

Models (``--models``, comma-separated): a real shape (``8B``, ``70B``, ``Qwen3-32B``, ``Qwen2.5-7B``,
``Phi-3-medium``), or a **shard** ``<model>/tp<N>`` (``70B/tp8``, ``70B/tp4``, ``8B/tp2``; TP=1 runs only): a
model with exactly the shapes tpfuse leaves on rank 0 of that model at TP=N (q heads / N; kv heads / N, or one kv
head when they are fewer than N: replicated; intermediate / N; hidden size, norms and embedding whole; the lm_head
rank 0's ``ceil(vocab / N)`` vocabulary rows, ``e2e_models.head_rows``), run at TP=1: one rank's GEMMs, attention
and local fused norms with no communication (``tpfuse_nocomm`` without the other ranks), with a memory floor from
its own bytes. Its rows say ``model="<model>/tp<N> shard"``, ``shard_of``, ``tp_shard``.

``--layers``: decoder layers per model: an int (default 4); ``full``: the model's real count (8B 32, 70B 80,
Qwen3-32B 64, Qwen2.5-7B 28, Phi-3-medium 40); ``fit``: as many as fit (at most the real count) in the GPU memory
free before the model is built (per rank; the fewest over the ranks), next to the embedding + lm_head, the KV
cache of the run (max batch sequences of context + steps + 16 tokens), the activations of the largest eager
forward (the prefill of max batch x context, or the longest ``--prefill``) and ``--fit-headroom-gib`` (default
6 GiB: cuBLAS / CUDA-graph pools, allocator slack); the count and its budget are printed (a model of which no
layer fits is skipped). Rows carry the resolved ``layers``. Models are built in bf16 directly (no fp32 copy).
``--vocab``: ``real`` (the checkpoint's: 128256 for Llama-3.1, 151936 Qwen3, 152064 Qwen2.5, 32064 Phi-3) or a
number; default real with ``--layers full`` / ``fit``, else 32000 (the earlier runs'). Rows carry ``vocab``.

Providers (every one is the model a user runs, called with Hugging Face arguments):

* ``tpfuse`` - the parallelized model: eager batched prefill, decode steps replayed from its CUDA graphs;
* ``hf_eager`` (TP=1, ``--hf-models``) - the unmodified transformers model with a ``StaticCache`` (decode) / no
  cache (prefill);
* ``hf_compiled`` (TP=1, decode) - the same with ``torch.compile(model.forward, mode="reduce-overhead")``, HF's
  documented fast path; compiled per batch size in ``--compile-batches`` (first model only; each compile costs
  ~1 min at 4 layers). The hf_* rows run before ``parallelize`` on the same weights; with ``--hf-after`` on a
  fresh build of the same model (same seed) after every tpfuse row, the compiled rows after all eager ones (and
  each decode row printed), so a run cut off by a time limit during a compile loses only compiled rows;
* ``tpfuse_nocomm`` (TP > 1) - the parallelized model with its reductions made local (``model._tpfuse.local``):
  the floor that perfect communication would reach (its logits are wrong by design);
* ``vllm_policy`` (TP > 1, ``--flashinfer``) - the parallelized model on a communicator that loads vLLM's sm90
  policy table (``bench/policies/vllm_sm90_tp2.json``);
* ``tpfuse_capacity`` (``--kv-capacities B1xS1,B2xS2,...``) - the ``tpfuse`` decode rows again with the model's
  KV cache re-created for each capacity: ``max_batch`` x ``max_seq_len`` (the storage and decode graphs, made
  lazily from ``model._tpfuse.cache_config``, and a RoPE table long enough: what ``parallelize(...,
  cache=KVCacheConfig(max_batch, max_seq_len))`` builds; same weights), at the ``--decode-batches`` that are <=
  max_batch and the same ``--context``. Rows carry ``max_batch`` and ``max_seq_len`` (so do the ``tpfuse*``
  decode rows: the run's own cache), so "step time follows batch and context, not capacity" reads directly; they
  are plotted as ``capacity_<B>x<S>``. A point whose cache, prefill activations and ``--fit-headroom-gib`` do not
  fit the free memory (the run's own cache released first), whose max_seq_len is below context + steps + 3, or
  with no decode batch <= max_batch, is skipped with the reason printed and listed in the JSON's ``skipped``
  section. The model's own cache is restored afterwards (before the FP8 rows);
* ``tpfuse_fp8_static`` - a fresh copy calibrated (static activation scales) and converted with per-tensor weight
  scales, so its GEMMs are per-tensor ``_scaled_mm`` (``--no-fp8`` skips it too);
* ``tpfuse_fp8`` - the same parallelized model converted after its bf16 rows by ``tpfuse.parallel.quantize_fp8``
  (e4m3 weights with per-channel scales; per-token FP8 activations straight out of the fused norm / SiLU-mul
  kernels into ``torch._scaled_mm``). Targets at TP=1: decode batch 1 <= 0.65x and prefill 4k <= 0.7x ``tpfuse``.
  ``--no-fp8`` skips it. The run also records one ``fp8_quality`` row (``bench/fp8_quality.py``: greedy agreement of
  the FP8 tiny model with the bf16 one over 64 steps, logits error vs fp64).
* ``tpfuse_kv8`` / ``tpfuse_fp8_kv8`` (``--kv-fp8``) - the ``tpfuse`` / ``tpfuse_fp8`` decode rows again with the
  model's KV cache re-made in e4m3 (``KVCacheConfig(dtype=torch.float8_e4m3fn)``, ``kv_scale`` 1: the random
  model's k and v stay far inside e4m3's range), same weights, same capacity: what a user who also quantizes the
  cache runs. At batch 64 x 1024 tokens the full 8B's step reads 15.0 GB of weights (1.05 GB of them the lm_head,
  which ``quantize_fp8`` leaves in bf16) and 8.6 GB of bf16 cache, so FP8 weights alone take its bytes to 0.70x
  bf16's and an FP8 cache as well to 0.52x. Rows carry
  ``kv_dtype``; the floor rows stay those of the bf16 cache;
* ``<provider>_fusedrope`` / ``_ropesep`` (``--rope-ab``): the decode step with ``KVCacheConfig.fuse_rope`` the
  other way than the default: its RoPE (QK-norm) and KV-cache write folded into the decode attention (``True``,
  ``_fusedrope``) or as their own kernels before it (``False``, ``_ropesep``); rows carry ``fuse_rope``. Both
  split kernels take the ``_prefetch`` rows' first K / V tile prefetch (``decode_attention.PREFETCH``);
* ``<provider>_fusedcomb`` / ``_combkern`` (``--combine-ab``): the decode step with the decode attention's combine
  the other way than ``tpfuse.kernels.decode_attention.FUSE_COMBINE``: in the split kernel's last program of each
  (sequence, kv head) (``_fusedcomb``) or in a combine kernel (``_combkern``); rows carry ``fuse_combine``;
* ``<provider>_foldnorm`` / ``_normkern`` (``--fold-ab``): the decode step with ``KVCacheConfig.fold_norms`` the
  other way than the default: each add + RMSNorm folded into the GEMMs around it, every GEMM of the layer on the
  small-M kernel (``_foldnorm``), or in its own kernel (``_normkern``); rows carry ``fold_norms``. Whole models
  only: a shard stands for a TP > 1 rank, whose add + RMSNorm is the fused all-reduce's (shard rows never fold);
* ``<provider>_opf`` / ``_noopf`` (``--opf-ab``): the decode step with ``KVCacheConfig.prefetch_o_proj`` the other
  way than the default (the o_proj weight prefetched into L2 from a side stream while the attention runs, or not);
  rows carry ``prefetch_o_proj``;
* ``<provider>_noamax`` / ``_amaxall`` (``--amax-ab``, per-token FP8 rows): the decode step with
  ``small_gemm.AMAX_CHAIN_MAX_M`` 0 (gate-up, then the SiLU*mul + quantize kernel) where the default runs gate-up +
  SiLU*mul with its partial maxima and ``ops.quantize_from_amax``, 64 (that chain) where it does not;
* ``<provider>_split4x64`` (``--split-ab``): the decode step with the decode attention's bf16 split rule at
  ``decode_attention.SPLIT_WAVES`` 4 / ``MULTI_SPLIT_TILE`` 64 (the B 8 sweep's candidate; default 2 / 128);
* ``<provider>_gpf1m`` / ``_gpf4m`` (``--gemm-prefetch-ab``): the decode step with the small-M GEMM's L2 prefetch
  of its first weight lines before its PDL wait (``small_m_gemm.PREFETCH_BYTES`` 1 / 4 MiB a launch), the decode
  attention's as the default has it; rows carry ``prefetch_bytes``;
* ``<provider>_w8`` / ``_actq`` (``--w8-ab``, FP8 rows): the decode step with
  ``KVCacheConfig.fp8_weight_only_max_tokens`` the other way than the default at that batch: 64 (the FP8 layers'
  GEMMs weight-only with bf16 activations, ``_w8``) or 0 (the checkpoint's activation scheme, ``_actq``); rows carry
  ``fp8_weight_only_max_tokens``;
* ``<provider>_carve100`` (``--carveout-ab``): the decode step with every tpfuse kernel preferring the whole unified
  L1 / shared memory as shared memory (:func:`tpfuse.kernels.carveout.set_carveout`: one split for all the layer's
  kernels); rows carry ``carveout``;
* ``<provider>_attnfold`` (``--attn-fold-ab``, 16-bit rows whose decode attention splits and whose partials fit
  ``tpfuse.attention_o.partials_config``): the decode step with ``KVCacheConfig.fold_attn_combine`` the other way
  than the default (the split partials combined inside o_proj, no combine kernel); rows carry
  ``fold_attn_combine``;
* ``<provider>_smallm_notma`` (``--tma-ab`` with ``--small-m-table``): the decode step with that table and
  ``small_m_gemm.TMA`` off (the table's TMA configs run their tiles on pointer loads): next to ``_smallm``, what the
  TMA weight tiles alone change; rows carry ``tma``;
* ``<provider>_fma`` (``--fma-ab``, FP8 rows whose steps run weight-only, at most 4 tokens): the decode step with
  ``small_m_gemm.FMA_MAX_M`` 4 (the weight-only GEMMs' main loop on the CUDA cores); rows carry ``fma_max_m``;
* ``tpfuse_headrep`` (``--head-ab``, shard rows, bf16): the shard's decode step with the whole lm_head (every
  vocabulary row, the replicated head of ``KVCacheConfig.vocab_parallel_head=False`` or a tied head) instead of
  rank 0's vocabulary-parallel rows, and its own floor row ``memory_floor_headrep``;
* ``<provider>_hoist0`` / ``_hoist1`` / ``_hoist2`` (``--hoist-ab``): the decode step with
  ``decode_attention.HOIST_LOADS`` 0 (no read ahead of the wait), 1 (the rope-split kernel reads its lengths, cos /
  sin and block ids before its PDL wait, the combine kernel its lengths) or 2 (also the partition's first K / V
  tile; 16-bit caches), each only where the default (``HOIST_MAX_BATCH``: 1 at batch 1) differs; rows carry
  ``hoist``;
* ``<provider>_early`` / ``_earlypf`` (``--trigger-ab``): the decode step with ``kernels.pdl.EARLY_TRIGGER`` on
  (the small-M GEMM and the decode attention's split kernels trigger their PDL dependents right after their wait
  instead of after their main loop), and the same with the L2 prefetches before the waits (``_earlypf``: the
  GEMMs' ``--prefetch-kib`` budget, default ``small_m_gemm.PREFETCH_BYTES_TRIED``, and the attention's first K / V
  tile); rows carry ``early_trigger``;
* ``<provider>_tile128`` (``--tile-ab``): the decode step with ``decode_attention.ONE_SPLIT_TILES`` one entry,
  128-key tiles at 8 warps wherever a sequence is one program (the rule before the 32 x 4 step); rows carry
  ``one_split_tiles``;
* ``<provider>_kv8_f16`` / ``_kv8_bf16loop`` (``--f16-ab``, with ``--kv-fp8``): the e4m3-cache decode rows with the
  decode attention's tile loop in fp16 or in bf16, the other way than ``decode_attention.FP8_F16``; rows carry
  ``fp8_f16``. Only the ``_kv8`` rows take this variant, and they take no other;
* ``<provider>_smallm`` (``--small-m-table PATH``: a small-M GEMM sweep's routing table,
  ``bench/tune_small_gemm.py``'s ``small_m_gemm_<arch>.json``, installed instead of the shipped one),
  ``<provider>_nopdl`` (``--pdl-ab``: the decode graphs captured without programmatic dependent launch; the default
  ``KVCacheConfig.pdl`` captures with it), ``<provider>_prefetch`` (``--pdl-ab``: with PDL and the L2 prefetches
  before its waits, off by default; ``--prefetch-kib`` sets the GEMMs' budget) and, with ``--small-m-everywhere``,
  ``<provider>_smallall`` (and ``_smallall_nopdl``): the table with every swept GEMM routed to the kernel (its
  tuned config), whether or not it beat the library alone - each ``tpfuse`` / ``tpfuse_fp8`` /
  ``tpfuse_fp8_static`` decode row again, right after it, with the graphs captured under that variant: the A/Bs
  that decide whether a sweep's table ships
  (``tpfuse/thresholds/``) and what PDL's default is. Rows carry ``routed`` (distinct GEMM calls sent to the
  small-M kernel), ``table``, ``everywhere``, ``pdl`` (asked for and available on this GPU and stack) and
  ``prefetch_bytes``.

Decode: a batch of ``B`` random prompts of ``--context`` tokens is prefilled, then ``--steps`` decode steps (one
token per sequence) are timed as a user sees them: host wall time between two device syncs over all steps, per step
(so host work, launch gaps and graph replays all count). Prefill: one sequence of ``T`` tokens, last-token logits,
the median of 10 calls (5 from 4096 tokens) each between device syncs, after two warm-up calls (HF and tpfuse
alike). Under the mean of 10 calls it replaced, the 1k rows of two runs minutes apart on one H200 differed by 11%
(bf16: 27.7 / 24.9 ms) and 85% (static FP8: 30.4 / 16.4 ms; ``e2e_tp1_h200_full_0fc9473.json``, ``_pfab_``).
Each decode row also reports the step's memory floor (provider ``memory_floor``): the bytes it must read (this
rank's weights without the embedding table - B rows of it - plus the KV cache of B x context tokens) over the
device-to-device copy bandwidth measured in the same run (the faster of two ways: ``common.copy_bandwidths``),
measured at the start and again after each model's rows: every floor of the file is at the fastest of these
(:func:`refloor`; the header has each measurement). A run's first copies can come out slow: three runs on one H100
on one day measured 2.92 / 2.97 / 3.01 TB/s at their start while the 8B's bf16 step took 5.68-5.69 ms in each, so a
floor from the start alone moved the step / floor ratio by 3% between runs of the same code.

Writes ``e2e_tp{N}_{device}[_{tag}].json`` and ``.png`` to ``$OUT`` (or ``bench/results``) after every phase of
every model (hf rows, tpfuse rows, capacity rows, FP8 rows), so a run cut off keeps what finished.
``bench/tools/e2e_table.py`` turns the JSON into the README's table.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import e2e_models as em  # noqa: E402

import tpfuse  # noqa: E402
from tpfuse.parallel import KVCacheConfig  # noqa: E402
from tpfuse.parallel.generate import greedy_tokens  # noqa: E402

POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies", "vllm_sm90_tp2.json")
VOCAB, build_model = em.VOCAB, em.build_model


def _layers_arg(text: str):
    if text in ("full", "fit"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--layers: a positive int, full or fit, got {text!r}")
    return int(text)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = (lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--models", default="8B,70B,Qwen3-32B", help="shapes, or shards <model>/tp<N> (TP=1)")
    ap.add_argument("--layers", type=_layers_arg, default=4, help="an int, full (real count) or fit (free memory)")
    ap.add_argument("--vocab", default=None, help="real or an int (default: real for --layers full/fit, else 32000)")
    ap.add_argument("--decode-batches", type=ints, default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024, help="tokens cached per sequence before the timed steps")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--prefill", type=ints, default=[1024, 4096, 8192])
    ap.add_argument("--compile-batches", type=ints, default=[1, 64],
                    help="decode batches for hf_compiled (TP=1; first model only)")
    ap.add_argument("--hf-models", default="8B", help="models that also run the hf_* providers (TP=1)")
    ap.add_argument("--hf-after", action="store_true", help="hf_* rows on a fresh build after the tpfuse rows")
    ap.add_argument("--kv-capacities", type=em.parse_capacities, default=[],
                    help="tpfuse_capacity rows: MAX_BATCHxMAX_SEQ_LEN,... (e.g. 8x1152,8x32768,256x1152)")
    ap.add_argument("--fit-headroom-gib", type=float, default=6.0,
                    help="memory left free by --layers fit and by the --kv-capacities check")
    ap.add_argument("--flashinfer", action="store_true", help="add the vllm_policy provider (TP > 1)")
    ap.add_argument("--no-fp8", action="store_true", help="skip the tpfuse_fp8 provider and the fp8_quality row")
    ap.add_argument("--kv-fp8", action="store_true",
                    help="adds tpfuse_kv8 / tpfuse_fp8_kv8 decode rows (e4m3 KV cache)")
    ap.add_argument("--tag", default="", help="file-name tag: e2e_tp{N}_{device}_{tag}.json")
    ap.add_argument("--small-m-table", default="", help="a small-M GEMM sweep's routing table (JSON): adds the "
                    "<provider>_smallm decode rows with it installed")
    ap.add_argument("--rope-ab", action="store_true", help="adds decode rows with KVCacheConfig.fuse_rope the other "
                    "way than the default: <provider>_fusedrope (the step's RoPE and KV-cache write in the decode "
                    "attention kernel) or <provider>_ropesep (their own kernels)")
    ap.add_argument("--combine-ab", action="store_true", help="adds decode rows with the decode attention's combine "
                    "the other way than decode_attention.FUSE_COMBINE: <provider>_fusedcomb (in the split kernel's "
                    "last programs) or <provider>_combkern (a kernel of its own)")
    ap.add_argument("--f16-ab", action="store_true", help="adds e4m3-cache decode rows (with --kv-fp8) with the "
                    "decode attention's tile loop the other way than decode_attention.FP8_F16: <provider>_kv8_f16 "
                    "(fp16) or <provider>_kv8_bf16loop (bf16)")
    ap.add_argument("--opf-ab", action="store_true", help="adds decode rows with KVCacheConfig.prefetch_o_proj the "
                    "other way than the default: <provider>_opf (the o_proj weight prefetched into L2 while the "
                    "attention runs) or <provider>_noopf")
    ap.add_argument("--tile-ab", action="store_true", help="adds decode rows with decode_attention.ONE_SPLIT_TILES "
                    "((0, (128, 8)),): <provider>_tile128 (128-key tiles, 8 warps wherever a sequence is one program: "
                    "batch >= 33 at 8 kv heads; the rule takes 32 x 4 from 3 programs an SM on)")
    ap.add_argument("--fold-ab", action="store_true", help="adds decode rows with KVCacheConfig.fold_norms the other "
                    "way than the default: <provider>_foldnorm (each add + RMSNorm in the GEMMs around it) or "
                    "<provider>_normkern (its own kernel); whole models only")
    ap.add_argument("--trigger-ab", action="store_true", help="adds decode rows with kernels.pdl.EARLY_TRIGGER on: "
                    "<provider>_early, and with the L2 prefetches before the waits too: <provider>_earlypf")
    ap.add_argument("--split-ab", action="store_true", help="adds decode rows with the decode attention's bf16 "
                    "split rule at SPLIT_WAVES 4 / MULTI_SPLIT_TILE 64: <provider>_split4x64")
    ap.add_argument("--gemm-prefetch-ab", action="store_true", help="adds decode rows with the small-M GEMM's L2 "
                    "prefetch before its PDL wait alone at 1 / 4 MiB a launch (small_m_gemm.PREFETCH_BYTES): "
                    "<provider>_gpf1m / _gpf4m")
    ap.add_argument("--hoist-ab", action="store_true", help="adds decode rows with decode_attention.HOIST_LOADS 0 "
                    "/ 1 / 2 (the rope-split kernel's reads before its PDL wait) where that is not the default's "
                    "level at the row's batch: <provider>_hoist0 / _hoist1 / _hoist2")
    ap.add_argument("--carveout-ab", action="store_true", help="adds decode rows with every tpfuse kernel preferring "
                    "the whole L1 / shared memory as shared memory (kernels.carveout.set_carveout(100)): "
                    "<provider>_carve100")
    ap.add_argument("--attn-fold-ab", action="store_true", help="adds 16-bit decode rows whose attention splits with "
                    "KVCacheConfig.fold_attn_combine the other way than the default (the combine inside o_proj): "
                    "<provider>_attnfold / _attncomb")
    ap.add_argument("--tma-ab", action="store_true", help="with --small-m-table: adds decode rows with that table "
                    "and small_m_gemm.TMA off (its TMA rows on pointer loads, the same tiles): <provider>_smallm_notma")
    ap.add_argument("--fma-ab", action="store_true", help="adds FP8 decode rows whose steps run weight-only "
                    "(--fp8-weight-only) at most 4 tokens with small_m_gemm.FMA_MAX_M 4 (the CUDA-core loop): "
                    "<provider>_fma")
    ap.add_argument("--head-ab", action="store_true", help="shard rows: adds decode rows with the whole lm_head "
                    "(replicated) instead of rank 0's vocabulary-parallel rows: tpfuse_headrep, memory_floor_headrep")
    ap.add_argument("--fp8-weight-only", type=int, default=None, metavar="N",
                    help="KVCacheConfig.fp8_weight_only_max_tokens of every row (default: the config's default)")
    ap.add_argument("--w8-ab", action="store_true", help="adds FP8 decode rows with "
                    "KVCacheConfig.fp8_weight_only_max_tokens the other way at that batch: <provider>_w8 (64: "
                    "weight-only GEMMs, bf16 activations) or <provider>_actq (0: the activation scheme)")
    ap.add_argument("--amax-ab", action="store_true", help="adds per-token FP8 decode rows with "
                    "small_gemm.AMAX_CHAIN_MAX_M the other way at that batch: <provider>_noamax (0: the SiLU*mul + "
                    "quantize kernel) or <provider>_amaxall (64: gate-up + SiLU*mul writes bf16 h + its partial "
                    "maxima, then ops.quantize_from_amax)")
    ap.add_argument("--pdl-ab", action="store_true", help="adds the <provider>_nopdl decode rows (graphs captured "
                    "without programmatic dependent launch, KVCacheConfig.pdl=False) and <provider>_prefetch (with PDL "
                    "and the L2 prefetches before its waits)")
    ap.add_argument("--prefetch-kib", type=int, default=None,
                    help="with --pdl-ab / --trigger-ab: the weight bytes (KiB) each small-M GEMM launch of the _prefetch rows "
                    "prefetches into L2 before its PDL wait (_earlypf rows too; default: small_m_gemm.PREFETCH_BYTES_TRIED, 16 MiB)")
    ap.add_argument("--small-m-everywhere", action="store_true",
                    help="with --small-m-table: adds <provider>_smallall rows (and _smallall_nopdl with --pdl-ab), "
                    "that table with every row routed to the kernel (its tuned config) whether or not it beat the "
                    "library alone: the kernel's end-to-end worth where PDL can chain it")
    args = ap.parse_args(argv)
    if args.small_m_everywhere and not args.small_m_table:
        ap.error("--small-m-everywhere needs --small-m-table (the table whose rows it routes)")
    return args


def decode_bytes(model, batch: int, context: int) -> int:
    """Bytes a decode step must read on this rank: every weight except the embedding table (B rows of it) plus
    the KV cache of ``batch`` sequences of ``context`` tokens."""
    st = model._tpfuse
    emb = model.get_input_embeddings().weight
    w = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    w += batch * emb.shape[1] * emb.element_size()
    kv = 2 * len(st.layers) * batch * context * st.kv_heads * st.head_dim * 2
    return w + kv


def _sync(dev) -> None:
    if torch.device(dev).type == "cuda":  # CPU: nothing to wait for (the CPU tests of the row functions)
        torch.cuda.synchronize(dev)


def _wall_per_call(fn, n: int, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / n * 1e6


def _cache_kw(model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _ids_below(model) -> int:
    """Token ids are drawn below this: :data:`VOCAB` (the earlier runs' range), or a smaller ``--vocab``."""
    return min(VOCAB, model.get_input_embeddings().num_embeddings)


def tpfuse_decode_us(model, batch, context, steps, dev) -> float:
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, _ids_below(model), (batch, context), device=dev, generator=g)
    out = model(ids, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    tok = greedy_tokens(out.logits[:, -1])[:, None]
    box = {"tok": tok}

    def step():  # the step of tpfuse.parallel.generate's greedy loop (HF's rows take its generate's torch.argmax)
        box["tok"] = greedy_tokens(model(box["tok"], cache=cache).logits[:, -1])[:, None]

    for _ in range(3):  # captures the bucket's graph, then warm replays
        step()
    return _wall_per_call(step, steps, dev)


def hf_decode_us(model, batch, context, steps, dev, compiled: bool) -> float:
    import transformers

    kw = _cache_kw(model)
    cache = transformers.StaticCache(config=model.config, max_cache_len=context + steps + 16)
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, _ids_below(model), (batch, context), device=dev, generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compiled else model.forward
    box = {"tok": out.logits[:, -1].argmax(-1, keepdim=True), "pos": context}

    def step():
        pos = torch.full((batch, 1), box["pos"], dtype=torch.long, device=dev)
        with torch.no_grad():
            o = fwd(input_ids=box["tok"], position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
        box["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)
        box["pos"] += 1

    for _ in range(3):
        step()
    return _wall_per_call(step, steps, dev)


def prefill_us(model, t, dev) -> float:
    ids = torch.randint(0, _ids_below(model), (1, t), device=dev)

    def call():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    call()
    call()  # a second warm-up: shapes first seen in the first call (allocator growth, library heuristics)
    times = []
    for _ in range(5 if t >= 4096 else 10):  # each call between device syncs: the median drops a stray slow call
        times.append(_wall_per_call(call, 1, dev))
    return sorted(times)[len(times) // 2]


def _measure(rows, base, provider, fn, dev, after=None):
    """Run one timing; an exception becomes a NaN row with the error text (the run goes on). ``after()`` returns
    fields recorded once the timing ran (the mode and paths of the last call)."""
    try:
        us, err = fn(), None
    except Exception as ex:  # noqa: BLE001 - recorded in the row
        us, err = float("nan"), f"{type(ex).__name__}: {ex}"[:300]
        _sync(dev)
    row = dict(base, provider=provider, us=common.slowest_rank(us, dev), **(after() if after else {}))
    if err:
        row["error"] = err
    rows.append(row)
    return row


def hf_rows(spec, model, args, dev, rows, compile_batches, save=lambda: None, compile_last=False):
    """The unmodified HF model (TP=1): eager decode / prefill, and compiled decode for ``compile_batches``
    (``save()`` after each compile: the long part of a run). ``compile_last`` (``--hf-after``): the compiled rows
    after every eager one, each decode row printed."""
    def compiled(b, base):
        r = _measure(rows, base, "hf_compiled", lambda: hf_decode_us(model, b, args.context, args.steps, dev, True),
                     dev)
        torch._dynamo.reset()
        save()
        if compile_last:
            _print(r, rows)

    later = []
    for b in args.decode_batches:
        base = dict(spec.fields(), mode="decode", tokens=b, context=args.context)
        r = _measure(rows, base, "hf_eager", lambda: hf_decode_us(model, b, args.context, args.steps, dev, False),
                     dev)
        if compile_last:
            _print(r, rows)
        if b in compile_batches and compile_last:
            later.append((b, base))
        elif b in compile_batches:
            compiled(b, base)
    for t in args.prefill:
        base = dict(spec.fields(), mode="prefill", tokens=t)
        _measure(rows, base, "hf_eager", lambda: prefill_us(model, t, dev), dev)
    for b, base in later:
        compiled(b, base)


def tpfuse_rows(spec, model, comm, args, dev, rows, bandwidth, provider="tpfuse", batches=None, prefill=True):
    """Decode rows at ``batches`` (default ``--decode-batches``; a ``memory_floor`` row beside each ``tpfuse``
    one) and, with ``prefill``, the ``--prefill`` rows of one provider. Decode rows carry the cache's capacity."""
    st = model._tpfuse
    for b in args.decode_batches if batches is None else batches:
        base = dict(spec.fields(), mode="decode", tokens=b, context=args.context)
        comm.last_path.clear()
        r = _measure(rows, base, provider, lambda: tpfuse_decode_us(model, b, args.context, args.steps, dev), dev,
                     lambda: dict(last_mode=st.last_mode, paths=dict(comm.last_path),
                                  max_batch=st.cache_config.max_batch, max_seq_len=st.max_seq_len,
                                  kv_dtype=str(st.cache_config.dtype or model.dtype).replace("torch.", "")))
        if provider in ("tpfuse", "tpfuse_headrep"):
            nbytes = decode_bytes(model, b, args.context)
            rows.append(dict(base, provider="memory_floor" + provider[len("tpfuse"):], us=nbytes / bandwidth * 1e6,
                             bytes=nbytes))
        if provider in VARIANT_PROVIDERS or provider.endswith("_kv8"):
            variant_rows(model, b, args, dev, rows, base, provider)
        if provider in ("tpfuse", "tpfuse_capacity", "tpfuse_headrep") or provider in VARIANT_PROVIDERS or \
                provider.endswith("_kv8"):
            _print(r, rows)
    for t in args.prefill if prefill else []:
        base = dict(spec.fields(), mode="prefill", tokens=t)
        comm.last_path.clear()
        r = _measure(rows, base, provider, lambda: prefill_us(model, t, dev), dev,
                     lambda: dict(last_mode=st.last_mode, paths=dict(comm.last_path)))
        _print(r, rows)


VARIANT_PROVIDERS = ("tpfuse", "tpfuse_fp8", "tpfuse_fp8_static")  # decode rows the variants repeat


class Variant(NamedTuple):
    """One decode-row variant (:func:`variants`): the row again as ``<provider><suffix>`` with these settings
    (None: the model's own)."""

    suffix: str
    table: Optional[str] = None
    """A small-M routing table installed instead of the shipped one."""
    pdl: Optional[bool] = None
    """``KVCacheConfig.pdl``."""
    everywhere: bool = False
    """Every row of ``table`` routed to the kernel."""
    prefetch: Optional[bool] = None
    """The L2 prefetches before the PDL waits (None: off, the default)."""
    fuse_rope: Optional[bool] = None
    """``KVCacheConfig.fuse_rope``."""
    fuse_combine: Optional[bool] = None
    """``decode_attention.FUSE_COMBINE``."""
    fold_norms: Optional[bool] = None
    """``KVCacheConfig.fold_norms``."""
    prefetch_bytes: Optional[int] = None
    """With ``prefetch``: the weight bytes a GEMM launch prefetches (None: ``PREFETCH_BYTES_TRIED``)."""
    fp8_f16: Optional[bool] = None
    """``decode_attention.FP8_F16`` (e4m3-cache rows only)."""
    prefetch_o: Optional[bool] = None
    """``KVCacheConfig.prefetch_o_proj``."""
    one_split_tiles: Optional[tuple] = None
    """``decode_attention.ONE_SPLIT_TILES``."""
    amax_chain_max_m: Optional[int] = None
    """``small_gemm.AMAX_CHAIN_MAX_M`` (per-token FP8 rows only)."""
    split_rule: Optional[tuple] = None
    """``(decode_attention.SPLIT_WAVES, decode_attention.MULTI_SPLIT_TILE)``."""
    early_trigger: Optional[bool] = None
    """``kernels.pdl.EARLY_TRIGGER``."""
    hoist: Optional[int] = None
    """``decode_attention.HOIST_LOADS``."""
    gemm_prefetch_bytes: Optional[int] = None
    """``small_m_gemm.PREFETCH_BYTES`` alone (the decode attention's prefetch as the default has it)."""
    fp8_weight_only: Optional[int] = None
    """``KVCacheConfig.fp8_weight_only_max_tokens`` (FP8 rows only)."""
    fma_max_m: Optional[int] = None
    """``small_m_gemm.FMA_MAX_M`` (FP8 rows whose steps run weight-only)."""
    tma: Optional[bool] = None
    """``small_m_gemm.TMA`` (whether table configs that ask for TMA weight tiles get them)."""
    carveout: Optional[int] = None
    """``kernels.carveout.set_carveout`` percent for every tpfuse kernel (None: the driver's choice)."""
    attn_fold: Optional[bool] = None
    """``KVCacheConfig.fold_attn_combine``."""


def variants(args) -> list:
    """The :class:`Variant` s the run asks for: ``_fusedrope`` / ``_ropesep`` (``--rope-ab``: ``fuse_rope`` the other
    way than the default, :func:`rope_variant`), ``_fusedcomb`` / ``_combkern`` (``--combine-ab``: the decode
    attention's combine in its split kernel or in a kernel of its own, the other way than
    ``decode_attention.FUSE_COMBINE``), ``_smallm`` (``--small-m-table``: that table installed), ``_nopdl``
    (``--pdl-ab``: graphs captured without PDL) and ``_prefetch`` (``--pdl-ab``: with PDL and the L2 prefetches
    before its waits, ``small_m_gemm.PREFETCH_BYTES_TRIED`` of weights a launch, or ``--prefetch-kib``, and the
    decode attention's first K / V tile); with ``--small-m-everywhere`` also ``_smallall`` (the table with every
    row routed to the kernel; with ``--pdl-ab`` also ``_smallall_nopdl``)."""
    table = getattr(args, "small_m_table", "") or None
    ab = bool(getattr(args, "pdl_ab", False))
    every = bool(table and getattr(args, "small_m_everywhere", False))
    out = [rope_variant()] if getattr(args, "rope_ab", False) else []
    out += [combine_variant()] if getattr(args, "combine_ab", False) else []
    out += [fold_variant()] if getattr(args, "fold_ab", False) else []
    out += [f16_variant()] if getattr(args, "f16_ab", False) else []
    out += [opf_variant()] if getattr(args, "opf_ab", False) else []
    out += [Variant("_tile128", one_split_tiles=((0, (128, 8)),))] if getattr(args, "tile_ab", False) else []
    out += [Variant("_split4x64", split_rule=(4, 64))] if getattr(args, "split_ab", False) else []
    out += [Variant(f"_hoist{n}", hoist=n) for n in (0, 1, 2)] if getattr(args, "hoist_ab", False) else []
    out += [Variant(f"_gpf{m}m", gemm_prefetch_bytes=m << 20) for m in (1, 4)] if getattr(
        args, "gemm_prefetch_ab", False) else []
    kib = getattr(args, "prefetch_kib", None)
    out += [Variant("_early", early_trigger=True),
            Variant("_earlypf", early_trigger=True, pdl=True, prefetch=True,
                    prefetch_bytes=None if kib is None else kib << 10)] if getattr(args, "trigger_ab", False) else []
    out += [Variant("_w8", fp8_weight_only=64), Variant("_actq", fp8_weight_only=0)] if getattr(
        args, "w8_ab", False) else []
    out += [Variant("_noamax", amax_chain_max_m=0), Variant("_amaxall", amax_chain_max_m=64)] if getattr(
        args, "amax_ab", False) else []
    out += [Variant("_fma", fma_max_m=4)] if getattr(args, "fma_ab", False) else []
    out += [Variant("_carve100", carveout=100)] if getattr(args, "carveout_ab", False) else []
    out += [attn_fold_variant()] if getattr(args, "attn_fold_ab", False) else []
    out += [Variant("_smallm", table)] if table else []
    out += [Variant("_smallm_notma", table, tma=False)] if table and getattr(args, "tma_ab", False) else []
    out += [Variant("_nopdl", pdl=False), Variant("_prefetch", pdl=True, prefetch=True,
                                                  prefetch_bytes=None if kib is None else kib << 10)] if ab else []
    out += [Variant("_smallall", table, everywhere=True)] if every else []
    out += [Variant("_smallall_nopdl", table, pdl=False, everywhere=True)] if every and ab else []
    return out


def rope_variant() -> Variant:
    """The ``--rope-ab`` variant: ``KVCacheConfig.fuse_rope`` the other way than its default."""
    from tpfuse.parallel import KVCacheConfig

    fuse = not KVCacheConfig().fuse_rope
    return Variant("_fusedrope" if fuse else "_ropesep", fuse_rope=fuse)


def combine_variant() -> Variant:
    """The ``--combine-ab`` variant: ``decode_attention.FUSE_COMBINE`` the other way than its default."""
    from tpfuse.kernels import decode_attention as dak

    fuse = not dak.FUSE_COMBINE
    return Variant("_fusedcomb" if fuse else "_combkern", fuse_combine=fuse)


def f16_variant() -> Variant:
    """The ``--f16-ab`` variant (e4m3-cache rows only): ``decode_attention.FP8_F16`` the other way than its
    default."""
    from tpfuse.kernels import decode_attention as dak

    f16 = not dak.FP8_F16
    return Variant("_f16" if f16 else "_bf16loop", fp8_f16=f16)


def opf_variant() -> Variant:
    """The ``--opf-ab`` variant: ``KVCacheConfig.prefetch_o_proj`` the other way than its default."""
    from tpfuse.parallel import KVCacheConfig

    pf = not KVCacheConfig().prefetch_o_proj
    return Variant("_opf" if pf else "_noopf", prefetch_o=pf)


def attn_fold_variant() -> Variant:
    """The ``--attn-fold-ab`` variant: ``KVCacheConfig.fold_attn_combine`` the other way than its default."""
    from tpfuse.parallel import KVCacheConfig

    fold = not KVCacheConfig().fold_attn_combine
    return Variant("_attnfold" if fold else "_attncomb", attn_fold=fold)


def attn_foldable(model, batch: int, dev) -> bool:
    """Whether a decode step of ``batch`` sequences leaves its attention's partials for o_proj with
    ``KVCacheConfig.fold_attn_combine`` (the fused RoPE, and ``TPDecoderLayer.can_fold_attn`` at the model's
    per-rank heads and cache)."""
    st = model._tpfuse
    layer, kc = st.layers[0], st.cache_storage().key[0]
    q = torch.empty(batch, layer.num_heads, layer.head_dim, dtype=kc.dtype, device=dev)
    return st.cache_config.fuse_rope and layer.can_fold_attn(q, kc)


def fold_variant() -> Variant:
    """The ``--fold-ab`` variant: ``KVCacheConfig.fold_norms`` the other way than its default."""
    from tpfuse.parallel import KVCacheConfig

    fold = not KVCacheConfig().fold_norms
    return Variant("_foldnorm" if fold else "_normkern", fold_norms=fold)


def load_table(path: str, everywhere: bool = False) -> dict:
    """A small-M routing table (schema 1), checked by its parser (a bad file fails here: :func:`main` loads it once
    before any model is built); ``everywhere``: every row's ``beats_library`` set, so the model path routes every
    swept GEMM to the kernel with the row's tuned config."""
    import json

    from tpfuse.kernels import small_m_configs as smc

    with open(path) as fh:
        table = json.load(fh)
    if everywhere:
        table["rows"] = [dict(r, beats_library=True) for r in table.get("rows", [])]
    smc.parse(table)
    return table


def variant_row(model, batch, args, dev, rows, base, provider, v: Variant):
    """``provider`` 's decode row again under the variant ``v``: its small-M routing table installed instead of the
    shipped one (``small_m_configs.install``; ``everywhere``: every row routed to the kernel, :func:`load_table`),
    the decode graphs captured with its ``KVCacheConfig.pdl`` / ``fuse_rope``, the L2 prefetches before the PDL
    waits, ``decode_attention.FUSE_COMBINE`` and ``fold_norms`` as it says (:class:`Variant`; None: the model's /
    module's own).
    The model's decode graphs are dropped before and after (routing, PDL and the attention's kernels are decided at
    capture), so a variant differs from its base row only in those. ``routed``: how many distinct GEMM calls
    (shape, dtypes, M) the step sent to the small-M kernel."""
    import contextlib

    from tpfuse.kernels import small_m_configs as smc
    from tpfuse.kernels import decode_attention as dak
    from tpfuse.kernels import pdl as pdl_launch
    from tpfuse import small_gemm
    from tpfuse.kernels import small_m_gemm as smg

    table = load_table(v.table, v.everywhere) if v.table else None
    st = model._tpfuse
    own_pdl, own_fuse, own_fold, st.graphs = (st.cache_config.pdl, st.cache_config.fuse_rope,
                                              st.cache_config.fold_norms, None)
    own_opf, own_w8 = st.cache_config.prefetch_o_proj, st.cache_config.fp8_weight_only_max_tokens
    own_af = st.cache_config.fold_attn_combine
    st.cache_config.fold_attn_combine = own_af if v.attn_fold is None else v.attn_fold
    st.cache_config.fp8_weight_only_max_tokens = own_w8 if v.fp8_weight_only is None else v.fp8_weight_only
    st.cache_config.fuse_rope = own_fuse if v.fuse_rope is None else v.fuse_rope
    st.cache_config.fold_norms = own_fold if v.fold_norms is None else v.fold_norms
    st.cache_config.prefetch_o_proj = own_opf if v.prefetch_o is None else v.prefetch_o
    own_pf, own_kv_pf, own_comb, own_f16 = smg.PREFETCH_BYTES, dak.PREFETCH, dak.FUSE_COMBINE, dak.FP8_F16
    own_tile, own_chain = dak.ONE_SPLIT_TILES, small_gemm.AMAX_CHAIN_MAX_M
    own_split, own_early, own_hoist = (dak.SPLIT_WAVES, dak.MULTI_SPLIT_TILE), pdl_launch.EARLY_TRIGGER, dak.HOIST_LOADS
    own_fma, own_tma = smg.FMA_MAX_M, smg.TMA
    smg.FMA_MAX_M = own_fma if v.fma_max_m is None else v.fma_max_m
    smg.TMA = own_tma if v.tma is None else v.tma
    if v.carveout is not None:
        from tpfuse.kernels import carveout

        carveout.set_carveout(v.carveout)
    dak.HOIST_LOADS = own_hoist if v.hoist is None else v.hoist
    if v.gemm_prefetch_bytes is not None:
        smg.PREFETCH_BYTES = v.gemm_prefetch_bytes
    pdl_launch.EARLY_TRIGGER = own_early if v.early_trigger is None else v.early_trigger
    dak.SPLIT_WAVES, dak.MULTI_SPLIT_TILE = own_split if v.split_rule is None else v.split_rule
    dak.ONE_SPLIT_TILES = own_tile if v.one_split_tiles is None else v.one_split_tiles
    small_gemm.AMAX_CHAIN_MAX_M = own_chain if v.amax_chain_max_m is None else v.amax_chain_max_m
    pdl = own_pdl if v.pdl is None else v.pdl
    st.cache_config.pdl = pdl
    if v.prefetch is not None:  # the prefetch this A/B was built to time (the budget tried, the first K / V tile)
        budget = smg.PREFETCH_BYTES_TRIED if v.prefetch_bytes is None else v.prefetch_bytes
        smg.PREFETCH_BYTES, dak.PREFETCH = (budget, True) if v.prefetch else (0, False)
    dak.FUSE_COMBINE = own_comb if v.fuse_combine is None else v.fuse_combine
    dak.FP8_F16 = own_f16 if v.fp8_f16 is None else v.fp8_f16
    try:
        with smc.install(table) if table is not None else contextlib.nullcontext():
            smc.ROUTE_MEMO.clear()  # the count below is this step's
            r = _measure(rows, base, provider, lambda: tpfuse_decode_us(model, batch, args.context, args.steps, dev),
                         dev, lambda: dict(last_mode=st.last_mode, pdl=pdl and pdl_launch.available(dev),
                                           routed=sum(isinstance(c, smc.GemmConfig) for c in smc.ROUTE_MEMO.values()),
                                           table=os.path.basename(v.table) if v.table else "shipped",
                                           everywhere=v.everywhere, prefetch_bytes=smg.PREFETCH_BYTES if pdl else 0,
                                           fuse_rope=st.cache_config.fuse_rope, fuse_combine=dak.FUSE_COMBINE,
                                           fold_norms=st.cache_config.fold_norms, fp8_f16=dak.FP8_F16,
                                           prefetch_o_proj=st.cache_config.prefetch_o_proj,
                                           one_split_tiles=[[a, list(t)] for a, t in dak.ONE_SPLIT_TILES],
                                           amax_chain_max_m=small_gemm.AMAX_CHAIN_MAX_M,
                                           split_rule=[dak.SPLIT_WAVES, dak.MULTI_SPLIT_TILE],
                                           early_trigger=pdl_launch.EARLY_TRIGGER, hoist=dak.HOIST_LOADS,
                                           fp8_weight_only_max_tokens=st.cache_config.fp8_weight_only_max_tokens,
                                           fma_max_m=smg.FMA_MAX_M, tma=smg.TMA, carveout=v.carveout,
                                           fold_attn_combine=st.cache_config.fold_attn_combine))
    finally:
        st.cache_config.pdl, st.cache_config.fuse_rope, st.graphs = own_pdl, own_fuse, None
        st.cache_config.fold_norms, st.cache_config.prefetch_o_proj = own_fold, own_opf
        st.cache_config.fp8_weight_only_max_tokens, st.cache_config.fold_attn_combine = own_w8, own_af
        smg.PREFETCH_BYTES, dak.PREFETCH, dak.FUSE_COMBINE, dak.FP8_F16 = own_pf, own_kv_pf, own_comb, own_f16
        dak.ONE_SPLIT_TILES, small_gemm.AMAX_CHAIN_MAX_M = own_tile, own_chain
        dak.SPLIT_WAVES, dak.MULTI_SPLIT_TILE = own_split
        pdl_launch.EARLY_TRIGGER, dak.HOIST_LOADS = own_early, own_hoist
        smg.FMA_MAX_M, smg.TMA = own_fma, own_tma
        if v.carveout is not None:
            carveout.set_carveout(None)
    return r


def variant_rows(model, batch, args, dev, rows, base, provider):
    """Every variant of :func:`variants` of one decode row (``<provider><suffix>``); the fold only where the step
    folds (``tpfuse.parallel.forward.can_fold_norms``: TP = 1, bf16 layers, at most 64 tokens) and never for a shard
    (it stands for a TP > 1 rank: :func:`run_model`); ``_kv8`` rows take only the ``--f16-ab`` variant, the rest
    every other."""
    from tpfuse.parallel.forward import can_fold_norms

    from tpfuse import small_gemm
    from tpfuse.kernels import decode_attention as dak

    foldable = base.get("tp_shard") is None and can_fold_norms(model, batch)
    kv8 = provider.endswith("_kv8")
    per_token = provider.startswith("tpfuse_fp8") and "static" not in provider
    for v in variants(args):
        if (v.fold_norms and not foldable) or (v.fp8_f16 is not None) != kv8:
            continue
        if v.hoist is not None and v.hoist == dak.hoist_level(None, kv8, batch):  # the default's level here
            continue
        if v.fp8_weight_only is not None and (not provider.startswith("tpfuse_fp8") or (
                batch <= model._tpfuse.cache_config.fp8_weight_only_max_tokens) == (batch <= v.fp8_weight_only)):
            continue  # FP8 rows, weight-only the other way than the default at this batch
        if v.amax_chain_max_m is not None and (not per_token or (batch <= small_gemm.AMAX_CHAIN_MAX_M) != (
                v.amax_chain_max_m < batch)):  # per-token FP8 rows, the chain the other way than at this batch
            continue
        if v.attn_fold is not None and (provider.startswith("tpfuse_fp8") or not attn_foldable(model, batch, dev)):
            continue  # 16-bit layers whose attention splits and whose partials fit
        if v.fma_max_m is not None and (not provider.startswith("tpfuse_fp8") or batch > v.fma_max_m or
                                        batch > model._tpfuse.cache_config.fp8_weight_only_max_tokens):
            continue  # FP8 rows whose steps run weight-only, at most FMA_MAX_M tokens
        variant_row(model, batch, args, dev, rows, base, provider + v.suffix, v)


def _label(r) -> str:
    """A row's provider as printed and plotted (capacity rows: with their capacity)."""
    if r["provider"] == "tpfuse_capacity":
        return f"capacity_{r.get('max_batch')}x{r.get('max_seq_len')}"
    return r["provider"]


def _print(r, rows):
    if dist.get_rank() != 0:
        return
    same = [x for x in rows if all(x.get(k) == r.get(k) for k in ("model", "mode", "tokens"))]
    cells = "  ".join(f"{_label(x)}={x['us']:.0f}" for x in same)
    print(f"[{r['model']} {r['mode']} {'batch' if r['mode'] == 'decode' else 'tokens'}={r['tokens']}] us: {cells}"
          f"  ({r.get('last_mode')}){'  ERROR ' + r['error'] if 'error' in r else ''}", flush=True)


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def _comm(args, hidden, config=None):
    max_tokens = max([*args.prefill, max(args.decode_batches) * args.context])
    return tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=hidden, dtype=torch.bfloat16, config=config)


def _free_bytes(dev) -> int:
    """Free device memory once this process's unused cached blocks are returned."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(dev)[0]


def resolve_spec(name, args, dev):
    """The run's :class:`e2e_models.Spec` of ``name`` (``--layers fit``: computed from the free memory now and
    printed); ``None`` when no layer fits."""
    tp = dist.get_world_size()
    base, tp_shard = em.parse_name(name)
    if tp_shard is not None and tp > 1:
        raise ValueError(f"{name}: shard models run at TP=1 (they are one rank's shard already), this run has TP={tp}")
    vocab = em.resolve_vocab(args.vocab, args.layers, name)
    layers = em.resolve_layers(args.layers, name)
    if layers is None:
        arch, shape = em.model_shape(name)
        shape = em.shard_config(shape, tp) if tp > 1 else shape  # this rank's bytes
        tokens = max([*args.prefill, max(args.decode_batches) * args.context])
        head = em.head_rows(name if tp == 1 else f"{base}/tp{tp}", vocab)  # this rank's vocabulary-parallel rows
        layers, budget = em.fit_layers(arch, shape, vocab=vocab, free_bytes=_free_bytes(dev),
                                       max_batch=max(args.decode_batches), max_seq_len=args.context + args.steps + 16,
                                       tokens=tokens, headroom_bytes=int(args.fit_headroom_gib * 2 ** 30),
                                       cap=em.REAL[base][0], head=head)
        layers = int(-common.slowest_rank(-layers, dev))  # the fewest over the ranks
        _say(f"{name} --layers fit: {em.describe_budget(layers, budget)}")
        if layers < 1:
            _say(f"{name}: skipped, not one layer fits")
            return None
    return em.Spec(name=name, layers=layers, vocab=vocab)


def set_cache(model, cfg: KVCacheConfig) -> None:
    """Give a parallelized model the KV cache ``cfg`` describes: drop its storage and decode graphs (re-made
    lazily from ``model._tpfuse.cache_config`` by the next call) and extend the RoPE table when ``cfg`` needs more
    positions - what ``parallelize(..., cache=cfg)`` would have set up, on the same weights."""
    from tpfuse.parallel.wrap import _cos_sin_rows

    cfg.validate()
    st = model._tpfuse
    st.graphs = st.storage = None
    _free_bytes(st.comm.device)  # the old cache's memory back before the new one is allocated
    st.cache_config, st.max_seq_len = cfg, cfg.max_seq_len
    if st.cos_sin.shape[0] < cfg.max_seq_len:
        st.cos_sin = _cos_sin_rows(model, st.layout, max(cfg.max_seq_len, st.comm.max_tokens), st.comm)


def _capacity_skip(spec, model, args, batches, max_batch, max_seq_len, dev) -> str:
    """Why a capacity point cannot run here ('' when it can); called with the model's cache released."""
    st = model._tpfuse
    if not batches:
        return f"no --decode-batches <= max_batch={max_batch}"
    if args.context + args.steps + 3 > max_seq_len:
        return f"context {args.context} + 3 warm-up + {args.steps} timed steps > max_seq_len={max_seq_len}"
    shape = dict(num_key_value_heads=st.kv_heads, head_dim=st.head_dim)
    kv = len(st.layers) * em.kv_bytes_per_layer(shape, max_batch, max_seq_len, st.cache_config.block_size)
    tp, full = dist.get_world_size(), em.model_shape(spec.name)[1]
    shard = em.shard_config(full, tp) if tp > 1 else full  # this rank's activations, as resolve_spec sizes them
    act = em.activation_bytes(shard, max(batches) * args.context)
    headroom = int(args.fit_headroom_gib * 2 ** 30)
    need, free = kv + act + headroom, int(-common.slowest_rank(-_free_bytes(dev), dev))  # the least over the ranks
    if need > free:
        return (f"needs {need / 2 ** 30:.1f} GiB (KV cache {kv / 2 ** 30:.1f}, prefill activations "
                f"{act / 2 ** 30:.1f}, headroom {headroom / 2 ** 30:.1f}), {free / 2 ** 30:.1f} GiB free")
    return ""


def capacity_rows(spec, model, comm, args, dev, rows, bandwidth, skipped, save):
    """``tpfuse_capacity`` rows: per ``--kv-capacities`` point, the decode rows with the cache re-made at that
    capacity (points that cannot run go to ``skipped``, reason printed); the model's own cache restored after."""
    own = model._tpfuse.cache_config
    for max_batch, max_seq_len in args.kv_capacities:
        batches = [b for b in args.decode_batches if b <= max_batch]
        set_cache(model, own)  # releases what the previous point allocated (the cache is made again on use)
        why = _capacity_skip(spec, model, args, batches, max_batch, max_seq_len, dev)
        if why:
            _say(f"[{spec.label}] capacity {max_batch}x{max_seq_len} skipped: {why}")
            skipped.append(dict(model=spec.label, provider="tpfuse_capacity", max_batch=max_batch,
                                max_seq_len=max_seq_len, reason=why))
            continue
        set_cache(model, KVCacheConfig(max_batch=max_batch, max_seq_len=max_seq_len))
        _say(f"[{spec.label}] capacity {max_batch}x{max_seq_len}: {model._tpfuse.cache_storage().describe()}")
        tpfuse_rows(spec, model, comm, args, dev, rows, bandwidth, provider="tpfuse_capacity", batches=batches,
                    prefill=False)
        save()
    set_cache(model, own)


def kv8_rows(spec, model, comm, args, dev, rows, bandwidth, provider):
    """``<provider>_kv8`` (``--kv-fp8``): the decode rows with the model's cache re-made in e4m3 at the same
    capacity (kv_scale 1), then the model's own cache back."""
    import dataclasses

    own = model._tpfuse.cache_config
    set_cache(model, dataclasses.replace(own, dtype=torch.float8_e4m3fn, kv_scale=1.0))
    try:
        tpfuse_rows(spec, model, comm, args, dev, rows, bandwidth, provider=provider + "_kv8", prefill=False)
    finally:
        set_cache(model, own)


def run_model(name, args, dev, rows, bandwidth, first: bool, save=lambda: None, skipped=None):
    """Every row of one model (see the module docstring for the order); ``save()`` after each phase."""
    tp = dist.get_world_size()
    spec = resolve_spec(name, args, dev)
    if spec is None:
        return
    hf = tp == 1 and name in args.hf_models.split(",")
    compile_batches = args.compile_batches if first else []
    model = build_model(name, spec.layers, dev, spec.vocab)
    if hf and not args.hf_after:
        hf_rows(spec, model, args, dev, rows, compile_batches, save)
        save()
    comm = _comm(args, model.config.hidden_size)
    # a shard stands for one rank at TP > 1, where the fused all-reduce does the add + RMSNorm: never folded
    over = {"fold_norms": False} if spec.tp_shard is not None else {}
    if args.fp8_weight_only is not None:
        over["fp8_weight_only_max_tokens"] = args.fp8_weight_only
    cache = KVCacheConfig(max_batch=max(args.decode_batches), max_seq_len=args.context + args.steps + 16, **over)
    model = tpfuse.parallelize(model, comm, cache=cache)
    _say(f"{spec.label} ({spec.layers} layers, vocab {spec.vocab}): {model._tpfuse.cache_storage().describe()}")
    tpfuse_rows(spec, model, comm, args, dev, rows, bandwidth)
    save()
    if args.kv_fp8:
        kv8_rows(spec, model, comm, args, dev, rows, bandwidth, "tpfuse")
        save()
    if args.kv_capacities:
        capacity_rows(spec, model, comm, args, dev, rows, bandwidth, [] if skipped is None else skipped, save)
    if args.head_ab and spec.tp_shard is not None:
        head_ab_rows(spec, model, comm, args, dev, rows, bandwidth)
        save()
    if tp > 1:
        comm_rows(spec, model, comm, args, dev, rows, bandwidth)
    if not args.no_fp8:
        from tpfuse.parallel import quantize_fp8

        quantize_fp8(model)  # in place, after the bf16 rows: the same weights, e4m3 per-channel
        tpfuse_rows(spec, model, comm, args, dev, rows, bandwidth, provider="tpfuse_fp8")
        save()
        if args.kv_fp8:
            kv8_rows(spec, model, comm, args, dev, rows, bandwidth, "tpfuse_fp8")
            save()
        del model
        fp8_static_rows(spec, args, dev, rows, bandwidth, comm, cache)
        save()
    model = None
    comm.close()
    _free_bytes(dev)
    if hf and args.hf_after:
        hf_rows(spec, build_model(name, spec.layers, dev, spec.vocab), args, dev, rows, compile_batches, save,
                compile_last=True)
        save()
        _free_bytes(dev)


def head_ab_rows(spec, model, comm, args, dev, rows, bandwidth):
    """``tpfuse_headrep`` (``--head-ab``, a shard): the decode rows (and their floor) with a whole-vocabulary
    random lm_head in place of the shard's rank-0 rows - the step of a replicated head - then the shard's own
    head back. The decode graphs are dropped before and after (they captured the head's weight)."""
    st = model._tpfuse
    own = model.lm_head
    model.lm_head = torch.nn.Linear(own.in_features, spec.vocab, bias=False, device=dev, dtype=own.weight.dtype)
    st.graphs = None
    try:
        tpfuse_rows(spec, model, comm, args, dev, rows, bandwidth, provider="tpfuse_headrep", prefill=False)
    finally:
        model.lm_head, st.graphs = own, None
        if torch.device(dev).type == "cuda":
            _free_bytes(dev)  # the whole head's memory back


def comm_rows(spec, model, comm, args, dev, rows, bandwidth):
    """TP > 1: the no-communication floor (``tpfuse_nocomm``) and, with ``--flashinfer``, ``vllm_policy``."""
    model._tpfuse.local = True  # the no-communication floor (wrong logits by design)
    tpfuse_rows(spec, model, comm, args, dev, rows, bandwidth, provider="tpfuse_nocomm")
    model._tpfuse.local = False
    if args.flashinfer:
        policy = _comm(args, model.config.hidden_size, tpfuse.CommConfig(thresholds_path=POLICY))
        model._tpfuse.comm = policy
        tpfuse_rows(spec, model, policy, args, dev, rows, bandwidth, provider="vllm_policy")
        model._tpfuse.comm = comm
        policy.close()  # collective: frees FlashInfer's IPC buffers


def fp8_static_rows(spec, args, dev, rows, bandwidth, comm, cache):
    """``tpfuse_fp8_static``: per-tensor weight scales and static activation scales calibrated on the unsharded
    model (64 random tokens), so every GEMM is a per-tensor ``_scaled_mm`` (cuBLASLt) instead of a row-wise one."""
    from tpfuse.parallel import calibrate_input_scales, quantize_fp8

    model = build_model(spec.name, spec.layers, dev, spec.vocab)
    ids = torch.randint(0, _ids_below(model), (1, 64), device=dev, generator=torch.Generator(device=dev).manual_seed(3))
    scales = calibrate_input_scales(model, ids)
    model = tpfuse.parallelize(model, comm, cache=cache)
    quantize_fp8(model, activation="static", weight="per_tensor", input_scales=scales)
    tpfuse_rows(spec, model, comm, args, dev, rows, bandwidth, provider="tpfuse_fp8_static")


def main(argv=None):
    args = parse_args(argv)
    for name in args.models.split(","):
        em.parse_name(name)  # an unknown name fails before anything is built
    if args.small_m_table:
        load_table(args.small_m_table)  # so does a bad routing table
    with common.rank_context() as ranks:
        dev = ranks.device
        samples = []

        def measure_copy() -> float:  # one more copy-bandwidth measurement; the run's ceiling so far
            try:  # 2 GiB of buffers: after a model that filled the GPU the run keeps the ceiling it has
                ways = {k: round(v / 1e12, 3) for k, v in common.copy_bandwidths(dev).items()}
            except torch.cuda.OutOfMemoryError:
                if not samples:
                    raise
                print(f"rank {ranks.rank}: no memory for another copy-bandwidth measurement", flush=True)
                return max(max(w.values()) for w in samples) * 1e12
            samples.append(ways)
            if ranks.rank == 0:
                print(f"device-to-device copy bandwidth: {max(ways.values()):.2f} TB/s (by way: {ways})", flush=True)
            return max(max(w.values()) for w in samples) * 1e12

        bandwidth = measure_copy()  # the faster way (common.copy_bandwidths says why)
        rows, skipped = [], []

        def save():  # rank 0 writes; a run cut off later keeps what was measured so far
            if ranks.rank == 0:
                _write(rows, args, bandwidth, skipped, samples)

        if not args.no_fp8:
            from fp8_quality import fp8_quality

            q = fp8_quality(ranks.world, dev)
            rows.append(dict(model="tiny", mode="fp8_quality", tokens=q["steps"], provider="tpfuse_fp8",
                             us=float("nan"), **q))
            if ranks.rank == 0:
                print(f"fp8 quality (tiny model): {q}", flush=True)
        for i, name in enumerate(args.models.split(",")):
            run_model(name, args, dev, rows, bandwidth, first=i == 0, save=save, skipped=skipped)
            bandwidth = measure_copy()
            refloor(rows, bandwidth)
            save()


def refloor(rows, bandwidth: float) -> None:
    """Every ``memory_floor`` row at ``bandwidth`` (bytes / s): the run's fastest copy so far."""
    for r in rows:
        if r["provider"] == "memory_floor":
            r["us"] = r["bytes"] / bandwidth * 1e6


def _write(rows, args, bandwidth, skipped=(), samples=()):
    """The JSON (+ PNG) of the rows so far. Header: ``copy_bandwidth_tb_s`` (the floors' ceiling: the fastest
    measurement), ``copy_bandwidth_ways_tb_s`` (the measurement that gave it, by way) and
    ``copy_bandwidth_samples_tb_s`` (every measurement of the run, in order)."""
    tp = dist.get_world_size()
    best = max(samples, key=lambda w: max(w.values()), default={})
    hdr = common.header("e2e", tp=tp, layers=args.layers, context=args.context, steps=args.steps,
                        copy_bandwidth_tb_s=round(bandwidth / 1e12, 3), copy_bandwidth_ways_tb_s=best,
                        copy_bandwidth_samples_tb_s=list(samples),
                        timing="host wall time per call between "
                        "device syncs (decode: per step over --steps steps)")
    for key in ("vocab", "kv_capacities", "tag"):
        if getattr(args, key, None):
            hdr[key] = getattr(args, key)
    path = common.write_json(common.result_path("e2e", tp=tp, tag=getattr(args, "tag", "")), hdr, rows,
                             **({"skipped": list(skipped)} if skipped else {}))
    print("wrote", path, flush=True)
    # panels that have tpfuse rows (the baseline) so far; the plot may fail, the JSON is written
    based = {(r["model"], r["mode"]) for r in rows if r["provider"] == "tpfuse" and r["us"] == r["us"]}
    plotted = [dict(r, provider=_label(r)) for r in rows if r["us"] == r["us"] and (r["model"], r["mode"]) in based]
    if not plotted:
        return
    try:
        common.plot_ratio_panels(path.replace(".json", ".png"), plotted,
                                 panel=("model", "mode"), x="tokens", y="us", baseline="tpfuse",
                                 ylabel="time / tpfuse (above 1: tpfuse faster)",
                                 xlabel=lambda key: "batch (context %d)" % args.context if key[1] == "decode"
                                 else "prefill tokens",
                                 title=f"E2E through tpfuse.parallelize, TP={tp}, {args.layers} layers, "
                                       f"{hdr['device']}, {hdr['commit'][:10]}")
    except Exception as ex:  # noqa: BLE001 - a plot never ends a run
        print(f"plot failed: {type(ex).__name__}: {ex}", flush=True)


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
