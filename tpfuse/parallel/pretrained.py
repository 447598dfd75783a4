"""``from_pretrained``: a local Hugging Face checkpoint directory straight into this rank's shards.

The model is built on the meta device from ``config.json`` (no memory), sharded by :func:`parallelize` (shapes
only), given storage of its shard shapes on ``comm.device``, and filled by :func:`load_sharded_safetensors`, which
reads only this rank's slices through a small host buffer: per rank, host and device memory stay about one shard.

Only local directories are read (transformers runs with ``local_files_only``): a path that is not a directory with
a ``config.json`` - a typo, or a hub id - raises :class:`~tpfuse.errors.TPFuseCheckpointNotFound` at once, on every
rank, before anything is built and without any network access.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch

from ..errors import TPFuseCheckpointNotFound
from .fp8_convert import quantize_fp8, scheme_from_config
from .kv_cache import KVCacheConfig
from .loading import load_sharded_safetensors
from .layout import TPLayout, resolve_layout
from .wrap import shard_and_wrap


def build_meta(path: str, dtype: torch.dtype, layout: Optional[TPLayout] = None):
    """``(model, fp8 scheme or None)``: the ``AutoModelForCausalLM`` of ``path/config.json`` on the meta device in
    ``dtype``; an FP8 (compressed-tensors) checkpoint's decoder linears already converted to FP8 (structure only)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    scheme = scheme_from_config(getattr(config, "quantization_config", None))
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config  # transformers would look for its own quantizer
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(plain).to(dtype)
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:  # no generation_config.json: keep the one derived from the config
        pass
    if scheme is not None:
        quantize_fp8(model, activation=scheme.activation, weight=scheme.weight, layout=layout)
    return model, scheme


def check_checkpoint_dir(path, entry: str = "from_pretrained") -> str:
    """``path`` as a string when it is a local directory with a ``config.json``; else one clear error that says
    tpfuse never downloads (a hub id gets the command that does)."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isdir(path):
        raise TPFuseCheckpointNotFound(f"{entry}: {path} has no config.json: not a Hugging Face checkpoint "
                                       f"directory (save_pretrained writes one)")
    hint = (f"; to fetch the hub model {path!r} first: hf download {path} --local-dir DIR, then pass DIR"
            if path.count("/") == 1 and not path.startswith((".", "/", "~")) else "")
    raise TPFuseCheckpointNotFound(f"{entry}: {path!r} is not a directory (tpfuse loads local checkpoint "
                                   f"directories only and downloads nothing){hint}")


def from_pretrained(path: str, comm, *, dtype: Optional[torch.dtype] = None, cache: Optional[KVCacheConfig] = None,
                    fp8: Optional[dict] = None, layout: Optional[TPLayout] = None, plan: Optional[TPLayout] = None):
    """Load the local checkpoint directory ``path`` (``config.json`` + ``*.safetensors``, as ``save_pretrained``
    writes) as this rank's parallelized model on ``comm`` (the same on every rank; collective).

    ``path`` must be a local directory: anything else (a typo, a hub id) raises
    :class:`~tpfuse.errors.TPFuseCheckpointNotFound` before anything is built; nothing is downloaded.
    ``dtype``: the model dtype, ``comm.dtype`` by default (another raises). A compressed-tensors FP8 checkpoint
    (``quantization_config`` in ``config.json``; e4m3 ``weight`` + ``weight_scale``) loads as the FP8 model it is.
    ``fp8``: convert a bf16 checkpoint to FP8 after loading, with these :func:`quantize_fp8` arguments (``{}`` =
    per-token activations, per-channel weights); ignored for a checkpoint that already is FP8. ``cache`` /
    ``layout``: as :func:`parallelize`. Returns the model (``generate()`` works; ``generation_config.json`` is read
    if present)."""
    path = check_checkpoint_dir(path)
    layout = resolve_layout(layout, plan, "from_pretrained")
    model, scheme = build_meta(path, comm.dtype if dtype is None else dtype, layout)
    model = shard_and_wrap(model, comm, layout, cache, "from_pretrained")
    load_sharded_safetensors(model, path, comm)
    if fp8 is not None and scheme is None:
        quantize_fp8(model, **fp8)
    return model
