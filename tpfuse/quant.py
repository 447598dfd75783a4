"""Quantized activation formats and their plain-torch reference quantizers (CPU and GPU).

Every fused kernel in tpfuse that emits a quantized output must reproduce these functions: bit-exactly where the
arithmetic is the same, else within one quantization step (``tpfuse.tolerance``). The math below is written in the
order a kernel does it (reciprocal once, then multiply) so that exact agreement is reachable.

Formats
=======
=====================  ============================  ===========================================================
spec                   ``data``                      ``scale``
=====================  ============================  ===========================================================
``FP8Static(s)``       e4m3 ``[T, H]``               the given fp32 scalar ``s`` (shape ``[]``)
``FP8PerToken()``      e4m3 ``[T, H]``               fp32 ``[T, 1]``: ``max(amax_row / 448, 1 / (448 * 512))``
``FP8PerGroup(g)``     e4m3 ``[T, H]``               fp32 ``[T, H / g]`` row-major: same rule per group of g
``NVFP4(gs, layout)``  uint8 ``[T, H / 2]``          e4m3; ``"linear"``: ``[T, H / 16]`` row-major;
                       (two e2m1 per byte, element   ``"swizzled128x4"``: ``[round_up(T, 128), round_up(H/16, 4)]``
                       ``2i`` in the low nibble)     whose flat memory is the 128x4 swizzle (see below), pad = 0
=====================  ============================  ===========================================================

FP8 is e4m3 (``torch.float8_e4m3fn``): ``q = clamp(x * (1 / scale), -448, 448)``, rounded to nearest even.
NaN stays NaN (the clamp does not hide it); +-Inf saturates to +-448 in static mode and turns the dynamic scale into
Inf/NaN, so a bad row never looks clean.

NVFP4 follows FlashInfer / TensorRT-LLM (``cvt_warp_fp16_to_fp4``), so Blackwell FP4 GEMMs consume it as is:
for each block of 16 elements along H, with global scale ``gs`` (fp32, usually ``448 * 6 / amax(x)``):

1. ``sf = e4m3(gs * (amax_block * (1/6)))`` (clamped to 448 before the cast);
2. ``out_scale = 1 / (float(sf) * (1 / gs))`` (0 when ``sf == 0``);
3. ``q = e2m1(x * out_scale)``, round-to-nearest-even onto {0, .5, 1, 1.5, 2, 3, 4, 6} with saturation at 6,
   sign in bit 3; two codes per byte, the even element in the low nibble.

Dequantization: ``x ~= e2m1_value * float(sf) / gs``.

SWIZZLED_128x4 places scale ``(m, k)`` (row m, scale column k) at flat offset::

    (m // 128) * (K4 * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)

with ``K4 = round_up(H / 16, 4) / 4``: tiles ``[m_tiles, k_tiles, 32, 4, 4]``, the layout FlashInfer calls
SWIZZLED_128x4 (:func:`swizzled_offset`; the kernels' twin: ``tpfuse.kernels.quant_epilogue.swizzled_offset``).

Kernel encoding
===============
The kernels and the ``tpfuse::*`` custom ops take a format as ``(fmt, group_size, in_scale)``
(:func:`spec_to_args` / :func:`args_to_spec`): ``fmt`` a :class:`QuantFormat` (an int for the custom ops and the
kernels' ``FMT`` constexpr; the NVFP4 scale layout is folded into it), ``group_size`` the FP8 group size (16 for
every other format: a valid placeholder for the kernels' ``GROUP``), ``in_scale`` the FP8 static scale or the
NVFP4 global scale (else None). :func:`alloc_outputs` allocates a kernel's ``(data, scale)`` outputs.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .errors import TPFuseInputError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the kernels use these two as constexprs (tpfuse.kernels.quant_epilogue)
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # floor of dynamic scales (as vLLM), so all-zero rows stay finite
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
NVFP4_LAYOUTS = ("swizzled128x4", "linear")

# e2m1 magnitudes by code (bit 3 is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

ScaleLike = Union[torch.Tensor, float]


class QuantFormat(enum.IntEnum):
    """A kernel output format, as the kernels' ``FMT`` constexpr and the custom ops' ``fmt`` int take it (the only
    definition of these ids; ``tpfuse.kernels.quant_epilogue`` documents each one's buffers). Code receiving a
    ``fmt`` compares it with these members (it may arrive as a plain int, e.g. through a custom op)."""

    NONE = 0  # no quantization: the output in the input's float dtype
    FP8_STATIC = 1  # FP8Static
    FP8_PER_TOKEN = 2  # FP8PerToken
    FP8_PER_GROUP = 3  # FP8PerGroup(group_size)
    NVFP4_LINEAR = 4  # NVFP4(layout="linear")
    NVFP4_SWIZZLED = 5  # NVFP4(layout="swizzled128x4")


def _as_scale_tensor(value: ScaleLike, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # a zero scale dequantizes everything to +-0, a negative one flips signs, NaN / Inf poison every value:
        # nothing a calibrated model produces, so a Python number is checked here (a tensor is not: reading it
        # would sync the device; see the spec's docstring)
        v = float(value)
        if not (math.isfinite(v) and v > 0):
            raise TPFuseInputError(f"{what} must be a finite number > 0, got {value!r}")
        return torch.tensor(v, dtype=torch.float32)
    raise TPFuseInputError(f"{what} must be a float or an fp32 scalar tensor, got {type(value).__name__}")


def _keep_number(spec, field: str, value: ScaleLike) -> None:
    """Set ``spec.<field>`` from ``value``; a Python number is also kept (``_number``) so that the scale can follow
    the op to its device (:func:`_place_number_scale`)."""
    scale = _as_scale_tensor(value, f"{type(spec).__name__}.{field}")
    object.__setattr__(spec, field, scale)
    if not isinstance(value, torch.Tensor):
        object.__setattr__(spec, "_number", float(value))
        object.__setattr__(spec, "_placed", {scale.device: scale})


def _place_number_scale(spec, field: str, device) -> torch.Tensor:
    """The scale of a spec built from a Python number (``_placed``), on ``device``: made there once per device and
    kept on the spec, whose ``<field>`` points at it from then on (a spec is used on one device at a time, as a
    rank's model uses it; a tensor scale's device stays the caller's). Made outside a CUDA-graph capture only: a
    fill recorded in a capture would leave the kept tensor unwritten until the first replay."""
    placed = spec.__dict__["_placed"]
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    t = placed.get(dev)
    if t is None:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise TPFuseInputError(
                f"{type(spec).__name__}({spec._number}) is first used on {dev} inside a CUDA-graph capture: use it "
                f"once before capturing (its scale is then placed on {dev}), or pass an fp32 tensor on {dev}")
        t = placed[dev] = torch.full((), spec._number, dtype=torch.float32, device=dev)
    if getattr(spec, field) is not t:
        object.__setattr__(spec, field, t)
    return t


@dataclass(eq=False, frozen=True)
class FP8Static:
    """FP8 e4m3 with one static per-tensor scale: ``q = clamp(x / scale)``. ``scale``: a finite float > 0 (checked
    here: zero, negative, NaN and Inf raise :class:`~tpfuse.errors.TPFuseInputError`; the scale then follows the op
    to its device, placed there at its first call on that device, which must not be inside a CUDA-graph capture),
    or an fp32 ``[]``/``[1]`` tensor on the op's device. A tensor is read on the device, so no host sync, and its
    *value* is not checked: a zero scale gives NaN / +-448 (``x * (1/0)``), a negative one flips every sign, NaN
    makes every output NaN - the caller owns a tensor scale's value (its shape, dtype and device are checked at
    each call)."""

    scale: ScaleLike

    def __post_init__(self):
        _keep_number(self, "scale", self.scale)


@dataclass(eq=False, frozen=True)
class FP8PerToken:
    """FP8 e4m3 with a dynamic fp32 scale per token (row): ``scale [T, 1]``."""


@dataclass(eq=False, frozen=True)
class FP8PerGroup:
    """FP8 e4m3 with a dynamic fp32 scale per token and per group of ``group_size`` hidden elements:
    ``scale [T, H / group_size]`` (row-major). ``H`` must be a multiple of ``group_size``."""

    group_size: int = 128

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 16:
            raise TPFuseInputError(f"FP8PerGroup.group_size must be a positive multiple of 16, got {self.group_size}")


@dataclass(eq=False, frozen=True)
class NVFP4:
    """NVFP4 (e2m1 data, e4m3 scale per 16 elements, fp32 global scale), FlashInfer/TRT-LLM compatible.
    ``global_scale``: a finite float > 0 (checked here; it follows the op to its device, as for
    :class:`FP8Static`), or an fp32 ``[]``/``[1]`` tensor (shape, dtype and device checked per call; its value is
    not, as for :class:`FP8Static`), usually ``448 * 6 / amax``. ``layout``: scale layout, ``"swizzled128x4"``
    (what FP4 GEMMs read) or ``"linear"`` (row-major)."""

    global_scale: ScaleLike
    layout: str = "swizzled128x4"

    def __post_init__(self):
        _keep_number(self, "global_scale", self.global_scale)
        if self.layout not in NVFP4_LAYOUTS:
            raise TPFuseInputError(f"NVFP4.layout must be one of {NVFP4_LAYOUTS}, got {self.layout!r}")


QuantSpec = Union[FP8Static, FP8PerToken, FP8PerGroup, NVFP4]
QUANT_SPECS = (FP8Static, FP8PerToken, FP8PerGroup, NVFP4)


@dataclass(eq=False)
class QuantizedActivation:
    """A quantized ``[T, H]`` activation: ``data`` and ``scale`` as in the module's format table, the ``spec``
    that made it, the dtype it came from and its logical ``shape``."""

    data: torch.Tensor
    scale: torch.Tensor
    spec: QuantSpec
    orig_dtype: torch.dtype
    shape: torch.Size

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Back to a dense tensor (``orig_dtype`` unless ``dtype`` is given; math in fp32)."""
        return dequantize(self).to(dtype or self.orig_dtype)


# --------------------------------------------------------------------------------------------------------------
# validation


def check_spec(spec: Optional[QuantSpec], hidden: int, device: torch.device) -> None:
    """Raise :class:`TPFuseInputError` if ``spec`` cannot quantize a ``[*, hidden]`` activation on ``device``. A
    scale given as a Python number is placed on ``device`` here (:func:`_place_number_scale`): every op that takes a
    spec calls this before reading the scale, so this is where the scale follows the op."""
    if spec is None:
        return
    tp = type(spec)  # the spec classes are final dataclasses: a type test is enough (and cheaper than isinstance)
    if tp is FP8PerToken:
        return
    if tp is FP8Static or tp is NVFP4:
        field = "scale" if tp is FP8Static else "global_scale"
        s = getattr(spec, field)
        dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        if "_placed" in spec.__dict__:  # a number: on this very device (index included)
            s = _place_number_scale(spec, field, device)
        if s.dtype is not torch.float32 or s.numel() != 1 or s.dim() > 1 or s.device.type != dev_type:
            _scale_error(f"{tp.__name__}.{field}", s, device)
        if tp is NVFP4 and hidden % NVFP4_BLOCK:
            raise TPFuseInputError(f"NVFP4 needs hidden % 16 == 0, hidden={hidden}")
        return
    if tp is FP8PerGroup:
        if hidden % spec.group_size:
            raise TPFuseInputError(f"FP8PerGroup({spec.group_size}) needs hidden % {spec.group_size} == 0, "
                                   f"hidden={hidden}")
        return
    _check_spec_general(spec, hidden, device)  # anything else (subclasses, wrong types): the general checks


def _check_spec_general(spec, hidden: int, device) -> None:
    if not isinstance(spec, QUANT_SPECS):
        raise TPFuseInputError(
            f"quant must be None or one of FP8Static, FP8PerToken, FP8PerGroup, NVFP4; got {type(spec).__name__}")
    if isinstance(spec, (FP8Static, NVFP4)):
        field = "scale" if isinstance(spec, FP8Static) else "global_scale"
        name = ("FP8Static." if isinstance(spec, FP8Static) else "NVFP4.") + field
        s = getattr(spec, field)
        if "_placed" in spec.__dict__:
            s = _place_number_scale(spec, field, device)
        if s.dtype != torch.float32 or s.numel() != 1 or s.dim() > 1 or s.device.type != torch.device(device).type:
            _scale_error(name, s, device)
    if isinstance(spec, FP8PerGroup) and hidden % spec.group_size:
        raise TPFuseInputError(f"FP8PerGroup({spec.group_size}) needs hidden % {spec.group_size} == 0, hidden={hidden}")
    if isinstance(spec, NVFP4) and hidden % NVFP4_BLOCK:
        raise TPFuseInputError(f"NVFP4 needs hidden % 16 == 0, hidden={hidden}")


def _scale_error(name: str, s: torch.Tensor, device) -> None:
    if s.dtype != torch.float32:
        raise TPFuseInputError(f"{name} must be float32, got {s.dtype}")
    if s.numel() != 1 or s.dim() > 1:
        raise TPFuseInputError(f"{name} must be a scalar (shape [] or [1]), got shape {tuple(s.shape)}")
    raise TPFuseInputError(f"{name} is on {s.device}, but the activation is on {device}")


# --------------------------------------------------------------------------------------------------------------
# FP8


def _fp8_cast(scaled: torch.Tensor) -> torch.Tensor:
    # clamp keeps NaN (torch.clamp propagates it) and saturates +-Inf; the cast rounds to nearest even
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_dynamic_scale(amax: torch.Tensor) -> torch.Tensor:
    """The dynamic FP8 scale rule shared by per-token and per-group: ``max(amax / 448, 1 / (448 * 512))``.
    NaN amax gives a NaN scale (``torch.maximum`` propagates NaN)."""
    # tensor / tensor: an IEEE division on every device (CUDA torch turns `tensor / python_float` into a multiply by
    # the reciprocal, which can differ by one ulp from the CPU result and from the kernels)
    fp8_max = torch.tensor(FP8_MAX, dtype=torch.float32, device=amax.device)
    return torch.maximum(amax.float() / fp8_max, torch.tensor(FP8_MIN_SCALE, device=amax.device))


def fp8_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / scale.float().reshape(())
    return _fp8_cast(x.float() * inv)


def fp8_quantize_per_token(x: torch.Tensor):
    xf = x.float()
    scale = fp8_dynamic_scale(xf.abs().amax(dim=-1, keepdim=True))
    return _fp8_cast(xf * (1.0 / scale)), scale


def fp8_quantize_per_group(x: torch.Tensor, group_size: int):
    t, h = x.shape
    xg = x.float().reshape(t, h // group_size, group_size)
    scale = fp8_dynamic_scale(xg.abs().amax(dim=-1, keepdim=True))
    q = _fp8_cast(xg * (1.0 / scale)).reshape(t, h)
    return q, scale.reshape(t, h // group_size)


# --------------------------------------------------------------------------------------------------------------
# NVFP4


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> e2m1 codes (uint8, 0..15), round to nearest even, saturating at 6. NaN encodes as +6 (e2m1 has no
    NaN; NVFP4 carries NaN through the block scale instead)."""
    mag = v.abs()
    code = ((mag > 0.25).to(torch.uint8) + (mag >= 0.75) + (mag > 1.25) + (mag >= 1.75) + (mag > 2.5)
            + (mag >= 3.5) + (mag > 5.0))
    code = torch.where(torch.isnan(v), torch.full_like(code, 7), code)
    sign = (torch.signbit(v) & ~torch.isnan(v)).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8).bool(), -mag, mag)


def nvfp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """``[T, H]`` codes -> ``[T, H/2]`` bytes, element ``2i`` in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def nvfp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)`` (host side: ``triton.next_power_of_2`` is a JIT-callable object
    that costs ~5 us a call on the launch path)."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def nvfp4_swizzled_shape(tokens: int, hidden: int):
    """Shape of the padded swizzled scale tensor: ``(round_up(T, 128), round_up(H / 16, 4))``."""
    return round_up(tokens, 128), round_up(hidden // NVFP4_BLOCK, 4)


def swizzled_offset(m: torch.Tensor, k: torch.Tensor, padded_cols: int) -> torch.Tensor:
    """Flat offset of scale ``(m, k)`` in the SWIZZLED_128x4 layout (``padded_cols = round_up(H/16, 4)``)."""
    k_tiles = padded_cols // 4
    return (m // 128) * (k_tiles * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)


def swizzle_128x4(sf: torch.Tensor) -> torch.Tensor:
    """Row-major scales ``[T, H/16]`` -> padded swizzled ``[round_up(T,128), round_up(H/16,4)]`` (pad = 0)."""
    t, kc = sf.shape
    rows, cols = round_up(t, 128), round_up(kc, 4)
    padded = torch.zeros(rows, cols, dtype=sf.dtype, device=sf.device)
    padded[:t, :kc] = sf
    # [mT, 4, 32, kT, 4] (m = mT*128 + i*32 + j) -> [mT, kT, 32(j), 4(i), 4]
    tiles = padded.view(torch.uint8).reshape(rows // 128, 4, 32, cols // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.contiguous().reshape(rows, cols).view(sf.dtype)


def unswizzle_128x4(sf_swizzled: torch.Tensor, tokens: int, hidden: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_128x4`, cropped to ``[T, H/16]``."""
    rows, cols = sf_swizzled.shape
    tiles = sf_swizzled.view(torch.uint8).reshape(rows // 128, cols // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.contiguous().reshape(rows, cols)[:tokens, : hidden // NVFP4_BLOCK].view(sf_swizzled.dtype)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The usual global scale for a tensor of absolute maximum ``amax``: ``448 * 6 / amax`` (fp32)."""
    return (FP8_MAX * E2M1_MAX) / amax.float()


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor, layout: str = "swizzled128x4"):
    t, h = x.shape
    gs = global_scale.float().reshape(())
    xb = x.float().reshape(t, h // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    sf = (gs * (amax * (1.0 / 6.0))).clamp(max=FP8_MAX).to(FP8_DTYPE)
    sf_f = sf.float()
    out_scale = torch.where(sf_f != 0, 1.0 / (sf_f * (1.0 / gs)), torch.zeros_like(sf_f))
    codes = e2m1_encode(xb * out_scale).reshape(t, h)
    sf = sf.reshape(t, h // NVFP4_BLOCK)
    return nvfp4_pack(codes), (swizzle_128x4(sf) if layout == "swizzled128x4" else sf)


def nvfp4_dequantize(data: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, shape, layout: str):
    t, h = shape
    vals = e2m1_decode(nvfp4_unpack(data)).reshape(t, h // NVFP4_BLOCK, NVFP4_BLOCK)
    sf = unswizzle_128x4(scale, t, h) if layout == "swizzled128x4" else scale
    return (vals * (sf.float().unsqueeze(-1) / global_scale.float().reshape(()))).reshape(t, h)


# --------------------------------------------------------------------------------------------------------------
# entry points


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedActivation:
    """Reference quantizer: ``x [T, H]`` (any float dtype, math in fp32) -> :class:`QuantizedActivation`."""
    if x.dim() != 2:
        raise TPFuseInputError(f"quantize expects a [tokens, hidden] tensor, got shape {tuple(x.shape)}")
    check_spec(spec, x.shape[-1], x.device)
    if isinstance(spec, FP8Static):
        data, scale = fp8_quantize_static(x, spec.scale), spec.scale
    elif isinstance(spec, FP8PerToken):
        data, scale = fp8_quantize_per_token(x)
    elif isinstance(spec, FP8PerGroup):
        data, scale = fp8_quantize_per_group(x, spec.group_size)
    else:
        data, scale = nvfp4_quantize(x, spec.global_scale, spec.layout)
    return QuantizedActivation(data=data, scale=scale, spec=spec, orig_dtype=x.dtype, shape=x.shape)


def dequantize(q: QuantizedActivation) -> torch.Tensor:
    """fp32 dense tensor from a :class:`QuantizedActivation`."""
    spec = q.spec
    if isinstance(spec, NVFP4):
        return nvfp4_dequantize(q.data, q.scale, spec.global_scale, q.shape, spec.layout)
    d = q.data.float()
    if isinstance(spec, FP8Static):
        return d * spec.scale.float().reshape(())
    if isinstance(spec, FP8PerToken):
        return d * q.scale
    t, h = q.shape
    return (d.reshape(t, h // spec.group_size, spec.group_size) * q.scale.unsqueeze(-1)).reshape(t, h)


def spec_to_args(spec: Optional[QuantSpec]) -> Tuple[QuantFormat, int, Optional[torch.Tensor]]:
    """``(fmt, group_size, in_scale)`` of a quant spec (None: no quantization), the kernels' and custom ops'
    encoding (module docstring, "Kernel encoding")."""
    if spec is None:
        return QuantFormat.NONE, 16, None
    if isinstance(spec, FP8Static):
        return QuantFormat.FP8_STATIC, 16, spec.scale
    if isinstance(spec, FP8PerToken):
        return QuantFormat.FP8_PER_TOKEN, 16, None
    if isinstance(spec, FP8PerGroup):
        return QuantFormat.FP8_PER_GROUP, spec.group_size, None
    if isinstance(spec, NVFP4):
        fmt = QuantFormat.NVFP4_SWIZZLED if spec.layout == "swizzled128x4" else QuantFormat.NVFP4_LINEAR
        return fmt, 16, spec.global_scale
    raise TPFuseInputError(f"unknown quant spec {type(spec).__name__}")


def args_to_spec(fmt: int, group_size: int, in_scale: Optional[torch.Tensor]) -> Optional[QuantSpec]:
    """Inverse of :func:`spec_to_args`."""
    if fmt == QuantFormat.NONE:
        return None
    if fmt == QuantFormat.FP8_STATIC:
        return FP8Static(in_scale)
    if fmt == QuantFormat.FP8_PER_TOKEN:
        return FP8PerToken()
    if fmt == QuantFormat.FP8_PER_GROUP:
        return FP8PerGroup(group_size)
    return NVFP4(in_scale, "linear" if fmt == QuantFormat.NVFP4_LINEAR else "swizzled128x4")


def alloc_outputs(t: int, h: int, fmt: int, group_size: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(data, scale)`` output buffers of a ``[t, h]`` activation in format ``fmt`` (``dtype``: the output dtype
    of :attr:`QuantFormat.NONE`). Shapes as the module table; :attr:`QuantFormat.NONE` and
    :attr:`QuantFormat.FP8_STATIC` get an empty fp32 ``scale`` (no scale / the caller's static one)."""
    if fmt == QuantFormat.NONE:
        return torch.empty(t, h, dtype=dtype, device=device), torch.empty(0, dtype=torch.float32, device=device)
    if fmt >= QuantFormat.NVFP4_LINEAR:
        data = torch.empty(t, h // 2, dtype=torch.uint8, device=device)
        shape = nvfp4_swizzled_shape(t, h) if fmt == QuantFormat.NVFP4_SWIZZLED else (t, h // NVFP4_BLOCK)
        return data, torch.empty(shape, dtype=FP8_DTYPE, device=device)
    data = torch.empty(t, h, dtype=FP8_DTYPE, device=device)
    if fmt == QuantFormat.FP8_STATIC:
        return data, torch.empty(0, dtype=torch.float32, device=device)
    cols = 1 if fmt == QuantFormat.FP8_PER_TOKEN else h // group_size
    return data, torch.empty(t, cols, dtype=torch.float32, device=device)


def empty_like_quantized(x_shape, spec: QuantSpec, device, orig_dtype) -> QuantizedActivation:
    """Allocate output buffers of the right shapes and dtypes (:func:`alloc_outputs`; an FP8Static output's scale
    is the spec's own tensor)."""
    t, h = x_shape
    fmt, group_size, _ = spec_to_args(spec)
    data, scale = alloc_outputs(t, h, fmt, group_size, device, orig_dtype)
    if fmt == QuantFormat.FP8_STATIC:
        scale = spec.scale
    return QuantizedActivation(data=data, scale=scale, spec=spec, orig_dtype=orig_dtype, shape=torch.Size((t, h)))
