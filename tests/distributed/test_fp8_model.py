"""FP8 models (``tpfuse.parallel.quantize_fp8``) on CPU: conversion, the compressed-tensors checkpoint layout, and
the parallelized FP8 model vs its fp64 oracle (gloo, bf16, TP 1 / 2 / 4; the FP8 GEMMs run the CPU emulation of
``torch._scaled_mm``, :func:`tpfuse.scaled_gemm.mm_reference`).

Oracle: the converted unsharded model in fp64 (its e4m3 weights dequantized exactly, activations unquantized), so
the budget (``tolerance.REL_ERR_LOGITS_FP8``) covers the activation quantization the fused kernels do. Every
prefill / decode step also checks that the decoder layers are FP8 layers and that the expected collectives ran.
"""

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")
pytest.importorskip("safetensors", reason="checkpoints need safetensors")

import model_cases as mc  # noqa: E402
from cases import make_comm  # noqa: E402
from harness import run_on_ranks  # noqa: E402
from test_checkpoint_load import assert_same_state  # noqa: E402

SP_MIN = 8
DT = torch.bfloat16


def _comm():
    return make_comm(mc.HIDDEN, DT, 32, sp_min_tokens=SP_MIN)


def _fp8_model(arch, act, weight, ids):
    from tpfuse.parallel import calibrate_input_scales, quantize_fp8

    model = mc.build(arch, 0).to(DT)
    scales = calibrate_input_scales(model, ids[None]) if act == "static" else None
    return quantize_fp8(model, activation=act, weight=weight, input_scales=scales)


def test_weight_quantization_and_scheme_round_trip():
    from tpfuse import quant as q
    from tpfuse.parallel import FP8Scheme, compressed_tensors_config, layout_for
    from tpfuse.parallel.fp8 import from_linear
    from tpfuse.parallel.fp8_convert import scheme_from_config
    from tpfuse.tolerance import fp8_step

    lin = torch.nn.Linear(64, 32, dtype=DT)
    for weight in ("per_channel", "per_tensor"):
        f8 = from_linear(lin, FP8Scheme(weight=weight))
        assert f8.weight.dtype == q.FP8_DTYPE and f8.weight_scale.dtype == torch.float32
        assert tuple(f8.weight_scale.shape) == ((32, 1) if weight == "per_channel" else (1,))
        w = lin.weight.float()
        step = fp8_step(w / f8.weight_scale) * f8.weight_scale
        assert ((f8.dequantized_weight(torch.float32) - w).abs() <= step * 1.001).all()
    for act, weight in (("per_token", "per_channel"), ("per_token", "per_tensor"), ("static", "per_tensor")):
        scheme = FP8Scheme(act, weight)
        cfg = compressed_tensors_config(scheme, layout_for(mc.build("llama", 0)))
        assert scheme_from_config(cfg) == scheme
    with pytest.raises(NotImplementedError, match="per-tensor weight scales"):
        FP8Scheme("static", "per_channel")
    with pytest.raises(NotImplementedError, match="compressed-tensors"):
        scheme_from_config({"quant_method": "fp8", "weight_block_size": [128, 128]})


def test_static_needs_input_scales():
    from tpfuse.parallel import quantize_fp8

    with pytest.raises(ValueError, match="input_scales"):
        quantize_fp8(mc.build("llama", 0).to(DT), activation="static", weight="per_tensor")


def _step(model, comm, ids, cache, mode):
    comm.last_path.clear()
    out = model(ids[None], cache=cache, use_cache=True)
    assert model._tpfuse.last_mode == (mode if comm.tp > 1 else "allreduce")
    if comm.tp > 1:
        want = {"all_gather_matmul", "matmul_reduce_scatter_rmsnorm", "all_gather"} if mode == "sequence_parallel" \
            else {"fused_add_rmsnorm"}
        assert set(comm.last_path) == want | {"all_reduce"}, comm.last_path  # + the vocab-parallel head's logits
    return out.logits[0], mc.cache_of(out)


def _vs_oracle(rank, world, arch, act, weight):
    import tpfuse
    from tpfuse.parallel import FP8DecoderLayer
    from tpfuse.tolerance import assert_logits_close

    ids = torch.randint(0, mc.VOCAB, (16,), generator=torch.Generator().manual_seed(7))
    model = _fp8_model(arch, act, weight, ids)
    ref = mc.oracle(model, ids)
    comm = _comm()
    model = tpfuse.parallelize(model, comm)
    assert all(isinstance(layer, FP8DecoderLayer) for layer in model._tpfuse.layers)
    for layer in model._tpfuse.layers:  # what KVCacheConfig.prefetch_o_proj prefetches: the o GEMM's e4m3 bytes
        w, o = layer._o.weight, layer._g["o"].weight
        assert (w.dtype, w.data_ptr(), w.numel()) == (o.dtype, o.data_ptr(), o.numel()) and w.is_contiguous()
    assert isinstance(model.model.layers[0].in_quant, tpfuse.FP8PerToken if act == "per_token" else tpfuse.FP8Static)
    errs = []
    for steps in ([6, 1, 1, 1], [11, 1, 1]):  # all-reduce prefill + decode; sequence-parallel prefill + decode
        cache, pos = None, 0
        for t in steps:
            mode = "sequence_parallel" if t >= SP_MIN else "allreduce"
            logits, cache = _step(model, comm, ids[pos:pos + t], cache, mode)
            errs.append(assert_logits_close(logits, ref[pos:pos + t], DT, f"{arch} TP={world} {act}/{weight} "
                                            f"{t} tokens at {pos}", fp8=True))
            pos += t
    comm.close()
    return max(errs)


@pytest.mark.parametrize("arch,world,act,weight", [("llama", 1, "per_token", "per_channel"),
                                                   ("qwen3", 2, "per_token", "per_tensor"),
                                                   ("llama", 2, "static", "per_tensor"),
                                                   ("llama", 4, "per_token", "per_channel"),
                                                   ("phi3", 2, "per_token", "per_channel")])  # scales by parts
def test_fp8_model_matches_oracle(arch, world, act, weight):
    errs = run_on_ranks(_vs_oracle, world, arch, act, weight)
    assert len(errs) == world and all(0 < e for e in errs), errs


def _checkpoint_round_trip(rank, world, arch, act, weight, path):
    import tpfuse
    from tpfuse.parallel import from_pretrained, quantize_fp8
    from tpfuse.tolerance import assert_logits_close

    ids = torch.randint(0, mc.VOCAB, (16,), generator=torch.Generator().manual_seed(7))
    if rank == 0:
        _fp8_model(arch, act, weight, ids).save_pretrained(path)  # compressed-tensors layout
    dist.barrier()
    comm = _comm()
    loaded = from_pretrained(path, comm, dtype=DT)
    before = tpfuse.parallelize(_fp8_model(arch, act, weight, ids), comm)  # convert, then shard
    assert_same_state(loaded, before)
    if act == "per_token":  # shard, then convert: the same shards (scales spanning ranks are reduced)
        after = quantize_fp8(tpfuse.parallelize(mc.build(arch, 0).to(DT), comm), activation=act, weight=weight)
        assert_same_state(after, before)
    # logits vs the oracle, not vs `before`: the loaded model's rotary module is rebuilt with fp32 inv_freq, while
    # `.to(bf16)` rounded the converted model's (both are what transformers' own forward does on those models)
    ref = mc.oracle(_fp8_model(arch, act, weight, ids), ids)
    assert_logits_close(loaded(ids[None, :5], use_cache=False).logits[0], ref[:5], DT, "loaded", fp8=True)
    comm.close()
    return True


@pytest.mark.parametrize("arch,world,act,weight", [("llama", 2, "per_token", "per_channel"),
                                                   ("qwen3", 4, "per_token", "per_tensor"),
                                                   ("llama", 1, "static", "per_tensor"),
                                                   ("phi3", 2, "per_token", "per_channel")])  # read by parts
def test_compressed_tensors_checkpoint_round_trip(arch, world, act, weight, tmp_path):
    import json

    assert run_on_ranks(_checkpoint_round_trip, world, arch, act, weight, str(tmp_path / "ckpt")) == [True] * world
    qc = json.load(open(tmp_path / "ckpt" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
        q = "model.layers.0.self_attn." + ("qkv_proj" if arch == "phi3" else "q_proj")  # both 128 output rows
        assert tuple(fh.get_tensor(q + ".weight_scale").shape) == ((128, 1) if weight == "per_channel" else (1,))
        assert (q + ".input_scale" in fh.keys()) == (act == "static")
        assert fh.get_tensor("lm_head.weight").dtype == DT
