"""Tensor-parallel wrapping of Hugging Face causal LMs (``pip install "tpfuse[hf]"``).

* :func:`parallelize` - shard a Llama 2 / 3.x, Mistral, Qwen2 / 2.5, Qwen3 or Phi-3 causal LM (or a model a
  :class:`TPLayout` describes) in place per rank and run every all-reduce fused with the residual add and the next
  RMSNorm, switching to the sequence-parallel form above the communicator's token threshold;
* :class:`TPLayout`, :data:`LLAMA_LAYOUT`, :data:`QWEN3_LAYOUT`, :data:`PHI3_LAYOUT` - the declarative layouts;
  :data:`FAMILIES` / :data:`LAYOUTS` / :func:`layout_for` - the shipped families and how a model is recognised;
* :func:`from_pretrained` - a local checkpoint directory built on the meta device and loaded straight into this
  rank's shards (bf16, or compressed-tensors FP8);
* :func:`load_sharded_safetensors` - fill the shards from a local safetensors checkpoint, reading only this rank's
  slices;
* :func:`quantize_fp8` - convert the decoder's linears to FP8 e4m3 (per-channel / per-tensor weight scales,
  per-token / static activations), before or after ``parallelize``; :func:`calibrate_input_scales` for static;
* :class:`KVCacheConfig` - size and form of the static KV cache and the CUDA-graph decode buckets;
* :class:`TPKVCache` - one batch of sequences in that cache (what the forward returns and takes back);
* :func:`generate` - the fast generation loop (graph-replayed decode steps, greedy or sampling).

This package never imports transformers itself (models are recognised by class name).
"""

from .fp8 import FP8Linear, FP8Scheme
from .fp8_convert import calibrate_input_scales, compressed_tensors_config, quantize_fp8
from .fp8_layer import FP8DecoderLayer
from .generate import GenerateOutput, generate
from .kv_cache import KVCacheConfig, TPKVCache
from .layers import TPDecoderLayer
from .loading import load_sharded_safetensors
from .layout import FAMILIES, LAYOUTS, LLAMA_LAYOUT, PHI3_LAYOUT, QWEN3_LAYOUT, TPLayout, layout_for
from .pretrained import from_pretrained
from .wrap import ShardSpec, parallelize


def __getattr__(name):
    from .layout import renamed_attr

    return renamed_attr(__name__, name)


__all__ = ["parallelize", "TPLayout", "LLAMA_LAYOUT", "QWEN3_LAYOUT", "PHI3_LAYOUT", "LAYOUTS", "FAMILIES",
           "layout_for",
           "load_sharded_safetensors",
           "TPKVCache", "KVCacheConfig", "TPDecoderLayer", "ShardSpec", "generate", "GenerateOutput",
           "from_pretrained", "quantize_fp8", "calibrate_input_scales", "compressed_tensors_config", "FP8Linear",
           "FP8Scheme", "FP8DecoderLayer"]
