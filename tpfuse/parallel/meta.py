"""Models built on the meta device: materialise a (sharded) meta model on the communicator's device.

``parallelize`` shards a meta model exactly like a real one (slicing meta tensors only computes shapes), then
calls :func:`materialize`: every parameter and buffer gets uninitialised storage of its (shard) shape on the
device, so a rank never allocates more than its shard. Parameters are filled by
:func:`~tpfuse.parallel.load_sharded_safetensors` afterwards. Buffers that a checkpoint does not hold
(non-persistent ones, e.g. the rotary module's ``inv_freq``) cannot be loaded; the rotary module is rebuilt from the
config on the device, and a model with any other non-persistent buffer is refused before anything is allocated.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import TPFuseInputError, TPFuseUnsupportedError
from .layers import get_path


def is_meta(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are on the meta device (all of them; a mix raises)."""
    flags = {p.is_meta for p in model.parameters()}
    if len(flags) > 1:
        raise TPFuseInputError("the model has parameters both on the meta device and materialised; build it "
                               "entirely on the meta device (with torch.device('meta')) or entirely with real weights")
    return flags == {True}


def check_buffers(model: nn.Module, rotary: str) -> None:
    """Refuse a meta model with a non-persistent buffer outside the rotary module (it could not be filled)."""
    for mname, mod in model.named_modules():
        inside = mname == rotary or mname.startswith(rotary + ".")
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            if not inside:
                raise TPFuseUnsupportedError(f"meta-device model: non-persistent buffer {mname}.{b} is not in any "
                                             f"checkpoint and tpfuse does not know how to compute it")


def _tied_groups(model: nn.Module):
    """Names of parameters that are one tensor (``tie_word_embeddings``), grouped, first name first."""
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def materialize(model: nn.Module, rotary: str, device: torch.device) -> None:
    """Give every tensor of the meta ``model`` uninitialised storage on ``device`` (tied parameters stay tied) and
    rebuild the rotary module ``rotary`` (an attribute path) from ``model.config`` on ``device``."""
    check_buffers(model, rotary)
    tied = _tied_groups(model)
    model.to_empty(device=device)  # gives every parameter its own storage, tied ones too: re-tie them
    for owner, *others in tied:
        keep = get_path(model, owner)
        for name in others:
            parent, _, leaf = name.rpartition(".")
            setattr(get_path(model, parent) if parent else model, leaf, keep)
    old = get_path(model, rotary)
    with torch.device(device):
        new = type(old)(config=model.config)
    parent, _, leaf = rotary.rpartition(".")
    setattr(get_path(model, parent) if parent else model, leaf, new)
