"""Tiny Hugging Face models and their fp64 oracle, shared by the model-runtime tests (CPU and GPU).

Weights are re-drawn at O(1) scale (:func:`tpfuse.models.hf_tiny.randomize_weights`): attention far from uniform,
norm weights far from 1, so a wrong position, mask, head split, cache slot or norm weight moves the logits well past
the tolerance. Every rank builds the identical model from one seed.
"""

import copy

import torch

VOCAB, HIDDEN = 128, 64


def config(arch: str, **over):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    common.update(over)
    if arch == "llama":  # with biases: fused q/k/v and gate/up biases, replicated row biases added once
        return transformers.LlamaConfig(**common, attention_bias=True, mlp_bias=True)
    return transformers.Qwen3Config(**common)


def build(arch: str, seed: int, **over):
    """Tiny ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` (fp32, CPU) with O(1) random weights."""
    import transformers

    from tpfuse.models.hf_tiny import randomize_weights

    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen3ForCausalLM
    return randomize_weights(cls(config(arch, **over)).eval(), seed, scale=1.5)


def oracle(model, ids):
    """fp64 logits ``[T, vocab]`` of the unsharded HF model over one whole sequence ``ids [T]`` (no cache)."""
    ref = copy.deepcopy(model).double().cpu()
    with torch.no_grad():
        return ref(ids.cpu()[None], use_cache=False).logits[0]


def cache_of(out):
    """The cache a forward returned (transformers >= 5.2x names it ``cache``, older ones ``past_key_values``)."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values
