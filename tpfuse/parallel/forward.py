"""The parallelized model's forward: Hugging Face arguments in, packed tokens through the TP decoder, logits out.

Per call: the padded ``[B, L]`` inputs are packed (:mod:`~tpfuse.parallel.batch`); a decode step (one token per
row, with a KV cache, on CUDA) replays the bucket's CUDA graph (:mod:`~tpfuse.parallel.graphs`); anything else runs
eagerly, in the all-reduce or the sequence-parallel form that ``comm.plan(T)`` picks. At TP > 1 a prefill first
compares the ranks' calls in one small collective (:func:`~tpfuse.parallel.rank_sync.check_same_call`): ranks given
different inputs all raise ``TPFuseMismatchError``. Every other check that can reject a call runs after that and
before the first collective of the model, on every rank alike (the ranks' inputs are then known to be the same).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from typing import Optional

import torch

from .. import ops, small_gemm
from ..errors import TPFuseInputError, TPFuseUnsupportedError
from ..sharding import shard_range
from .batch import StepMeta, pack
from .kv_cache import TPKVCache
from .layers import StepContext, get_path, norm_eps
from .rank_sync import check_same_call
from .vocab_head import gather_logits

_IGNORED = ("cache_position",)  # generate() may pass it; we track positions per row ourselves


def forward_core(model, ids: torch.Tensor, meta: StepMeta, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits ``[T or len(keep), vocab]`` of the packed tokens ``ids [T]`` (graph-capturable: no host sync)."""
    st = model._tpfuse
    comm, layout = st.comm, st.layout
    storage = st.no_cache_storage() if meta.slot_mapping is None else st.cache_storage()
    layers = st.layers
    ctx = StepContext(comm=comm, meta=meta, cos_sin=st.cos_sin, storage=storage, local=st.local,
                      fold_norms=folds_norms(model, meta), fp8_weight_only=fp8_weight_only(model, meta))
    mine = ids
    if meta.sp:
        s, e = shard_range(meta.num_tokens, comm.tp, comm.rank)
        mine = ids[s:e]
    first = layers[0].input_norm
    x, residual = ops.add_rmsnorm(get_path(model, layout.embed)(mine), None, first.weight, norm_eps(first),
                                  quant=None if ctx.fp8_weight_only else layers[0].in_quant)  # FP8: qkv's format
    final = get_path(model, layout.final_norm)
    for li, layer in enumerate(layers):
        nxt = layers[li + 1].input_norm if li + 1 < len(layers) else final
        x, residual = layer(x, residual, nxt.weight, norm_eps(nxt), ctx)
    if ctx.fold_norms:
        x = x.materialize()
    if meta.sp:
        x = comm.all_gather(x, num_tokens=meta.num_tokens)
    if keep is not None:
        x = x.index_select(0, keep)
    logits = get_path(model, layout.lm_head)(x)
    if st.head_range is None:
        return logits
    return gather_logits(comm, logits, st.head_range[0], st.vocab, local=st.local)


def can_fold_norms(model, num_tokens: int, sp: bool = False) -> bool:
    """Whether a step of ``num_tokens`` can run with the RMSNorms folded into the GEMMs: TP = 1, at most
    ``small_gemm.MAX_M`` tokens, every layer able to (:meth:`TPDecoderLayer.can_fold_norms`), a bf16 final norm (the
    last layer's down_proj takes its weight); FP8 layers only in a weight-only step (:func:`fp8_weight_only`)."""
    st = model._tpfuse
    if not (st.local and st.comm.tp == 1 and not sp and num_tokens <= small_gemm.MAX_M
            and get_path(model, st.layout.final_norm).weight.dtype == torch.bfloat16
            and all(getattr(layer, "can_fold_norms", lambda: False)() for layer in st.layers)):
        return False
    fp8 = any(hasattr(layer, "can_run_weight_only") for layer in st.layers)  # FP8DecoderLayer
    return not fp8 or fp8_weight_only_at(model, num_tokens, sp)


def folds_norms(model, meta: StepMeta) -> bool:
    """Whether this step runs with the RMSNorms folded: ``KVCacheConfig.fold_norms`` and :func:`can_fold_norms`."""
    return model._tpfuse.cache_config.fold_norms and can_fold_norms(model, meta.num_tokens, meta.sp)


def fp8_weight_only_at(model, num_tokens: int, sp: bool = False) -> bool:
    """Whether a step of ``num_tokens`` runs its FP8 layers weight-only (``KVCacheConfig.fp8_weight_only_max_tokens``):
    the all-reduce form, at most that many tokens, a model with FP8 layers that all can
    (:meth:`~tpfuse.parallel.fp8_layer.FP8DecoderLayer.can_run_weight_only`) and no other decoder layers."""
    st = model._tpfuse
    most = st.cache_config.fp8_weight_only_max_tokens
    if not most or sp or num_tokens > min(most, small_gemm.MAX_M):
        return False
    return all(getattr(layer, "can_run_weight_only", lambda: False)() for layer in st.layers)


def fp8_weight_only(model, meta: StepMeta) -> bool:
    """:func:`fp8_weight_only_at` of this step."""
    return fp8_weight_only_at(model, meta.num_tokens, meta.sp)


def _resolve_cache(st, given, use_cache: Optional[bool], batch: int, config) -> Optional[TPKVCache]:
    """The call's cache handle: the one given, a new batch, or ``None`` (no cache)."""
    if isinstance(given, TPKVCache):
        given.check_live()
        if given.batch != batch:
            raise TPFuseInputError(f"the cache holds {given.batch} sequences but input_ids has {batch} rows")
        return given
    if given is not None:  # e.g. the empty DynamicCache generate() makes: we keep our own static cache
        seen = getattr(given, "get_seq_length", lambda: None)()
        if seen != 0:
            raise TPFuseInputError(f"cache must be the TPKVCache a previous call returned (or empty), got "
                                   f"{type(given).__name__} holding {seen} tokens")
    if use_cache is None:
        use_cache = given is not None or bool(getattr(config, "use_cache", True))
    return st.cache_storage().new_batch(batch) if use_cache else None


def _keep_rows(call, logits_to_keep) -> Optional[torch.Tensor]:
    """Packed indices whose logits are returned (``None``: all); positions ``>= L - k`` of every row."""
    if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise TPFuseUnsupportedError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
    k = logits_to_keep
    if k == 0 or k >= call.width:
        return None
    col = (call.token_index % call.width if call.token_index is not None
           else torch.arange(call.width, device=call.ids.device).repeat(call.batch))
    return (col >= call.width - k).nonzero().squeeze(1)


def _unpack_logits(logits: torch.Tensor, call, keep: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """``[B, L', vocab]`` from packed rows, zeros where a position is padding."""
    width = call.width if k == 0 else min(k, call.width)
    if call.token_index is None:
        return logits.view(call.batch, width, -1)
    out = logits.new_zeros(call.batch * width, logits.shape[-1])
    idx = call.token_index if keep is None else call.token_index.index_select(0, keep)
    b, j = idx // call.width, idx % call.width - (call.width - width)
    out.index_copy_(0, b * width + j, logits)
    return out.view(call.batch, width, -1)


def _run(model, call, handle, keep) -> torch.Tensor:
    st = model._tpfuse
    comm, meta = st.comm, call.meta
    if call.decode_step:
        if _graphs_usable(model, call.ids.shape[0]):
            st.last_mode = "decode_graph"
            logits = _graphs(model).run(call.ids, handle.lengths_dev, meta.rope_pos)
            return logits if keep is None else logits.index_select(0, keep)
        meta = call.decode_meta(handle)
    sp = not st.local and comm.plan(meta.num_tokens).mode == "sequence_parallel"
    st.last_mode = "sequence_parallel" if sp else "allreduce"
    return forward_core(model, call.ids, dataclasses.replace(meta, sp=sp), keep)


def _graphs_usable(model, batch: int) -> bool:
    st = model._tpfuse
    if not (st.comm.device.type == "cuda" and st.cache_config.cuda_graphs
            and not torch.cuda.is_current_stream_capturing()):
        return False
    if st.comm.graph_safe(_graphs(model).bucket(batch)):
        return True
    if not st.warned_eager_decode:  # one-GPU mode with a host-staged path: say once why decode is eager
        st.warned_eager_decode = True
        warnings.warn(f"tpfuse: decode steps run eagerly, not as CUDA graphs: {st.comm.plan(batch)}\nIn one-GPU mode "
                      f"the nccl / reference paths are gloo collectives through host memory, which CUDA graphs "
                      f"cannot capture; pin the all-reduce to tpfuse's kernels to capture decode (CommConfig("
                      f"force_paths={{'fused_add_rmsnorm': 'tpfuse_oneshot'}})).", stacklevel=4)
    return False


def _graphs(model):
    st = model._tpfuse
    if st.graphs is None:
        from .graphs import DecodeGraphs

        st.graphs = DecodeGraphs(st.cache_storage(), st.cache_config.buckets(),
                                 lambda ids, meta: forward_core(model, ids, meta), pdl=st.cache_config.pdl)
    return st.graphs


def tp_forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
               position_ids: Optional[torch.Tensor] = None, past_key_values=None, inputs_embeds=None,
               use_cache: Optional[bool] = None, logits_to_keep: int = 0, cache=None,
               return_dict: Optional[bool] = None, **kwargs):
    """The parallelized model's forward (see :func:`tpfuse.parallel.parallelize` and the module docstring)."""
    st = self._tpfuse
    for k, v in kwargs.items():
        if v is not None and v is not False and k not in _IGNORED:
            raise TPFuseUnsupportedError(f"parallelized forward does not support {k}={v!r}")
    if inputs_embeds is not None:
        raise TPFuseUnsupportedError("parallelized forward takes input_ids, not inputs_embeds")
    if input_ids is None or input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
        raise TPFuseInputError("input_ids must be a non-empty [batch, tokens] (or [tokens]) tensor")
    flat = input_ids.dim() == 1
    ids2 = input_ids[None] if flat else input_ids
    if flat and position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids[None]
    given = cache if cache is not None else past_key_values
    with torch.no_grad():
        if not st.local and not (isinstance(given, TPKVCache) and ids2.shape[1] == 1):  # a prefill at TP > 1
            check_same_call(st.comm, ids2, attention_mask, given.lengths if isinstance(given, TPKVCache) else [],
                            st.vocab if st.head_range is not None else 0)
        handle = _resolve_cache(st, given, use_cache, ids2.shape[0], self.config)
        call = pack(ids2, attention_mask, position_ids, handle, st.comm.device)
        if call.meta.num_tokens > st.comm.max_tokens:
            raise TPFuseInputError(f"the call has {call.meta.num_tokens} real tokens, more than the communicator's "
                                   f"max_tokens={st.comm.max_tokens}: split the batch or build the TPCommunicator "
                                   f"with a larger max_tokens")
        _check_positions(st, call, position_ids)
        keep = _keep_rows(call, logits_to_keep)
        if handle is not None:  # every check passed: a new batch takes the cache over only now
            handle.storage.activate(handle)
        logits = _unpack_logits(_run(self, call, handle, keep), call, keep, logits_to_keep)
        if handle is not None:
            handle.advance(call.counts, 1 if call.decode_step else None)
    logits = logits[0] if flat else logits
    return (logits, handle) if return_dict is False else _output(logits, handle)


def _check_positions(st, call, position_ids) -> None:
    """RoPE positions must index the cos/sin table. Host tensors, and prefills, are checked on the host (a prefill
    reads its mask anyway); a decode step's device positions on the device (no sync; a bad one is a device assert,
    since reading past the table would be an out-of-bounds access)."""
    if position_ids is None:
        return
    n = st.cos_sin.shape[0]
    msg = (f"position_ids must lie in [0, {n}) (the RoPE table covers max(max_seq_len, comm.max_tokens) "
           f"positions)")
    if position_ids.device.type == "cpu" or not call.decode_step:
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= n:
            raise TPFuseInputError(f"{msg}, got [{lo}, {hi}]")
    else:
        pos = call.meta.rope_pos
        torch._assert_async(((pos >= 0) & (pos < n)).all(), msg)


@functools.lru_cache(maxsize=None)
def _output_class():
    """transformers' output class and the name of its cache field (``cache`` from 5.2x, ``past_key_values``
    before), looked up once: the forward runs every decode step."""
    try:
        from transformers.modeling_outputs import CausalLMOutputWithPast
    except ImportError:  # the model came from elsewhere: same attribute names
        return None, None
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return CausalLMOutputWithPast, "cache" if "cache" in names else "past_key_values"


def _output(logits, cache):
    cls, key = _output_class()
    if cls is None:
        return types.SimpleNamespace(logits=logits, past_key_values=cache, cache=cache)
    return cls(logits=logits, **{key: cache})
