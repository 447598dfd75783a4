"""The models of ``bench/bench_e2e.py`` (and ``bench/profile_decode.py``): real layer shapes, their real layer count
and vocabulary, the per-rank shard shapes, byte counts, and the random-weight build.

* **Names**: a :data:`SHAPES` key (``8B`` = Llama-3.1-8B, ``70B`` = Llama-3.1-70B, ``Qwen3-32B``, ``Qwen2.5-7B``,
  ``Phi-3-medium``), or ``<key>/tp<N>`` (``70B/tp8``): the **rank-0 shard** of that model at TP=N built as a TP=1
  model (:func:`shard_config`), so a one-GPU TP=1 run times what one rank of a TP=N deployment computes - its
  GEMMs, attention and local fused norms - without the communication.
* **Layers** (:func:`resolve_layers`): an int, ``full`` (the model's real count, :data:`REAL`), or ``fit`` (as many
  as fit in free GPU memory with the KV cache and the activations, :func:`fit_layers`).
* **Vocabulary** (:func:`resolve_vocab`): ``real`` (the checkpoint's, :data:`REAL`) or an int; the default is
  the real one with ``--layers full`` / ``fit`` and :data:`VOCAB` (32000, the earlier runs') with an int layer
  count. tpfuse replicates the embedding and splits the (untied) lm_head by vocabulary rows at TP > 1
  (``tpfuse/parallel/vocab_head.py``), so a shard's embedding has the whole vocabulary and its lm_head rank 0's
  ``ceil(vocab / N)`` rows (:func:`head_rows`); ``head="replicated"`` builds the whole head instead (the shard of
  ``KVCacheConfig.vocab_parallel_head=False``, the rows before that default). The logits' gather, like the
  layers' all-reduces, is not in a shard's step.

Everything here but :func:`build_model` is pure (CPU tests: ``tests/test_bench_e2e_shapes.py``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Tuple

SHAPES = {
    "8B": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=14336, rope_theta=500000.0)),
    "70B": ("llama", dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                          intermediate_size=28672, rope_theta=500000.0)),
    "Qwen3-32B": ("qwen3", dict(hidden_size=5120, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                                intermediate_size=25600, rope_theta=1000000.0)),
    # families whose layers differ from a row above (Mistral-7B is the 8B row's shape): biased q/k/v, 28 q heads;
    # fused qkv_proj / gate_up_proj, 40 q / 10 kv heads (TP 2; Phi-3's config derives head_dim = 128, and its
    # token ids default past VOCAB). Phi-3-mini's head_dim 96 is not supported by the kernels.
    "Qwen2.5-7B": ("qwen2", dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                 intermediate_size=18944, rope_theta=1000000.0)),
    "Phi-3-medium": ("phi3", dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=10,
                                  intermediate_size=17920, rope_theta=10000.0, pad_token_id=0, eos_token_id=2)),
}
ARCHS = {"llama": "Llama", "qwen3": "Qwen3", "qwen2": "Qwen2", "phi3": "Phi3"}
"""SHAPES' architectures -> the transformers ``<prefix>ForCausalLM`` / ``<prefix>Config`` they build."""
VOCAB = 32000
"""The vocabulary of the runs with an int ``--layers`` (the earlier results); random token ids are drawn below it
(valid in every real vocabulary too)."""
REAL = {"8B": (32, 128256), "70B": (80, 128256), "Qwen3-32B": (64, 151936), "Qwen2.5-7B": (28, 152064),
        "Phi-3-medium": (40, 32064)}
"""Checkpoint layer count and vocabulary size (config.json of Llama-3.1-8B / -70B, Qwen3-32B, Qwen2.5-7B,
Phi-3-medium-4k); none of them ties its embeddings."""
BIASED_QKV = ("qwen2",)
"""Architectures whose q/k/v projections carry a bias."""


def parse_name(name: str) -> Tuple[str, Optional[int]]:
    """``"70B/tp8"`` -> ``("70B", 8)``, ``"8B"`` -> ``("8B", None)``; a ValueError for an unknown model."""
    m = re.fullmatch(r"(.+)/tp(\d+)", name)
    base, tp = (m.group(1), int(m.group(2))) if m else (name, None)
    if base not in SHAPES:
        raise ValueError(f"unknown model {name!r}: one of {sorted(SHAPES)}, optionally /tp<N> (a rank's shard)")
    if tp is not None and tp < 1:
        raise ValueError(f"{name}: TP must be >= 1")
    return base, tp


def head_dim(shape: dict) -> int:
    return shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]


def shard_config(shape: dict, tp: int) -> dict:
    """The config fields of the model holding exactly rank 0's shard of ``shape`` at TP=``tp``, as
    ``tpfuse.parallelize`` leaves it (``tpfuse/parallel/wrap.py``): q heads / TP; kv heads / TP, or one kv head
    when they are fewer than TP and TP is a multiple of them (replicated: ``local_kv_heads``); intermediate / TP
    (gate, up, down); hidden size, norms and embedding whole (replicated; the lm_head's vocabulary-parallel rows are
    :func:`build_model`'s, :func:`head_rows`). ``head_dim`` is set explicitly
    (``hidden / heads`` no longer gives it). A ValueError where ``parallelize`` would refuse the split."""
    from tpfuse.parallel.wrap import local_kv_heads

    q, kv, inter = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
    if q % tp:
        raise ValueError(f"num_attention_heads={q} is not divisible by TP={tp}")
    if kv % tp and not (kv < tp and tp % kv == 0):
        raise ValueError(f"num_key_value_heads={kv}: neither divisible by TP={tp} nor replicated (TP not a multiple)")
    if inter % tp:
        raise ValueError(f"intermediate_size={inter} is not divisible by TP={tp}")
    return dict(shape, num_attention_heads=q // tp, head_dim=head_dim(shape), intermediate_size=inter // tp,
                num_key_value_heads=local_kv_heads(SimpleNamespace(num_key_value_heads=kv), tp))


def shard_shape(name: str, tp: int) -> Tuple[str, dict]:
    """``(architecture, config fields)`` of rank 0's shard of the :data:`SHAPES` model ``name`` at TP=``tp``."""
    arch, shape = SHAPES[name]
    return arch, shard_config(shape, tp)


def model_shape(name: str) -> Tuple[str, dict]:
    """``(architecture, config fields)`` of a model name (a shard name gives its shard's shape)."""
    base, tp = parse_name(name)
    return shard_shape(base, tp) if tp is not None else SHAPES[base]


def layer_params(arch: str, shape: dict) -> int:
    """Parameters of one decoder layer (q/k/v/o, gate/up/down, the two norms; Qwen3's q/k norms; Qwen2's q/k/v
    biases)."""
    h, d, inter = shape["hidden_size"], head_dim(shape), shape["intermediate_size"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    n = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    n += (q + 2 * kv) if arch in BIASED_QKV else 0
    n += 2 * d if arch == "qwen3" else 0
    return n


def fixed_params(shape: dict, vocab: int, head: Optional[int] = None) -> int:
    """Parameters outside the decoder layers: embedding + lm_head (untied; ``head`` rows, default ``vocab``) +
    final norm."""
    return (vocab + (vocab if head is None else head)) * shape["hidden_size"] + shape["hidden_size"]


def head_rows(name: str, vocab: int, head: str = "vocab") -> int:
    """The lm_head rows of ``name``'s model: the whole ``vocab``, or for a shard with ``head="vocab"`` rank 0's
    vocabulary-parallel rows (``tpfuse.parallel.vocab_head.vocab_range``: ``ceil(vocab / N)``)."""
    if head not in ("vocab", "replicated"):
        raise ValueError(f"head={head!r}: 'vocab' (vocabulary-parallel) or 'replicated'")
    from tpfuse.parallel.vocab_head import vocab_range

    tp = parse_name(name)[1]
    if tp is None or head == "replicated":
        return vocab
    start, end = vocab_range(vocab, tp, 0)
    return end - start


def kv_bytes_per_layer(shape: dict, max_batch: int, max_seq_len: int, block_size: int = 256,
                       elem: int = 2) -> int:
    """One layer's K + V storage as ``KVStorage`` allocates it: ``max_batch`` rows of whole blocks plus the
    scratch block."""
    blocks = max_batch * -(-max_seq_len // block_size) + 1
    return 2 * blocks * block_size * shape["num_key_value_heads"] * head_dim(shape) * elem


def activation_bytes(shape: dict, tokens: int, elem: int = 2) -> int:
    """A generous peak of one eager forward of ``tokens`` tokens (the decode rows' prefill of batch x context,
    HF's or tpfuse's): the gate/up/SiLU intermediates, q/k/v twice, and eight hidden-size buffers."""
    d = head_dim(shape)
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * d
    return tokens * elem * (4 * shape["intermediate_size"] + 2 * qkv + 8 * shape["hidden_size"])


def fit_layers(arch: str, shape: dict, *, vocab: int, free_bytes: int, max_batch: int, max_seq_len: int,
               tokens: int, headroom_bytes: int, cap: int, head: Optional[int] = None) -> Tuple[int, dict]:
    """``(layers, budget)``: the most decoder layers (at most ``cap``, the real count) whose bf16 weights and KV
    cache fit in ``free_bytes`` next to the fixed weights, the activations of a ``tokens``-token forward and
    ``headroom_bytes``; ``budget`` holds the terms (bytes) for the printout. 0 when not even one fits. ``head``: the
    lm_head's rows on this rank (default ``vocab``: :func:`head_rows`)."""
    per_layer = 2 * layer_params(arch, shape) + kv_bytes_per_layer(shape, max_batch, max_seq_len)
    fixed = 2 * fixed_params(shape, vocab, head)
    act = activation_bytes(shape, tokens)
    n = (free_bytes - fixed - act - headroom_bytes) // per_layer
    budget = dict(free=free_bytes, per_layer=per_layer, fixed=fixed, activations=act, headroom=headroom_bytes)
    return int(max(0, min(cap, n))), budget


def describe_budget(layers: int, budget: dict) -> str:
    gib = (lambda b: f"{b / 2 ** 30:.2f} GiB")
    return (f"{layers} layers fit: free {gib(budget['free'])} - fixed weights {gib(budget['fixed'])} - activations "
            f"{gib(budget['activations'])} - headroom {gib(budget['headroom'])}, {gib(budget['per_layer'])} per layer "
            f"(weights + KV cache)")


def resolve_layers(layers, name: str) -> Optional[int]:
    """``--layers`` for model ``name``: an int, ``full`` -> the real count, ``fit`` -> ``None`` (computed on the
    device by :func:`fit_layers`)."""
    if str(layers) == "fit":
        return None
    if str(layers) == "full":
        return REAL[parse_name(name)[0]][0]
    return int(layers)


def resolve_vocab(vocab, layers, name: str) -> int:
    """``--vocab`` for model ``name``: an int; ``real``; ``None`` -> real with ``--layers full`` / ``fit``, else
    :data:`VOCAB`."""
    if vocab is None:
        vocab = "real" if str(layers) in ("full", "fit") else VOCAB
    return REAL[parse_name(name)[0]][1] if str(vocab) == "real" else int(vocab)


def parse_capacities(text: str) -> list:
    """``"8x1152,8x32768"`` -> ``[(8, 1152), (8, 32768)]`` (max_batch x max_seq_len)."""
    out = []
    for item in (s for s in text.split(",") if s):
        b, _, n = item.partition("x")
        if not (b.isdigit() and n.isdigit() and int(b) > 0 and int(n) > 0):
            raise ValueError(f"capacity {item!r}: want MAX_BATCHxMAX_SEQ_LEN, e.g. 8x32768")
        out.append((int(b), int(n)))
    return out


@dataclass(frozen=True)
class Spec:
    """One model of a run, resolved: what the rows say about it."""

    name: str
    """As given on the command line (``8B``, ``70B/tp8``)."""
    layers: int
    vocab: int

    @property
    def base(self) -> str:
        return parse_name(self.name)[0]

    @property
    def tp_shard(self) -> Optional[int]:
        return parse_name(self.name)[1]

    @property
    def label(self) -> str:
        """The rows' ``model``: the name, ``"<name> shard"`` for a shard."""
        return self.name + (" shard" if self.tp_shard is not None else "")

    def fields(self) -> dict:
        """Row fields naming the model: model, layers, vocab (+ shard_of, tp_shard for a shard)."""
        out = dict(model=self.label, layers=self.layers, vocab=self.vocab)
        if self.tp_shard is not None:
            out.update(shard_of=self.base, tp_shard=self.tp_shard)
        return out


def hf_config(arch: str, shape: dict, layers: int, vocab: int):
    """The transformers config of ``shape`` (untied embeddings, 32k positions, eps 1e-5)."""
    import transformers

    cfg_cls = getattr(transformers, f"{ARCHS[arch]}Config")
    return cfg_cls(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=32768, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, **shape)


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(name: str, layers: int, dev, vocab: int = VOCAB, head: str = "vocab"):
    """A random-weight transformers model of ``name``'s layer shapes (a shard name: its shard's, with
    :func:`head_rows` lm_head rows), built on ``dev`` in bf16 directly (an fp32 build would need twice the memory:
    a 70B shard at 80 layers would not fit)."""
    import torch
    import transformers

    arch, shape = model_shape(name)
    cls = getattr(transformers, f"{ARCHS[arch]}ForCausalLM")
    cfg = hf_config(arch, shape, layers, vocab)
    rows = head_rows(name, vocab, head)
    torch.manual_seed(0)
    with torch.device(dev), _default_dtype(torch.bfloat16):
        model = cls(cfg)
        if rows != vocab:  # rank 0's vocabulary-parallel rows (the first ones), a plain Linear as parallelize leaves
            model.lm_head = torch.nn.Linear(shape["hidden_size"], rows, bias=False)
    return model.to(torch.bfloat16).eval()  # buffers made in fp32 (RoPE's inv_freq) too, as before
