"""``parallelize(model, comm)``: shard a Hugging Face causal LM in place and run it through the communicator.

What it does to the model (per rank, in place):

1. **Shards** every module the layout names: column-parallel ``nn.Linear`` keep output-feature range ``rank`` of TP
   (q/k/v split by heads, GQA kv heads too - or replicated when fewer than TP; gate/up by intermediate features;
   a module stacking several projections, Phi-3's ``qkv_proj`` / ``gate_up_proj``, keeps range ``rank`` of each
   part),
   row-parallel ones keep input-feature range ``rank`` (o_proj, down_proj; a row bias stays whole on every rank and
   is added once, to the residual); the lm_head keeps vocabulary rows ``rank`` of TP
   (:mod:`~tpfuse.parallel.vocab_head`, ``KVCacheConfig.vocab_parallel_head``; a head tied to the embedding stays
   whole). Embedding, norms and rotary embedding stay replicated. ``model._tpfuse.shards`` records each
   sharded parameter's slice (what :func:`tpfuse.parallel.load_sharded_safetensors` reads).
2. **Moves** the model to ``comm.device`` (after sharding, so a rank never holds more than the full CPU copy it
   was given plus its shard on the device); a meta-device model instead gets empty storage of its shard shapes
   there (:mod:`~tpfuse.parallel.meta`), filled by ``load_sharded_safetensors``.
3. **Replaces** each decoder layer with a :class:`~tpfuse.parallel.layers.TPDecoderLayer` (same submodules and
   ``state_dict`` names) and the model's ``forward`` with :func:`tpfuse.parallel.forward.tp_forward`: batched,
   padded calls, a static paged KV cache (:mod:`~tpfuse.parallel.kv_cache`), CUDA-graph decode steps
   (:mod:`~tpfuse.parallel.graphs`), and Hugging Face ``generate()``.

The lm_head is vocabulary-parallel at TP > 1: each rank computes its rows' logits from the replicated final
hidden states (the last fused all-reduce + final norm produced them) and one all-reduce of the zero-padded logits
gives every rank all of them (:func:`~tpfuse.parallel.vocab_head.gather_logits`): a decode step reads ``1 / TP`` of
the head's bytes on each rank instead of all of them, for one collective of ``T x vocab`` elements.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import TPFuseInputError, TPFuseTypeError, TPFuseUnsupportedError
from .kv_cache import KVCacheConfig, KVStorage
from .fp8 import FP8Linear
from .fp8_layer import FP8DecoderLayer
from . import vocab_head
from .layers import TPDecoderLayer, get_path, link_quant
from .meta import is_meta, materialize
from .layout import HEAD_COUNTS, TPLayout, layout_for, resolve_layout


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the full (unsharded) parameter this rank holds."""

    dim: int
    """Split dimension: 0 (column-parallel weight/bias rows) or 1 (row-parallel weight columns)."""
    start: int
    """First index kept along ``dim``."""
    end: int
    """One past the last index kept along ``dim``."""
    full_shape: Tuple[int, ...]
    """Shape of the unsharded parameter (checked against a checkpoint)."""
    parts: Tuple[Tuple[int, int], ...] = ()
    """A module stacking several projections (``TPLayout.parts``): this rank's ``[start, end)`` of each part, kept
    concatenated in this order (``start`` / ``end`` are then the first's start and the last's end); ``()``: one
    contiguous range."""

    @property
    def ranges(self) -> Tuple[Tuple[int, int], ...]:
        """The ``[start, end)`` ranges along ``dim`` this rank holds, in the order it stores them."""
        return self.parts or ((self.start, self.end),)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``t`` (a new tensor, contiguous)."""
        return torch.cat([t.narrow(self.dim, s, e - s) for s, e in self.ranges], dim=self.dim).contiguous()


@dataclass
class TPState:
    """What :func:`parallelize` attaches to the model as ``model._tpfuse``."""

    comm: object
    layout: TPLayout
    layers: nn.ModuleList
    cache_config: KVCacheConfig
    max_seq_len: int
    """Tokens per sequence the KV cache holds (``KVCacheConfig.max_seq_len`` resolved)."""
    cos_sin: torch.Tensor
    """[max positions, head_dim] fp32 RoPE rows ``[cos | sin]`` from the model's rotary module."""
    kv_heads: int
    """KV heads on this rank."""
    head_dim: int
    shards: Dict[str, ShardSpec] = field(default_factory=dict)
    storage: Optional[KVStorage] = None
    """The KV cache, allocated by the first forward that uses one (:meth:`cache_storage`)."""
    no_cache: Optional[KVStorage] = None
    """A one-block stand-in the kernels get in calls without a cache (nothing is written to it)."""
    graphs: Optional[object] = None
    """:class:`~tpfuse.parallel.graphs.DecodeGraphs` (CUDA only, with ``KVCacheConfig.cuda_graphs``)."""
    local: bool = False
    """Reductions without collectives: set at TP=1; benchmarks set it at TP > 1 for the no-communication floor
    (the results are then wrong by design)."""
    last_mode: Optional[str] = None
    """``"decode_graph"``, ``"allreduce"`` or ``"sequence_parallel"``: how the latest forward ran."""
    warned_eager_decode: bool = False
    """Whether the one-time warning that decode cannot use CUDA graphs here (one-GPU mode) was given."""
    entry: str = "parallelize"
    """The function the user built the model with, named in error messages."""
    head_range: Optional[Tuple[int, int]] = None
    """The vocabulary rows ``[start, end)`` this rank's lm_head keeps (:mod:`~tpfuse.parallel.vocab_head`);
    ``None``: the head is replicated (whole on every rank)."""
    head_replicated_why: str = ""
    """Why the lm_head is replicated (``''`` when it is vocabulary-parallel)."""
    vocab: int = 0
    """The full vocabulary (the logits' last dimension)."""

    def _storage(self, cfg: KVCacheConfig, max_seq_len: int) -> KVStorage:
        return KVStorage(cfg, layers=len(self.layers), kv_heads=self.kv_heads, head_dim=self.head_dim,
                         max_seq_len=max_seq_len, model_dtype=self.comm.dtype, device=self.comm.device,
                         entry=self.entry)

    def cache_storage(self) -> KVStorage:
        if self.storage is None:
            self.storage = self._storage(self.cache_config, self.max_seq_len)
        return self.storage

    def no_cache_storage(self) -> KVStorage:
        if self.no_cache is None:
            self.no_cache = self._storage(KVCacheConfig(max_batch=1, block_size=16, dtype=self.cache_config.dtype),
                                          16)
        return self.no_cache


def _split(n: int, tp: int, rank: int, what: str, units: Optional[Tuple[str, int]] = None,
           replicate: bool = False) -> Tuple[int, int]:
    """``[start, end)`` of ``rank``'s range of ``n`` features; ``units``: (name, count) that must divide by TP, or,
    with ``replicate`` (kv heads), may be fewer than TP when TP is a multiple of them: then each head is kept by
    ``TP / count`` consecutive ranks, rank ``r`` keeping head ``r * count // TP`` - the one its q heads use (vLLM's
    ``num_kv_head_replicas``)."""
    if units is not None:
        uname, count = units
        if n % count:
            raise TPFuseInputError(f"{what}: {n} features are not a whole number of {count} heads")
        if count % tp and replicate and count < tp and tp % count == 0:
            head, step = rank * count // tp, n // count
            return head * step, (head + 1) * step
        if count % tp:
            raise TPFuseInputError(f"{what}: {uname}={count} is not divisible by TP={tp} (heads cannot be split"
                                   f"{'' if not replicate else ', nor replicated: TP is not a multiple of them'})")
    if n % tp:
        raise TPFuseInputError(f"{what}: {n} features are not divisible by TP={tp}")
    step = n // tp
    return rank * step, (rank + 1) * step


def local_kv_heads(config, tp: int) -> int:
    """KV heads per rank: ``kv / TP``, or 1 when they are replicated (``kv < TP``)."""
    kv = int(config.num_key_value_heads)
    return kv // tp if kv % tp == 0 else 1


def head_dim_of(config) -> int:
    """Features per attention head (``config.head_dim``, else ``hidden_size / num_attention_heads``)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _heads_split(n: int, attr: Optional[str], config, tp: int, rank: int, what: str,
                 column: bool = True) -> Tuple[int, int]:
    """``_split`` of ``n`` features counted by the head-count attribute ``attr`` (``None``: plain features). Only
    column-parallel kv heads may be replicated: a replicated row-parallel shard would be summed twice."""
    units = (attr, int(getattr(config, attr))) if attr is not None else None
    return _split(n, tp, rank, what, units, replicate=column and attr == "num_key_value_heads")


def _column_ranges(mod: nn.Module, name: str, what: str, layout: TPLayout, config, tp: int,
                   rank: int) -> Tuple[Tuple[int, int], ...]:
    """This rank's output-feature ranges of the column-parallel module ``name`` (layer-relative): one range, or one
    per stacked part (``TPLayout.parts``), each part split as if it were a module of its own."""
    parts = layout.parts_of(name)
    if parts is None:
        return (_heads_split(mod.out_features, layout.heads_attr(name), config, tp, rank, what),)
    ranges, off = [], 0
    for attr in parts:
        heads = attr in HEAD_COUNTS
        n = int(getattr(config, attr)) * (head_dim_of(config) if heads else 1)
        s, e = _heads_split(n, attr if heads else None, config, tp, rank, f"{what} (part {attr})")
        ranges.append((off + s, off + e))
        off += n
    if off != mod.out_features:
        raise TPFuseInputError(f"{what}: its parts {tuple(parts)} add up to {off} output features, the module has "
                               f"{mod.out_features}")
    return tuple(ranges)


def _shard_column(mod: nn.Module, name: str, ranges: Tuple[Tuple[int, int], ...],
                  shards: Dict[str, ShardSpec]) -> None:
    """Keep output-feature ``ranges`` of one ``nn.Linear`` / ``FP8Linear``: weight rows, bias, per-channel scale
    (meta tensors: only the shapes change)."""
    w_spec = ShardSpec(0, ranges[0][0], ranges[-1][1], tuple(mod.weight.shape), ranges if len(ranges) > 1 else ())
    scale = getattr(mod, "weight_scale", None)  # FP8Linear: [N, 1] per channel (sliced with the rows) or [1]
    for attr, t in (("weight", mod.weight), ("bias", mod.bias), ("weight_scale", scale)):
        if t is None or (attr == "weight_scale" and t.dim() != 2):
            continue
        spec = replace(w_spec, full_shape=tuple(t.shape))
        shards[f"{name}.{attr}"] = spec
        setattr(mod, attr, nn.Parameter(spec.take(t.detach()), requires_grad=False))
    mod.out_features = sum(e - s for s, e in ranges)


def _shard_row(mod: nn.Module, name: str, start: int, end: int, shards: Dict[str, ShardSpec]) -> None:
    """Keep input features ``[start, end)`` of one ``nn.Linear`` / ``FP8Linear`` (the weight's columns)."""
    shards[f"{name}.weight"] = ShardSpec(1, start, end, tuple(mod.weight.shape))
    mod.weight = nn.Parameter(mod.weight.detach()[:, start:end].contiguous(), requires_grad=False)
    mod.in_features = end - start


def _shard_layer(layer: nn.Module, prefix: str, layout: TPLayout, config, tp: int, rank: int,
                 shards: Dict[str, ShardSpec], matched: set) -> None:
    for name, mod in layer.named_modules():
        is_col, is_row = layout.matches(layout.column, name), layout.matches(layout.row, name)
        if not (is_col or is_row):
            continue
        if is_col and is_row:
            raise TPFuseInputError(f"{prefix}{name} is listed as both column- and row-parallel")
        if not isinstance(mod, (nn.Linear, FP8Linear)):
            raise TPFuseTypeError(f"{prefix}{name}: only nn.Linear / FP8Linear can be sharded, got "
                                  f"{type(mod).__name__}")
        matched.add(name)
        if is_col:
            _shard_column(mod, prefix + name, _column_ranges(mod, name, prefix + name, layout, config, tp, rank),
                          shards)
        else:
            s, e = _heads_split(mod.in_features, layout.heads_attr(name), config, tp, rank, prefix + name,
                                column=False)
            _shard_row(mod, prefix + name, s, e, shards)


def _check_supported(model, config, comm, entry: str) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise TPFuseUnsupportedError(f"hidden_act={act!r}: the tpfuse MLP stage is SiLU·mul only")
    types_ = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None) is not None and not hasattr(config, "use_sliding_window")
    if "sliding_attention" in types_ or getattr(config, "use_sliding_window", False) or window:
        raise TPFuseUnsupportedError("sliding-window attention layers are not supported by the tpfuse decoder "
                                     "layer")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        raise TPFuseUnsupportedError(f"rope_type={rope.get('rope_type', rope.get('type'))!r} depends on the sequence "
                                     f"length; tpfuse evaluates the rotary module once per position")
    partial = rope.get("partial_rotary_factor", None) if isinstance(rope, dict) else None
    partial = partial if partial is not None else getattr(config, "partial_rotary_factor", 1.0)
    if float(partial) != 1.0:  # e.g. Phi-4-mini (a Phi3ForCausalLM): the RoPE kernels rotate whole heads
        raise TPFuseUnsupportedError(f"partial_rotary_factor={partial}: tpfuse applies RoPE to the whole head")
    d = head_dim_of(config)
    if d & (d - 1) or not 16 <= d <= 256:  # e.g. Phi-3-mini's 96: refused here, before anything is sharded
        raise TPFuseUnsupportedError(f"head_dim={d}: tpfuse's RoPE and decode-attention kernels need a power of two in "
                                     f"16..256")
    if comm.hidden_size != config.hidden_size:
        raise TPFuseInputError(f"comm.hidden_size={comm.hidden_size} but the model's hidden_size is "
                               f"{config.hidden_size}")
    fp8 = {id(p) for m in model.modules() if isinstance(m, FP8Linear) for p in (m.weight, m.weight_scale,
                                                                             m.input_scale) if p is not None}
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in fp8}
    if dtypes != {comm.dtype}:
        fix = ("pass dtype=comm.dtype to from_pretrained (its default)" if entry == "from_pretrained"
               else "convert the model (model.to(comm.dtype)) before parallelize")
        raise TPFuseInputError(f"the model's parameters are {sorted(map(str, dtypes))} but comm.dtype is "
                               f"{comm.dtype}: {fix}")


def _check_layout_roles(layout: TPLayout) -> None:
    """The layout's roles must be sharded the way the tpfuse layer computes them."""
    for p in (*layout.qkv, *layout.gate_up):
        if not layout.matches(layout.column, p):
            raise TPFuseInputError(f"layout: {p} must be column-parallel")
    for p in (layout.o_proj, layout.down_proj):
        if not layout.matches(layout.row, p):
            raise TPFuseInputError(f"layout: {p} must be row-parallel")
    for role, n in ((layout.qkv, 3), (layout.gate_up, 2)):
        # one module holding all n projections must be split by its parts, or rank 0 would get only q (gate)
        if len(role) == 1 and len(layout.parts_of(role[0]) or ()) != n:
            raise TPFuseInputError(f"layout: {role[0]} holds {n} projections: list their sizes in TPLayout.parts")
        if len(role) not in (1, n):
            raise TPFuseInputError(f"layout: {tuple(role)} must name {n} modules, or one module with {n} parts")


def _cos_sin_rows(model, layout: TPLayout, n: int, comm) -> torch.Tensor:
    """``[n, head_dim]`` fp32 rows ``[cos(p f) | sin(p f)]`` (attention scaling included) for positions ``0..n-1``,
    from the model's own rotary module, so every RoPE variant it implements (llama3, yarn, linear) is exact."""
    rotary = get_path(model, layout.rotary)
    dummy = torch.empty(0, dtype=torch.float32, device=comm.device)
    pos = torch.arange(n, device=comm.device)[None]
    cos, sin = rotary(dummy, pos)
    half = cos.shape[-1] // 2
    return torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1).float().contiguous()


def _shard_layers(model, layout: TPLayout, config, tp: int, rank: int) -> Dict[str, ShardSpec]:
    layers = get_path(model, layout.layers)
    shards: Dict[str, ShardSpec] = {}
    for li, layer in enumerate(layers):
        matched: set = set()
        _shard_layer(layer, f"{layout.layers}.{li}.", layout, config, tp, rank, shards, matched)
        for pat in (*layout.column, *layout.row):
            if not any(layout.matches([pat], n) for n in matched):
                raise TPFuseInputError(f"layout pattern {pat!r} matches no module of layer {li} "
                                       f"({type(layer).__name__})")
    return shards


def parallelize(model: nn.Module, comm, *, layout: Optional[TPLayout] = None,
                cache: Optional[KVCacheConfig] = None, plan: Optional[TPLayout] = None) -> nn.Module:
    """Shard ``model`` (a transformers model of a shipped family - Llama 2 / 3.x, Mistral, Qwen2 / 2.5, Qwen3,
    Phi-3: :data:`~tpfuse.parallel.FAMILIES`, recognised by :func:`~tpfuse.parallel.layout_for` - or any model
    ``layout`` describes) in place for this rank of ``comm`` and make its forward run through the communicator.

    Returns the same model. Its forward takes Hugging Face arguments - ``input_ids [B, L]`` (or ``[L]``),
    ``attention_mask`` (left or right padding), ``position_ids``, ``cache=`` / ``past_key_values=`` (the
    :class:`~tpfuse.parallel.TPKVCache` a previous call returned), ``use_cache``, ``logits_to_keep`` - and returns
    ``.logits [B, L, vocab]`` (replicated on every rank; zeros at padding positions) and the cache; ``generate()``
    works on it. ``cache`` sizes the static KV cache (default :class:`KVCacheConfig()`). Every rank must make the
    same calls with the same tokens (the communicator's ops are collective). Requirements: ``comm.hidden_size`` and
    ``comm.dtype`` equal the model's, ``comm.max_tokens`` >= the real tokens of the largest call, heads and
    intermediate size divisible by TP (kv heads may instead divide TP: they are then replicated). Do not move or
    convert the model after this call (except by :func:`~tpfuse.parallel.quantize_fp8`).

    A model on the meta device (built under ``torch.device("meta")``, see :func:`~tpfuse.parallel.from_pretrained`)
    is sharded by shape only, then given uninitialised storage of its shard shapes on ``comm.device``: fill it
    with :func:`~tpfuse.parallel.load_sharded_safetensors`. Decoder linears already converted by
    :func:`~tpfuse.parallel.quantize_fp8` are sharded with their scales and run as FP8 GEMMs."""
    return shard_and_wrap(model, comm, resolve_layout(layout, plan, "parallelize"), cache, "parallelize")


def shard_and_wrap(model: nn.Module, comm, layout: Optional[TPLayout], cache: Optional[KVCacheConfig],
                   entry: str) -> nn.Module:
    """:func:`parallelize`'s work; ``entry`` is the public function the user called (named in error messages)."""
    from .forward import tp_forward
    from .hf_generate import tp_hf_generate

    if hasattr(model, "_tpfuse"):
        raise TPFuseInputError(f"{entry}: this model is already parallelized")
    layout = layout if layout is not None else layout_for(model)
    cache = cache if cache is not None else KVCacheConfig()
    if not isinstance(cache, KVCacheConfig):
        raise TPFuseTypeError(f"cache must be a tpfuse.parallel.KVCacheConfig, got {type(cache).__name__}")
    cache.validate()
    config = model.config
    _check_supported(model, config, comm, entry)
    _check_layout_roles(layout)
    tp, rank = comm.tp, comm.rank
    head_dim = head_dim_of(config)
    max_seq_len = cache.max_seq_len or min(int(getattr(config, "max_position_embeddings", 4096)), 4096)

    model.eval()
    model.requires_grad_(False)
    layers = get_path(model, layout.layers)
    kv_local = local_kv_heads(config, tp)
    meta = is_meta(model)
    with torch.no_grad():
        shards = _shard_layers(model, layout, config, tp, rank)
        vocab = get_path(model, layout.lm_head).out_features
        why_rep = vocab_head.why_replicated(model, layout, tp, cache.vocab_parallel_head)
        head_range = None if why_rep else vocab_head.shard_head(model, layout, tp, rank, shards)
        if meta:
            materialize(model, layout.rotary, comm.device)
        else:
            model.to(comm.device)
        for li in range(len(layers)):
            cls = FP8DecoderLayer if isinstance(get_path(layers[li], layout.o_proj), FP8Linear) else TPDecoderLayer
            layers[li] = cls(layers[li], layout, li, num_heads=config.num_attention_heads // tp,
                             num_kv_heads=kv_local, head_dim=head_dim)
        link_quant(layers)
        cos_sin = _cos_sin_rows(model, layout, max(max_seq_len, comm.max_tokens), comm)
    state = TPState(comm=comm, layout=layout, layers=layers, cache_config=cache, max_seq_len=max_seq_len,
                    cos_sin=cos_sin, kv_heads=kv_local, head_dim=head_dim, shards=shards, local=tp == 1,
                    entry=entry, head_range=head_range, head_replicated_why=why_rep or "", vocab=vocab)
    object.__setattr__(model, "_tpfuse", state)
    model.forward = types.MethodType(tp_forward, model)
    if hasattr(model, "generate"):  # transformers' generate(), made rank-consistent (tpfuse.parallel.hf_generate)
        model.generate = types.MethodType(tp_hf_generate, model)
    return model
