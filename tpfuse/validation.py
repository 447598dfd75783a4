"""Input checks shared by the communicator's ops. They run before any collective and raise
:class:`~tpfuse.errors.TPFuseInputError` with a message naming the argument, what was expected and what came."""

from __future__ import annotations

from typing import Optional

import torch

from .errors import TPFuseInputError

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def same_device(t: torch.Tensor, device: torch.device) -> bool:
    if t.device.type != device.type:
        return False
    return device.index is None or t.device.index == device.index


def check_tensor(name: str, t, *, dtype: Optional[torch.dtype], device: torch.device, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TPFuseInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise TPFuseInputError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TPFuseInputError(f"{name} has dtype {t.dtype}, but the communicator was built for {dtype}")
    if not same_device(t, device):
        raise TPFuseInputError(f"{name} is on {t.device}, but this communicator's device is {device}")
    if not t.is_contiguous():
        raise TPFuseInputError(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)});"
                               f" call .contiguous() first")


def check_activation(name: str, t, *, hidden: int, dtype: torch.dtype, device: torch.device,
                     max_tokens: int) -> None:
    """``t`` is a ``[T, hidden]`` activation of the communicator's dtype and device with ``T <= max_tokens``."""
    check_tensor(name, t, dtype=dtype, device=device, dim=2)
    if t.shape[1] != hidden:
        raise TPFuseInputError(f"{name} has hidden size {t.shape[1]}, but the communicator's hidden_size is {hidden}")
    if t.shape[0] > max_tokens:
        raise TPFuseInputError(f"{name} has {t.shape[0]} tokens, more than the communicator's max_tokens="
                               f"{max_tokens} (its workspaces are sized for that); build it with a larger max_tokens")


def check_norm_weight(weight, *, hidden: int, device: torch.device) -> None:
    """RMSNorm weight: ``[hidden]``, any float dtype (an fp32 weight with bf16 activations is computed in fp32)."""
    check_tensor("weight", weight, dtype=None, device=device, dim=1)
    if weight.shape[0] != hidden:
        raise TPFuseInputError(f"weight has {weight.shape[0]} elements, expected hidden_size={hidden}")
    if weight.dtype not in ACTIVATION_DTYPES:
        raise TPFuseInputError(f"weight dtype must be one of bf16/fp16/fp32, got {weight.dtype}")


def check_same_rows(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise TPFuseInputError(f"{b_name} has shape {tuple(b.shape)}, expected {tuple(a.shape)} (the shape of {a_name})")


def check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise TPFuseInputError(f"eps must be a positive float, got {eps!r}")
