"""Tiny Hugging Face models and their fp64 oracle, shared by the model-runtime tests (CPU and GPU).

Weights are re-drawn at O(1) scale (:func:`tpfuse.models.hf_tiny.randomize_weights`): attention far from uniform,
norm weights far from 1, so a wrong position, mask, head split, cache slot or norm weight moves the logits well past
the tolerance. Every rank builds the identical model from one seed.
"""

import copy

import torch

VOCAB, HIDDEN = 128, 64
GRAPH_SAFE = {"fused_add_rmsnorm": "tpfuse_oneshot", "all_reduce": "tpfuse_oneshot"}
"""``CommConfig.force_paths`` of the GPU model tests at TP > 1: the all-reduce on tpfuse's graph-capturable kernel
(the shipped TP 4 / 8 rows route it to NCCL, which one-GPU mode runs as host collectives no CUDA graph captures)."""


# arch -> (transformers config class, model class, what the arch sets over the common tiny dims)
ARCHS = {
    # with biases: fused q/k/v and gate/up biases, replicated row biases added once
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    # Llama 3.2: tied embeddings, llama3 RoPE scaling (original 16 positions: one frequency smoothed, the rest scaled)
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    # 2 kv heads: replicated at TP=4
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases (Qwen2's own), none elsewhere
    # fused qkv_proj / gate_up_proj; 4 q heads, 2 kv heads (split at TP=2, replicated at TP=4); ids in the vocab
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def config(arch: str, **over):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg_cls, _, arch_over = ARCHS[arch]
    return getattr(transformers, cfg_cls)(**{**common, **arch_over, **over})


def build(arch: str, seed: int, **over):
    """Tiny model of ``arch`` (an :data:`ARCHS` key; fp32, CPU) with O(1) random weights."""
    import transformers

    from tpfuse.models.hf_tiny import randomize_weights

    torch.manual_seed(seed)
    cls = getattr(transformers, ARCHS[arch][1])
    return randomize_weights(cls(config(arch, **over)).eval(), seed, scale=1.5)


def tp_model(arch, world, **cache_kw):
    """``(parallelized model, unsharded copy for the oracle, comm)``: :func:`build` ``(arch, seed=0)`` on this
    rank's communicator (fp32, 64 tokens), with a cache of 4 rows x 48 tokens (``cache_kw`` over that)."""
    import tpfuse
    from tpfuse.parallel import KVCacheConfig

    model = build(arch, seed=0)
    oracle_model = build(arch, seed=0)
    comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=HIDDEN, dtype=torch.float32)
    cfg = KVCacheConfig(max_batch=4, max_seq_len=48, block_size=16, **cache_kw)
    return tpfuse.parallelize(model, comm, cache=cfg), oracle_model, comm


def prompts(lengths=(7, 3, 5), seed=11):
    """One random prompt per length (a batch of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def padded(prompts, left: bool):
    """``(ids [B, width], attention_mask)``: ``prompts`` padded with 0 on the left or the right."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        sl = slice(width - len(p), width) if left else slice(0, len(p))
        ids[b, sl], mask[b, sl] = p, 1
    return ids, mask


def oracle(model, ids):
    """fp64 logits ``[T, vocab]`` of the unsharded HF model over one whole sequence ``ids [T]`` (no cache)."""
    ref = copy.deepcopy(model).double().cpu()
    with torch.no_grad():
        return ref(ids.cpu()[None], use_cache=False).logits[0]


def cache_of(out):
    """The cache a forward returned (transformers >= 5.2x names it ``cache``, older ones ``past_key_values``)."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def decode_logits(model, ids, prompt: int, device="cpu"):
    """Prefill ``ids[:prompt]``, then a one-token step for each later id of ``ids [T]``: the fp32 CPU logits of the
    prefill (``prompt`` rows) and of each step, concatenated (``[T, vocab]``)."""
    out = model(ids[None, :prompt].to(device), use_cache=True)
    logits, cache = [out.logits[0].float().cpu()], cache_of(out)
    for pos in range(prompt, len(ids)):
        out = model(ids[None, pos:pos + 1].to(device), cache=cache, use_cache=True)
        logits.append(out.logits[0].float().cpu())
        cache = cache_of(out)
    return torch.cat(logits)

