"""Load a local safetensors checkpoint straight into a parallelized model's per-rank shards.

Each rank opens the files memory-mapped and reads, for a sharded parameter, only its own slice
(``safe_open(...).get_slice(name)[start:end]`` / ``[:, start:end]``); replicated parameters are read whole. The
full model is never materialised from the checkpoint on any rank.
"""

from __future__ import annotations

import glob
import os
from typing import List

import torch


def _files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path}")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return [path]


def load_sharded_safetensors(model, path: str, comm, *, strict: bool = True) -> List[str]:
    """Fill ``model`` (already :func:`~tpfuse.parallel.parallelize`-d with ``comm``) from the safetensors file
    ``path``, or from every ``*.safetensors`` file of the directory ``path`` (a sharded Hugging Face checkpoint).

    Checkpoint names are the unsharded model's ``state_dict`` names (what ``save_pretrained`` writes). Values are
    cast to the model's dtype. With ``strict``, a checkpoint tensor the model does not have, a model tensor the
    checkpoint lacks (tied weights excepted: loading either name fills both), or a full shape that differs from
    the model's unsharded shape raises. Returns the names loaded."""
    from safetensors import safe_open

    st = getattr(model, "_tpfuse", None)
    if st is None:
        raise ValueError("load_sharded_safetensors needs a parallelized model: call tpfuse.parallelize first")
    if comm is not st.comm and (comm.rank, comm.tp) != (st.comm.rank, st.comm.tp):
        raise ValueError(f"comm (rank {comm.rank}/{comm.tp}) is not the communicator the model was parallelized "
                         f"with (rank {st.comm.rank}/{st.comm.tp})")
    sd = model.state_dict()
    loaded, unexpected, bad = [], [], []
    with torch.no_grad():
        for f in _files(path):
            with safe_open(f, framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    if name not in sd:
                        unexpected.append(name)
                        continue
                    dst = sd[name]
                    sl = fh.get_slice(name)
                    full = tuple(sl.get_shape())
                    spec = st.shards.get(name)
                    if spec is None:
                        if full != tuple(dst.shape):
                            bad.append(f"{name}: checkpoint {full}, model {tuple(dst.shape)}")
                            continue
                        src = fh.get_tensor(name)
                    else:
                        if full != spec.full_shape:
                            bad.append(f"{name}: checkpoint {full}, unsharded model {spec.full_shape}")
                            continue
                        if spec.dim == 0:
                            src = sl[spec.start:spec.end]
                        else:
                            src = sl[:, spec.start:spec.end]
                    dst.copy_(src.to(dst.dtype))
                    loaded.append(name)
    if bad:
        raise ValueError("shape mismatch between checkpoint and model:\n  " + "\n  ".join(bad))
    if strict:
        # tied parameters are the same tensor (same address and shape); fused q/k/v slices share a storage but
        # not an address, so a missing k_proj is still reported
        got = {(sd[n].data_ptr(), tuple(sd[n].shape)) for n in loaded}
        missing = [n for n in sd if n not in loaded and (sd[n].data_ptr(), tuple(sd[n].shape)) not in got]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path}: missing {missing}, unexpected {unexpected}")
    return loaded
