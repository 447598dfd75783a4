"""Load a local safetensors checkpoint straight into a parallelized model's per-rank shards.

Each rank reads, for a sharded parameter, only its own slice (rows ``[start, end)`` or columns ``[start, end)``,
:class:`~tpfuse.parallel.wrap.ShardSpec`; for a module stacking several projections, its rows of each part, in
order); replicated parameters are read whole. Reads go through one small host buffer
(:mod:`~tpfuse.parallel.st_reader`) straight into the model's tensors on ``comm.device``, so neither the full model
nor a full tensor is ever materialised on any rank, and host memory stays about one buffer.
FP8 checkpoints in the compressed-tensors layout (``weight`` e4m3 + ``weight_scale`` [+ ``input_scale``]) load
into a model converted with :func:`~tpfuse.parallel.quantize_fp8` (what :func:`~tpfuse.parallel.from_pretrained`
does); the FP8 layers' derived GEMM scales are rebuilt after the load.
"""

from __future__ import annotations

import glob
import os
from typing import List

import torch

from ..errors import TPFuseCheckpointNotFound, TPFuseInputError
from .st_reader import SafetensorsFile


def _files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise TPFuseCheckpointNotFound(f"no *.safetensors file in {path}")
        return files
    if not os.path.isfile(path):
        raise TPFuseCheckpointNotFound(path)
    return [path]


def _load_one(fh: SafetensorsFile, name: str, dst: torch.Tensor, spec, bad: List[str]) -> bool:
    full = fh.shape(name)
    if spec is None:
        if full != tuple(dst.shape) and not (full in ((), (1,)) and tuple(dst.shape) in ((), (1,))):
            bad.append(f"{name}: checkpoint {full}, model {tuple(dst.shape)}")
            return False
        fh.read_into(name, dst.view(full))
        return True
    if full != spec.full_shape:
        bad.append(f"{name}: checkpoint {full}, unsharded model {spec.full_shape}")
        return False
    off = 0
    for start, end in spec.ranges:  # several for a module stacking projections (Phi-3's qkv_proj): one per part
        fh.read_into(name, dst.narrow(spec.dim, off, end - start), spec.dim, start, end)
        off += end - start
    return True


def load_sharded_safetensors(model, path: str, comm, *, strict: bool = True) -> List[str]:
    """Fill ``model`` (already :func:`~tpfuse.parallel.parallelize`-d with ``comm``) from the safetensors file
    ``path``, or from every ``*.safetensors`` file of the directory ``path`` (a sharded Hugging Face checkpoint).

    Checkpoint names are the unsharded model's ``state_dict`` names (what ``save_pretrained`` writes). Values are
    cast to the model's dtype (per tensor: an e4m3 weight stays e4m3). With ``strict``, a checkpoint tensor the
    model does not have, a model tensor the checkpoint lacks (tied weights excepted: loading either name fills
    both), or a full shape that differs from the model's unsharded shape raises. Returns the names loaded."""
    st = getattr(model, "_tpfuse", None)
    if st is None:
        raise TPFuseInputError("load_sharded_safetensors needs a parallelized model: call tpfuse.parallelize first")
    if comm is not st.comm and (comm.rank, comm.tp) != (st.comm.rank, st.comm.tp):
        raise TPFuseInputError(f"comm (rank {comm.rank}/{comm.tp}) is not the communicator the model was parallelized "
                               f"with (rank {st.comm.rank}/{st.comm.tp})")
    sd = model.state_dict(keep_vars=True)
    loaded, unexpected, bad = [], [], []
    with torch.no_grad():
        for f in _files(path):
            with SafetensorsFile(f) as fh:
                for name in fh.keys():
                    if name not in sd:
                        unexpected.append(name)
                    elif _load_one(fh, name, sd[name].data, st.shards.get(name), bad):
                        loaded.append(name)
        for layer in st.layers:
            layer.after_load()
    if bad:
        raise TPFuseInputError("shape mismatch between checkpoint and model:\n  " + "\n  ".join(bad))
    if strict:
        # tied parameters are the same tensor (same address and shape); fused q/k/v slices share a storage but
        # not an address, so a missing k_proj is still reported
        got = {(sd[n].data_ptr(), tuple(sd[n].shape)) for n in loaded}
        missing = [n for n in sd if n not in loaded and (sd[n].data_ptr(), tuple(sd[n].shape)) not in got]
        if missing or unexpected:
            raise TPFuseInputError(f"checkpoint {path}: missing {missing}, unexpected {unexpected}")
    return loaded
