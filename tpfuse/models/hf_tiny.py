"""A tiny random-weight Hugging Face ``LlamaForCausalLM`` for the demo (nothing is downloaded; needs
``pip install "tpfuse[hf]"``).

Weights are redrawn at O(1) scale (norm weights far from 1, attention far from uniform), so a wrong shard, head
split, position or norm would move the logits well past the tolerance. Every rank builds the identical model from
one seed; :func:`oracle_logits` runs an unsharded fp64 copy over the whole sequence without a KV cache (row ``i``
is what the parallelized model must produce for token ``i``, in a prefill or in a decode step).
"""

from __future__ import annotations

import copy

import torch


def build(*, tp: int, layers: int, max_positions: int, seed: int = 0):
    """``LlamaForCausalLM`` (fp32, CPU): hidden 256, GQA with ``max(4, tp)`` kv heads (every head count divides
    by TP 2, 4, 8), MLP 512, vocab 512."""
    import transformers

    kv = max(4, tp)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=2 * kv, num_key_value_heads=kv, head_dim=256 // (2 * kv),
                                   max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return randomize_weights(transformers.LlamaForCausalLM(cfg).eval(), seed)


def randomize_weights(model, seed: int, scale: float = 1.0):
    """Redraw every parameter at O(1) scale from one CPU seed (identical on every rank): norm weights ``1 + 0.3 z``,
    matrices ``scale * z / sqrt(fan_in)`` (embeddings ``z``), other vectors ``z``. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5 * scale)
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def oracle_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp64 logits ``[T, vocab]`` of an unsharded copy of ``model`` over ``ids`` (CPU, no cache)."""
    ref = copy.deepcopy(model).double().cpu()
    with torch.no_grad():
        return ref(ids.cpu()[None], use_cache=False).logits[0]
