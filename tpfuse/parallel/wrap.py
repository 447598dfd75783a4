"""``parallelize(model, comm)``: shard a Hugging Face causal LM in place and run it through the communicator.

What it does to the model (per rank, in place):

1. **Shards** every module the plan names: column-parallel ``nn.Linear`` keep output-feature range ``rank`` of TP
   (q/k/v split by heads, GQA kv heads too; gate/up by intermediate features), row-parallel ones keep input-
   feature range ``rank`` (o_proj, down_proj; a row bias stays on rank 0 only). Embedding, norms, rotary
   embedding and lm_head stay replicated. ``model._tpfuse.shards`` records each sharded parameter's slice (what
   :func:`tpfuse.parallel.load_sharded_safetensors` reads).
2. **Moves** the model to ``comm.device`` (after sharding, so a rank never holds more than the full CPU copy it
   was given plus its shard on the device).
3. **Replaces** each decoder layer with a :class:`~tpfuse.parallel.layers.TPDecoderLayer` (same submodules and
   ``state_dict`` names) and the model's ``forward`` with the tpfuse forward below.

The lm_head is replicated rather than column-parallel: the communicator's gathers work on ``[T, hidden]``
activations, and a vocabulary-parallel head would need a separate gather over the vocabulary (and an extra
collective per step); with the head replicated, every rank computes the full logits locally from the replicated
final hidden states, which the last fused all-reduce + final norm already produced.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .. import ops
from ..sharding import shard_range
from .layers import StepContext, TPDecoderLayer, TPKVCache, get_path, norm_eps
from .plan import TPPlan, plan_for


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
    rank0_only: bool = False
    """A row-parallel bias: the full tensor on rank 0, zeros on the other ranks."""


@dataclass
class TPState:
    """What :func:`parallelize` attaches to the model as ``model._tpfuse``."""

    comm: object
    plan: TPPlan
    layers: nn.ModuleList
    shards: Dict[str, ShardSpec] = field(default_factory=dict)
    last_mode: Optional[str] = None
    """``plan(T).mode`` of the latest forward (``"allreduce"`` / ``"sequence_parallel"``)."""


def _split(n: int, tp: int, rank: int, what: str, units: Optional[Tuple[str, int]] = None) -> Tuple[int, int]:
    """``[start, end)`` of ``rank``'s range of ``n`` features; ``units``: (name, count) that must divide by TP."""
    if units is not None:
        uname, count = units
        if count % tp:
            raise ValueError(f"{what}: {uname}={count} is not divisible by TP={tp} (heads cannot be split)")
        if n % count:
            raise ValueError(f"{what}: {n} features are not a whole number of {count} heads")
    if n % tp:
        raise ValueError(f"{what}: {n} features are not divisible by TP={tp}")
    step = n // tp
    return rank * step, (rank + 1) * step


def _shard_layer(layer: nn.Module, prefix: str, plan: TPPlan, config, tp: int, rank: int,
                 shards: Dict[str, ShardSpec], matched: set) -> None:
    for name, mod in layer.named_modules():
        is_col, is_row = plan.matches(plan.column, name), plan.matches(plan.row, name)
        if not (is_col or is_row):
            continue
        if is_col and is_row:
            raise ValueError(f"{prefix}{name} is listed as both column- and row-parallel")
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{prefix}{name}: only nn.Linear can be sharded, got {type(mod).__name__}")
        matched.add(name)
        attr = plan.heads_attr(name)
        units = (attr, int(getattr(config, attr))) if attr is not None else None
        full_w = tuple(mod.weight.shape)
        if is_col:
            s, e = _split(mod.out_features, tp, rank, prefix + name, units)
            mod.weight = nn.Parameter(mod.weight.detach()[s:e].clone(), requires_grad=False)
            shards[f"{prefix}{name}.weight"] = ShardSpec(0, s, e, full_w)
            if mod.bias is not None:
                shards[f"{prefix}{name}.bias"] = ShardSpec(0, s, e, tuple(mod.bias.shape))
                mod.bias = nn.Parameter(mod.bias.detach()[s:e].clone(), requires_grad=False)
            mod.out_features = e - s
        else:
            s, e = _split(mod.in_features, tp, rank, prefix + name, units)
            mod.weight = nn.Parameter(mod.weight.detach()[:, s:e].contiguous(), requires_grad=False)
            shards[f"{prefix}{name}.weight"] = ShardSpec(1, s, e, full_w)
            if mod.bias is not None:
                shards[f"{prefix}{name}.bias"] = ShardSpec(0, 0, mod.out_features, tuple(mod.bias.shape),
                                                           rank0_only=True)
                if rank != 0:
                    mod.bias.data.zero_()
            mod.in_features = e - s


def _check_supported(model, config, comm) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"hidden_act={act!r}: the tpfuse MLP stage is SiLU·mul only")
    types_ = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None) is not None and not hasattr(config, "use_sliding_window")
    if "sliding_attention" in types_ or getattr(config, "use_sliding_window", False) or window:
        raise NotImplementedError("sliding-window attention layers are not supported by the tpfuse decoder layer")
    if comm.hidden_size != config.hidden_size:
        raise ValueError(f"comm.hidden_size={comm.hidden_size} but the model's hidden_size is {config.hidden_size}")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {comm.dtype}:
        raise ValueError(f"the model's parameters are {sorted(map(str, dtypes))} but comm.dtype is {comm.dtype}: "
                         f"convert the model (model.to(dtype)) before parallelize")
    if any(p.is_meta for p in model.parameters()):
        raise NotImplementedError("meta-device models are not supported: build the model with real (random) "
                                  "weights, parallelize, then load_sharded_safetensors")


def parallelize(model: nn.Module, comm, *, plan: Optional[TPPlan] = None) -> nn.Module:
    """Shard ``model`` (a transformers ``LlamaForCausalLM`` / ``Qwen3ForCausalLM``, or any model ``plan``
    describes) in place for this rank of ``comm`` and make its forward run through the communicator.

    Returns the same model. Its forward takes ``input_ids`` of one sequence (``[T]`` or ``[1, T]``) and returns
    an object with ``.logits`` (``[1, T, vocab]`` / ``[T, vocab]``, replicated on every rank) and
    ``.past_key_values`` (a :class:`~tpfuse.parallel.TPKVCache` to pass back for the next step). Every rank must
    call it with the same tokens (the communicator's ops are collective). Requirements: ``comm.hidden_size`` and
    ``comm.dtype`` equal the model's, ``comm.max_tokens`` >= the longest step, heads and intermediate size
    divisible by TP. Do not move or convert the model after this call (shard specs and the communicator are
    bound to ``comm.device`` / ``comm.dtype``)."""
    if hasattr(model, "_tpfuse"):
        raise ValueError("this model is already parallelized")
    plan = plan if plan is not None else plan_for(model)
    config = model.config
    _check_supported(model, config, comm)
    tp, rank = comm.tp, comm.rank
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    # the plan's roles must be sharded the way the tpfuse layer computes them
    for p in (*plan.qkv, *plan.gate_up):
        if not plan.matches(plan.column, p):
            raise ValueError(f"plan: {p} must be column-parallel")
    for p in (plan.o_proj, plan.down_proj):
        if not plan.matches(plan.row, p):
            raise ValueError(f"plan: {p} must be row-parallel")

    model.eval()
    model.requires_grad_(False)
    layers = get_path(model, plan.layers)
    shards: Dict[str, ShardSpec] = {}
    with torch.no_grad():
        for li, layer in enumerate(layers):
            matched: set = set()
            _shard_layer(layer, f"{plan.layers}.{li}.", plan, config, tp, rank, shards, matched)
            for pat in (*plan.column, *plan.row):
                if not any(plan.matches([pat], n) for n in matched):
                    raise ValueError(f"plan pattern {pat!r} matches no module of layer {li} ({type(layer).__name__})")
        model.to(comm.device)
        for li in range(len(layers)):
            layers[li] = TPDecoderLayer(layers[li], plan, li, num_heads=config.num_attention_heads // tp,
                                        num_kv_heads=config.num_key_value_heads // tp, head_dim=head_dim)
    object.__setattr__(model, "_tpfuse", TPState(comm=comm, plan=plan, layers=layers, shards=shards))
    model.forward = types.MethodType(_tp_forward, model)
    return model


def _output(logits, cache):
    try:
        from transformers.modeling_outputs import CausalLMOutputWithPast
    except ImportError:  # the model came from elsewhere: same attribute names
        return types.SimpleNamespace(logits=logits, past_key_values=cache)
    return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


def _tp_forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[TPKVCache] = None,
                inputs_embeds=None, use_cache: Optional[bool] = None, logits_to_keep: int = 0, **kwargs):
    """The parallelized model's forward (one sequence; see :func:`parallelize`)."""
    st: TPState = self._tpfuse
    comm, plan = st.comm, st.plan
    for k, v in kwargs.items():
        if v is not None and v is not False and k not in ("return_dict", "cache_position"):
            raise NotImplementedError(f"parallelized forward does not support {k}={v!r}")
    if inputs_embeds is not None:
        raise NotImplementedError("parallelized forward takes input_ids, not inputs_embeds")
    if input_ids is None:
        raise ValueError("input_ids is required")
    batched = input_ids.dim() == 2
    if batched and input_ids.shape[0] != 1:
        raise NotImplementedError(f"parallelized forward runs one sequence (batch 1), got input_ids of shape "
                                  f"{tuple(input_ids.shape)}; flatten sequences into separate calls")
    ids = input_ids.reshape(-1).to(comm.device)
    t = ids.shape[0]
    if t == 0:
        raise ValueError("input_ids is empty")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise NotImplementedError("padding (attention_mask with zeros) is not supported: pass unpadded tokens")
    if use_cache is None:
        use_cache = past_key_values is not None or bool(getattr(self.config, "use_cache", True))
    if past_key_values is not None and not isinstance(past_key_values, TPKVCache):
        raise TypeError(f"past_key_values must be the TPKVCache a previous call returned, got "
                        f"{type(past_key_values).__name__}")
    cache = past_key_values if past_key_values is not None else (TPKVCache() if use_cache else None)
    past = cache.get_seq_length() if cache is not None else 0
    if position_ids is None:
        positions = torch.arange(past, past + t, device=comm.device)
    else:
        positions = position_ids.reshape(-1).to(comm.device)

    with torch.no_grad():
        layers = st.layers
        dummy = torch.empty(0, dtype=comm.dtype, device=comm.device)  # the rotary module reads dtype/device only
        cos, sin = get_path(self, plan.rotary)(dummy, positions[None])
        cos, sin = cos.reshape(t, -1), sin.reshape(t, -1)
        mask = None
        if past > 0 and t > 1:  # a chunk after cached tokens: query i sees keys 0 .. past + i
            kpos = torch.arange(past + t, device=comm.device)
            mask = kpos[None, :] <= (past + torch.arange(t, device=comm.device))[:, None]
        sp = comm.plan(t).mode == "sequence_parallel"
        st.last_mode = "sequence_parallel" if sp else "allreduce"
        ctx = StepContext(comm=comm, num_tokens=t, sp=sp, cos=cos, sin=sin, cache=cache, mask=mask)

        mine = ids
        if sp:
            s, e = shard_range(t, comm.tp, comm.rank)
            mine = ids[s:e]
        h = get_path(self, plan.embed)(mine)
        first = layers[0].input_norm
        x, residual = ops.add_rmsnorm(h, None, first.weight, norm_eps(first))  # local: embedding is replicated
        final = get_path(self, plan.final_norm)
        for li, layer in enumerate(layers):
            nxt = layers[li + 1].input_norm if li + 1 < len(layers) else final
            x, residual = layer(x, residual, nxt.weight, norm_eps(nxt), ctx)
        if sp:
            x = comm.all_gather(x, num_tokens=t)
        if logits_to_keep:
            x = x[-logits_to_keep:]
        logits = get_path(self, plan.lm_head)(x)
    return _output(logits.unsqueeze(0) if batched else logits, cache if use_cache else None)
