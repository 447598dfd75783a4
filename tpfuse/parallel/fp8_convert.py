"""``quantize_fp8``: convert a model's decoder linears to FP8 in place, and the compressed-tensors config that
describes the result (what ``save_pretrained`` writes and :func:`~tpfuse.parallel.from_pretrained` reads)."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..errors import TPFuseInputError, TPFuseUnsupportedError
from .fp8 import FP8Linear, FP8Scheme, from_linear, weight_amax
from .layers import get_path, link_quant
from .layout import TPLayout, layout_for, resolve_layout


def _set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, leaf, value)


def _amax(lin: nn.Module, name: str, scheme: FP8Scheme, st) -> Optional[torch.Tensor]:
    """The amax of a parallelized shard's scale: reduced (max) over the group where the scale covers more than
    this shard (row-parallel weights, per-tensor scales), so it equals the unsharded model's."""
    if st is None or lin.weight.is_meta:
        return None
    per_channel = scheme.weight == "per_channel"
    amax = weight_amax(lin.weight, per_channel)
    spec = st.shards.get(name + ".weight")
    if spec is not None and (spec.dim == 1 or not per_channel) and st.comm.tp > 1:
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=st.comm.group)
    return amax


def _convert_layer(model, prefix: str, layout: TPLayout, scheme: FP8Scheme, st, input_scales) -> None:
    layer = get_path(model, prefix.rstrip("."))
    for name in (*layout.qkv, *layout.gate_up, layout.o_proj, layout.down_proj):
        lin = get_path(layer, name)
        if isinstance(lin, FP8Linear):
            raise TPFuseInputError(f"{prefix}{name} is already FP8")
        full = prefix + name
        new = from_linear(lin, scheme, _amax(lin, full, scheme, st))
        if scheme.activation == "static" and not new.weight.is_meta:
            if input_scales is None or full not in input_scales:
                raise TPFuseInputError(f"activation='static' needs input_scales[{full!r}] (calibrate_input_scales "
                                       f"on the unsharded model), or an FP8 checkpoint that has them")
            new.input_scale.data.copy_(torch.as_tensor(input_scales[full], dtype=torch.float32).reshape(1))
        _set_path(layer, name, new)
        if st is not None and new.weight_scale.dim() == 2 and full + ".weight" in st.shards:
            w = st.shards[full + ".weight"]
            if w.dim == 0:  # column-parallel, per channel: the scale rows (and parts) follow the weight rows
                st.shards[full + ".weight_scale"] = replace(w, full_shape=(w.full_shape[0], 1))


def _check_input_scales(model, layout: TPLayout, scheme: FP8Scheme, n_layers: int, input_scales) -> None:
    """Static activations: every linear's scale must be given, checked before anything is converted (or reduced
    over the group), so a missing one leaves the model as it was on every rank."""
    if scheme.activation != "static" or any(p.is_meta for p in model.parameters()):
        return
    names = [f"{layout.layers}.{li}.{n}" for li in range(n_layers)
             for n in (*layout.qkv, *layout.gate_up, layout.o_proj, layout.down_proj)]
    missing = [n for n in names if input_scales is None or n not in input_scales]
    if missing:
        raise TPFuseInputError(f"activation='static' needs input_scales for every decoder linear "
                               f"(calibrate_input_scales on the unsharded model); missing {missing[:3]}"
                               f"{' ...' if len(missing) > 3 else ''}")


def quantize_fp8(model: nn.Module, *, activation: str = "per_token", weight: str = "per_channel",
                 layout: Optional[TPLayout] = None, input_scales: Optional[Dict[str, float]] = None,
                 plan: Optional[TPLayout] = None) -> nn.Module:
    """Convert the decoder's q/k/v/o/gate/up/down linears of ``model`` to FP8 in place (see
    :mod:`~tpfuse.parallel.fp8`); embedding, norms and lm_head stay in the model dtype. Returns ``model``.

    ``model``: an unsharded Hugging Face model (real weights, or on the meta device: then only the structure
    changes, the values come from a checkpoint), or one :func:`~tpfuse.parallel.parallelize` returned (call it on
    every rank: scales that span ranks are reduced over the group; its FP8 layers replace the bf16 ones and its
    decode CUDA graphs are dropped, to be recaptured). ``activation``: ``"per_token"`` (dynamic) or ``"static"``
    (needs ``input_scales``: full module name -> scale, from :func:`calibrate_input_scales`); ``weight``:
    ``"per_channel"`` or ``"per_tensor"``. An unsharded model's ``config.quantization_config`` is set to the
    compressed-tensors description, so ``save_pretrained`` writes a checkpoint ``from_pretrained`` loads."""
    from .fp8_layer import FP8DecoderLayer

    scheme = FP8Scheme(activation, weight)
    st = getattr(model, "_tpfuse", None)
    layout = resolve_layout(layout, plan, "quantize_fp8")
    layout = st.layout if st is not None else (layout or layout_for(model))
    layers = get_path(model, layout.layers)
    _check_input_scales(model, layout, scheme, len(layers), input_scales)
    with torch.no_grad():
        for li in range(len(layers)):
            _convert_layer(model, f"{layout.layers}.{li}.", layout, scheme, st, input_scales)
            if st is not None:
                old = layers[li]
                layers[li] = FP8DecoderLayer(old, layout, li, num_heads=old.num_heads, num_kv_heads=old.num_kv_heads,
                                             head_dim=old.head_dim)
    if st is not None:
        link_quant(layers)
        st.graphs = None  # captured with the bf16 layers
    else:
        model.config.quantization_config = compressed_tensors_config(scheme, layout)
    return model


def calibrate_input_scales(model: nn.Module, input_ids: torch.Tensor, layout: Optional[TPLayout] = None,
                           plan: Optional[TPLayout] = None) -> Dict[str, float]:
    """Static activation scales (``amax / 448`` of each decoder linear's input over one forward of
    ``input_ids``) of an unsharded Hugging Face model, for ``quantize_fp8(activation="static")``."""
    layout = resolve_layout(layout, plan, "calibrate_input_scales") or layout_for(model)
    amax: Dict[str, float] = {}
    hooks = []
    for li, layer in enumerate(get_path(model, layout.layers)):
        for name in (*layout.qkv, *layout.gate_up, layout.o_proj, layout.down_proj):
            full = f"{layout.layers}.{li}.{name}"

            def hook(_mod, args, full=full):
                amax[full] = max(amax.get(full, 0.0), float(args[0].detach().abs().max()))
            hooks.append(get_path(layer, name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: max(v / 448.0, 1.0 / (448.0 * 512.0)) for k, v in amax.items()}


def compressed_tensors_config(scheme: FP8Scheme, layout: TPLayout) -> dict:
    """The ``quantization_config`` of a compressed-tensors FP8 checkpoint of this scheme (the lm_head and
    everything outside the decoder linears unquantized)."""
    per_token = scheme.activation == "per_token"
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                            "strategy": "channel" if scheme.weight == "per_channel" else "tensor"},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": per_token,
                                      "strategy": "token" if per_token else "tensor"}}},
            "ignore": [layout.lm_head]}


def scheme_from_config(qc) -> Optional[FP8Scheme]:
    """The :class:`FP8Scheme` of a checkpoint's ``quantization_config`` (``None`` if it has none); other
    quantization methods raise."""
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    groups = list((qc.get("config_groups") or {}).values())
    if qc.get("quant_method") != "compressed-tensors" or len(groups) != 1:
        raise TPFuseUnsupportedError(f"quantization_config {qc.get('quant_method')!r}: tpfuse loads compressed-tensors "
                                     f"FP8 checkpoints with one config group only")
    w, a = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    ok = (w.get("num_bits"), w.get("type"), a.get("num_bits"), a.get("type")) == (8, "float", 8, "float")
    if not ok or w.get("strategy") not in ("channel", "tensor") or a.get("strategy") not in ("token", "tensor"):
        raise TPFuseUnsupportedError(f"compressed-tensors scheme weights={w}, input_activations={a}: tpfuse runs FP8 "
                                     f"weights per channel / per tensor with per-token or static per-tensor inputs")
    return FP8Scheme(activation="per_token" if a.get("dynamic") else "static",
                     weight="per_channel" if w["strategy"] == "channel" else "per_tensor")
