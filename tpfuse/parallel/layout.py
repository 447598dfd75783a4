"""Declarative tensor-parallel layouts: which module of a decoder layer is column- or row-parallel, and where the
norms, embedding, rotary embedding and lm_head live.

A layout is data only; :func:`tpfuse.parallel.parallelize` reads it. The Llama and Qwen3 layouts ship as
:data:`LLAMA_LAYOUT` and :data:`QWEN3_LAYOUT`; for another Llama-family architecture (attention with q/k/v/o
projections, optional per-head q/k RMSNorm, gated SiLU MLP, pre-norm residual stream) write a layout with that
model's module names. Module names in ``column`` / ``row`` / ``heads`` are relative to one decoder layer and may
use :mod:`fnmatch` wildcards (``"*.q_proj"``); the other names are attribute paths from the ``*ForCausalLM``
root (``"model.norm"``) or from the layer (``"input_layernorm"``).
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

    qkv: Tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    """The q, k, v projections (each must be in ``column``); fused into one ``[N/TP, H]`` weight per rank so the
    sequence-parallel form needs one ``all_gather_matmul``."""

    o_proj: str = "self_attn.o_proj"
    """Attention output projection (must be in ``row``)."""

    gate_up: Tuple[str, str] = ("mlp.gate_proj", "mlp.up_proj")
    """Gate and up projections of the gated MLP (each in ``column``), fused as ``[gate; up]`` for ``silu_mul``."""

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
        for pat, attr in self.heads.items():
            if fnmatchcase(name, pat):
                return attr
        return None


_ATTN_HEADS = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads",
               "self_attn.v_proj": "num_key_value_heads", "self_attn.o_proj": "num_attention_heads"}

LLAMA_LAYOUT = TPLayout(
    column=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
    row=["self_attn.o_proj", "mlp.down_proj"],
    heads=dict(_ATTN_HEADS),
)
"""Layout of transformers' ``LlamaForCausalLM`` (also fits Mistral-style models without sliding windows)."""

QWEN3_LAYOUT = TPLayout(
    column=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
    row=["self_attn.o_proj", "mlp.down_proj"],
    heads=dict(_ATTN_HEADS),
    qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
)
"""Layout of transformers' ``Qwen3ForCausalLM`` (Llama plus per-head q/k RMSNorm)."""

LAYOUTS = {"LlamaForCausalLM": LLAMA_LAYOUT, "Qwen3ForCausalLM": QWEN3_LAYOUT}
"""Shipped layouts by model class name (looked up by name, so this module never imports transformers)."""


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


def layout_for(model) -> TPLayout:
    """The shipped layout of ``model``'s class, or a :class:`ValueError` naming the classes that have one."""
    name = type(model).__name__
    if name not in LAYOUTS:
        raise TPFuseInputError(f"no shipped TP layout for {name}; pass parallelize(model, comm, layout=TPLayout(...)) "
                               f"(shipped: {sorted(LAYOUTS)})")
    return LAYOUTS[name]
