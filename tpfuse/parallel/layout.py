"""Declarative tensor-parallel layouts: which module of a decoder layer is column- or row-parallel (and, for a
module that stacks several projections, where its parts are), and where the norms, embedding, rotary embedding and
lm_head live.

A layout is data only; :func:`tpfuse.parallel.parallelize` and :func:`tpfuse.parallel.from_pretrained` read it
(the per-rank checkpoint reads follow the :class:`~tpfuse.parallel.ShardSpec` it produces). Shipped families
(:data:`FAMILIES`), recognised by :func:`layout_for` from the model's class (or, for a ``*ForCausalLM`` class of
another name, its ``config.model_type``):

* Llama 2 / 3.x (``LlamaForCausalLM``; 3.2's tied embeddings, llama3 RoPE scaling) - :data:`LLAMA_LAYOUT`;
* Mistral (``MistralForCausalLM``, full attention: ``sliding_window=None``) - the Llama module names;
* Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``; q/k/v biases are column-sharded with their rows) - the Llama names;
* Qwen3 (``Qwen3ForCausalLM``; per-head q/k RMSNorm) - :data:`QWEN3_LAYOUT`;
* Phi-3 (``Phi3ForCausalLM``; fused ``qkv_proj`` and ``gate_up_proj``, sharded by their parts) - :data:`PHI3_LAYOUT`.

Anything else raises :class:`~tpfuse.errors.TPFuseInputError` naming these; for another Llama-family architecture
(attention with q/k/v/o projections, separate or fused, optional per-head q/k RMSNorm, gated SiLU MLP, pre-norm
residual stream) pass ``layout=TPLayout(...)`` with that model's module names. Module names in ``column`` /
``row`` / ``heads`` / ``parts`` are relative to one decoder layer and may use :mod:`fnmatch` wildcards
(``"*.q_proj"``); the other names are attribute paths from the ``*ForCausalLM`` root (``"model.norm"``) or from
the layer (``"input_layernorm"``). Whether a recognised model's *config* is supported (activation, sliding
windows, RoPE type, head_dim) is checked by ``parallelize``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Mapping, Optional, Sequence, Tuple

from ..errors import TPFuseInputError, TPFuseTypeError


@dataclass(kw_only=True)
class TPLayout:
    """How to shard and run one architecture under tensor parallelism (see the module docstring)."""

    layers: str = "model.layers"
    """Attribute path (from the model root) of the ``nn.ModuleList`` of decoder layers."""

    column: Sequence[str] = ()
    """Column-parallel ``nn.Linear`` modules (per layer): output features (weight rows, and bias) are split into TP
    contiguous ranges; rank ``r`` keeps range ``r``. Every split must fall on a head boundary (see ``heads``)."""

    row: Sequence[str] = ()
    """Row-parallel ``nn.Linear`` modules (per layer): input features (weight columns) are split into TP ranges;
    their outputs are partial sums that the communicator reduces. A bias is kept on rank 0 only (zero elsewhere),
    so the reduced sum adds it once."""

    heads: Mapping[str, str] = field(default_factory=dict)
    """Module pattern -> config attribute holding its head count (``"num_key_value_heads"``). The head count must
    be divisible by TP (an error otherwise, e.g. GQA with 2 kv heads at TP=4); modules not listed here need only
    their split dimension divisible by TP."""

    parts: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    """Column-parallel modules that stack several projections along their output features (Phi-3's ``qkv_proj`` =
    ``[q; k; v]``, ``gate_up_proj`` = ``[gate; up]``) -> the config attribute giving each part's size, in order.
    A head-count attribute (:data:`HEAD_COUNTS`) means that many heads of ``head_dim`` features, any other
    (``"intermediate_size"``) that many features. Each part is split like a module of its own (heads divisible
    by TP, or kv heads replicated), and rank ``r`` keeps ``[part 0's range r; part 1's range r; ...]`` - not one
    contiguous range of the stacked matrix, which would give rank 0 only q heads."""

    qkv: Sequence[str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    """The q, k, v projections (each must be in ``column``), or one module holding all three as ``parts``; fused
    into one ``[N/TP, H]`` weight per rank (this rank's q heads, then its k, then its v heads) so the
    sequence-parallel form needs one ``all_gather_matmul``."""

    o_proj: str = "self_attn.o_proj"
    """Attention output projection (must be in ``row``)."""

    gate_up: Sequence[str] = ("mlp.gate_proj", "mlp.up_proj")
    """Gate and up projections of the gated MLP (each in ``column``), or one module holding both as ``parts``;
    fused per rank as ``[gate; up]`` for ``silu_mul``."""

    down_proj: str = "mlp.down_proj"
    """MLP output projection (must be in ``row``)."""

    qk_norm: Optional[Tuple[str, str]] = None
    """Per-head RMSNorm modules applied to q and k before RoPE (Qwen3: ``("self_attn.q_norm",
    "self_attn.k_norm")``); replicated (their weight is ``[head_dim]``). ``None``: no QK-norm (Llama)."""

    input_norm: str = "input_layernorm"
    """Pre-attention RMSNorm of a layer (replicated)."""

    post_attention_norm: str = "post_attention_layernorm"
    """Pre-MLP RMSNorm of a layer (replicated)."""

    final_norm: str = "model.norm"
    """Final RMSNorm before lm_head (replicated)."""

    embed: str = "model.embed_tokens"
    """Token embedding (replicated: every rank looks up its own tokens, no collective)."""

    rotary: str = "model.rotary_emb"
    """The model's rotary-embedding module, called as ``rotary(x, position_ids) -> (cos, sin)``; reusing it keeps
    every RoPE variant the model supports (llama3 scaling, attention factor) exact."""

    lm_head: str = "lm_head"
    """Output projection to the vocabulary (replicated; see :func:`tpfuse.parallel.parallelize` for why)."""

    def matches(self, patterns: Sequence[str], name: str) -> bool:
        """Whether a layer-relative module ``name`` matches one of ``patterns``."""
        return any(fnmatchcase(name, p) for p in patterns)

    def heads_attr(self, name: str) -> Optional[str]:
        """The config attribute giving ``name``'s head count, or ``None``."""
        return _lookup(self.heads, name)

    def parts_of(self, name: str) -> Optional[Tuple[str, ...]]:
        """The config attributes of the stacked parts of module ``name`` (see ``parts``), or ``None``."""
        return _lookup(self.parts, name)


def _lookup(table: Mapping, name: str):
    """The value of the first pattern of ``table`` that matches ``name``, or ``None``."""
    for pat, value in table.items():
        if fnmatchcase(name, pat):
            return value
    return None


HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads")
"""Config attributes that count attention heads (a part or split of that many ``head_dim``-wide units)."""


_ATTN_HEADS = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads",
               "self_attn.v_proj": "num_key_value_heads", "self_attn.o_proj": "num_attention_heads"}

LLAMA_LAYOUT = TPLayout(
    column=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
    row=["self_attn.o_proj", "mlp.down_proj"],
    heads=dict(_ATTN_HEADS),
)
"""Layout of transformers' ``LlamaForCausalLM``; also Mistral's and Qwen2's, whose modules have the same names
(Qwen2's q/k/v biases are split with their weight rows: nothing in the layout names them)."""

QWEN3_LAYOUT = TPLayout(
    column=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
    row=["self_attn.o_proj", "mlp.down_proj"],
    heads=dict(_ATTN_HEADS),
    qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
)
"""Layout of transformers' ``Qwen3ForCausalLM`` (Llama plus per-head q/k RMSNorm)."""

PHI3_LAYOUT = TPLayout(
    column=["self_attn.qkv_proj", "mlp.gate_up_proj"],
    row=["self_attn.o_proj", "mlp.down_proj"],
    heads={"self_attn.o_proj": "num_attention_heads"},
    parts={"self_attn.qkv_proj": ("num_attention_heads", "num_key_value_heads", "num_key_value_heads"),
           "mlp.gate_up_proj": ("intermediate_size", "intermediate_size")},
    qkv=("self_attn.qkv_proj",),
    gate_up=("mlp.gate_up_proj",),
)
"""Layout of transformers' ``Phi3ForCausalLM``: Llama's data flow with q/k/v and gate/up stored fused."""


@dataclass(frozen=True)
class Family:
    """One shipped model family: how :func:`layout_for` recognises it and the layout it gets."""

    name: str
    """What users call it (error messages, docs)."""
    cls: str
    """transformers' ``*ForCausalLM`` class name."""
    model_type: str
    """``config.model_type`` of its checkpoints."""
    layout: TPLayout


FAMILIES = (
    Family("Llama 2 / 3.x", "LlamaForCausalLM", "llama", LLAMA_LAYOUT),
    Family("Mistral (full attention)", "MistralForCausalLM", "mistral", LLAMA_LAYOUT),
    Family("Qwen2 / Qwen2.5", "Qwen2ForCausalLM", "qwen2", LLAMA_LAYOUT),
    Family("Qwen3", "Qwen3ForCausalLM", "qwen3", QWEN3_LAYOUT),
    Family("Phi-3", "Phi3ForCausalLM", "phi3", PHI3_LAYOUT),
)
"""The shipped families (recognised by name, so this module never imports transformers)."""

LAYOUTS = {f.cls: f.layout for f in FAMILIES}
"""Shipped layouts by model class name."""


RENAMED = {"TPPlan": "TPLayout", "LLAMA_PLAN": "LLAMA_LAYOUT", "QWEN3_PLAN": "QWEN3_LAYOUT", "PLANS": "LAYOUTS",
           "plan_for": "layout_for"}
"""Former names (a "plan" is the communicator's dispatch decision; these describe a model's module layout)."""


def renamed_attr(module: str, name: str):
    """A module ``__getattr__`` body: the renamed object under its former ``name``, with a DeprecationWarning."""
    if name not in RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} is deprecated: use {RENAMED[name]}", DeprecationWarning, stacklevel=3)
    return globals()[RENAMED[name]]


def resolve_layout(layout: Optional[TPLayout], plan: Optional[TPLayout], fn: str) -> Optional[TPLayout]:
    """``layout``, or the deprecated ``plan=`` keyword of ``fn`` (with a DeprecationWarning)."""
    if plan is None:
        return layout
    if layout is not None:
        raise TPFuseTypeError(f"{fn}: pass layout= only (plan= is its deprecated former name)")
    warnings.warn(f"{fn}(plan=...) is deprecated: use layout=", DeprecationWarning, stacklevel=3)
    return plan


def _family_of(model) -> Optional[Family]:
    """The family of ``model``'s class or of one of its base classes; else, for a ``*ForCausalLM`` class (remote
    code, a wrapper), the family of its ``config.model_type``."""
    by_cls = {f.cls: f for f in FAMILIES}
    for klass in type(model).__mro__:
        if klass.__name__ in by_cls:
            return by_cls[klass.__name__]
    if type(model).__name__.endswith("ForCausalLM"):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return next((f for f in FAMILIES if f.model_type == model_type), None)
    return None


def layout_for(model) -> TPLayout:
    """The shipped layout of ``model``'s family (see the module docstring), or a
    :class:`~tpfuse.errors.TPFuseInputError` (a ``ValueError``) naming the supported families."""
    family = _family_of(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        supported = ", ".join(f"{f.name} ({f.cls})" for f in FAMILIES)
        raise TPFuseInputError(
            f"no shipped TP layout for {type(model).__name__} (model_type={model_type!r}); supported families: "
            f"{supported}. For another Llama-family decoder pass its module names: parallelize(model, comm, "
            f"layout=TPLayout(column=[...], row=[...], heads={{...}})) or from_pretrained(path, comm, "
            f"layout=TPLayout(...)) (see tpfuse.parallel.layout)")
    return family.layout
