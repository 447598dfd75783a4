"""``from_pretrained``: a local Hugging Face checkpoint directory straight into this rank's shards.

The model is built on the meta device from ``config.json`` (no memory), sharded by :func:`parallelize` (shapes
only), given storage of its shard shapes on ``comm.device``, and filled by :func:`load_sharded_safetensors`, which
reads only this rank's slices through a small host buffer: per rank, host and device memory stay about one shard.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from .fp8_convert import quantize_fp8, scheme_from_config
from .kv_cache import KVCacheConfig
from .loading import load_sharded_safetensors
from .layout import TPLayout, resolve_layout
from .wrap import parallelize


def build_meta(path: str, dtype: torch.dtype, layout: Optional[TPLayout] = None):
    """``(model, fp8 scheme or None)``: the ``AutoModelForCausalLM`` of ``path/config.json`` on the meta device in
    ``dtype``; an FP8 (compressed-tensors) checkpoint's decoder linears already converted to FP8 (structure only)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    scheme = scheme_from_config(getattr(config, "quantization_config", None))
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config  # transformers would look for its own quantizer
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(plain).to(dtype)
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: keep the one derived from the config
        pass
    if scheme is not None:
        quantize_fp8(model, activation=scheme.activation, weight=scheme.weight, layout=layout)
    return model, scheme


def from_pretrained(path: str, comm, *, dtype: torch.dtype = torch.bfloat16, cache: Optional[KVCacheConfig] = None,
                    fp8: Optional[dict] = None, layout: Optional[TPLayout] = None, plan: Optional[TPLayout] = None):
    """Load the local checkpoint directory ``path`` (``config.json`` + ``*.safetensors``, as ``save_pretrained``
    writes) as this rank's parallelized model on ``comm`` (the same on every rank; collective).

    ``dtype``: the model dtype (``comm.dtype``). A compressed-tensors FP8 checkpoint (``quantization_config`` in
    ``config.json``; e4m3 ``weight`` + ``weight_scale``) loads as the FP8 model it is. ``fp8``: convert a bf16
    checkpoint to FP8 after loading, with these :func:`quantize_fp8` arguments (``{}`` = per-token activations,
    per-channel weights); ignored for a checkpoint that already is FP8. ``cache`` / ``layout``: as
    :func:`parallelize`. Returns the model (``generate()`` works; ``generation_config.json`` is read if present)."""
    layout = resolve_layout(layout, plan, "from_pretrained")
    model, scheme = build_meta(path, dtype, layout)
    model = parallelize(model, comm, layout=layout, cache=cache)
    load_sharded_safetensors(model, path, comm)
    if fp8 is not None and scheme is None:
        quantize_fp8(model, **fp8)
    return model
