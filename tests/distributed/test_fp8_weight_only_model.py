"""``KVCacheConfig(fp8_weight_only_max_tokens=N)``: FP8 layers in a step of at most N tokens (all-reduce form) run
their GEMMs weight-only (``FP8DecoderLayer.forward_weight_only``): every decoder GEMM is the small-M op with a bf16
x and the layer's e4m3 weight and scales, no activation is quantized (no quantize or SiLU*mul op, the norms write
bf16), and the logits match the fp64 oracle of the converted model (e4m3 weights dequantized, activations
unquantized) within the **bf16** budget, tighter than the FP8 one the activation-quantized form needs. Steps above N
(and sequence-parallel ones) run the checkpoint's activation scheme, as with the knob at 0.

CPU: gloo, TP 1 / 2 / 4, per-token / static activations, per-channel / per-tensor weights, fused checkpoints (phi3);
the small-M op's reference, one model through the interpreted Triton kernel. GPU: CUDA-graph decode weight-only with
and without programmatic dependent launch (bit for bit) and the eager steps, against the oracle.
"""

import os

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from cases import gpu_tp_params, make_comm, run_gpu  # noqa: E402
from harness import run_on_ranks  # noqa: E402

DT = torch.bfloat16
MOST = 8  # KVCacheConfig.fp8_weight_only_max_tokens of these tests
SP_MIN = 12  # TP > 1: prefills of 12 tokens and more run sequence-parallel


class Counts:
    """While installed: small-M GEMM calls with a bf16 x and an e4m3 weight (``w8``; ``folded``: those of the
    folded RMSNorm, with ``norm_sumsq`` or through ``small_m_gemm_add``), every ``ops.quantize`` / ``ops.silu_mul``
    call, and ``add_rmsnorm`` calls (local and the communicator's) asked for a quantized output."""

    def __init__(self, comm):
        from tpfuse import ops, small_gemm

        self.comm, self.sg, self.ops = comm, small_gemm, ops
        self.orig = (small_gemm.small_m_gemm, ops.quantize, ops.silu_mul, ops.add_rmsnorm, comm.fused_add_rmsnorm,
                     small_gemm.small_m_gemm_add)
        self.w8 = self.folded = self.quantize = self.silu = self.quant_norm = 0

    def __enter__(self):
        mm, quantize, silu, norm, comm_norm, mm_add = self.orig

        def counted_mm(x, w, **kw):
            w8 = x.dtype == DT and w.dtype == torch.float8_e4m3fn
            self.w8 += w8
            self.folded += w8 and kw.get("norm_sumsq") is not None
            return mm(x, w, **kw)

        def counted_add(x, w, *a, **kw):
            w8 = x.dtype == DT and w.dtype == torch.float8_e4m3fn
            self.w8 += w8
            self.folded += w8
            return mm_add(x, w, *a, **kw)

        def counted(kind, fn):
            def call(*a, **kw):
                setattr(self, kind, getattr(self, kind) + 1)
                return fn(*a, **kw)
            return call

        def norm_q(fn):
            def call(*a, quant=None, **kw):
                self.quant_norm += quant is not None
                return fn(*a, quant=quant, **kw)
            return call

        self.sg.small_m_gemm, self.sg.small_m_gemm_add = counted_mm, counted_add
        self.ops.quantize, self.ops.silu_mul = counted("quantize", quantize), counted("silu", silu)
        self.ops.add_rmsnorm, self.comm.fused_add_rmsnorm = norm_q(norm), norm_q(comm_norm)
        return self

    def __exit__(self, *exc):
        (self.sg.small_m_gemm, self.ops.quantize, self.ops.silu_mul, self.ops.add_rmsnorm,
         self.comm.fused_add_rmsnorm, self.sg.small_m_gemm_add) = self.orig
        if "fused_add_rmsnorm" in vars(self.comm):
            del self.comm.fused_add_rmsnorm  # the bound method again


def _unify_scales(model) -> None:
    """What ``parallelize`` does to the per-tensor scales of fused modules (q / k / v, gate / up: requantized to the
    group's largest, ``fp8_layer.build_gemm``), done to the unsharded model first so its oracle has those weights
    (the bf16 budget is below that requantization's error)."""
    from tpfuse.parallel import layout_for
    from tpfuse.parallel.fp8_layer import build_gemm
    from tpfuse.parallel.layers import get_path

    lay = layout_for(model)
    for layer in get_path(model, lay.layers):
        for paths in (lay.qkv, lay.gate_up):
            build_gemm([get_path(layer, p) for p in paths])


def _model(arch, act, weight, world, graph_safe=False, **cache_kw):
    """``graph_safe``: the all-reduce pinned to tpfuse's capturable kernel (GPU decode graphs at TP > 1)."""
    import tpfuse
    from tpfuse.parallel import KVCacheConfig, calibrate_input_scales, quantize_fp8

    ids = torch.randint(0, mc.VOCAB, (20,), generator=torch.Generator().manual_seed(9))
    model = mc.build(arch, 0).to(DT)
    scales = calibrate_input_scales(model, ids[None]) if act == "static" else None
    model = quantize_fp8(model, activation=act, weight=weight, input_scales=scales)
    if weight == "per_tensor":
        _unify_scales(model)
    ref = mc.oracle(model, ids)
    comm = make_comm(mc.HIDDEN, DT, 32, sp_min_tokens=SP_MIN, force_paths=mc.GRAPH_SAFE if graph_safe else {})
    cfg = KVCacheConfig(**{"max_batch": 2, "max_seq_len": 32, "fp8_weight_only_max_tokens": MOST, **cache_kw})
    return tpfuse.parallelize(model, comm, cache=cfg), comm, ids, ref


def _step(model, comm, ids, cache, device="cpu"):
    with Counts(comm) as c:
        out = model(ids[None].to(device), cache=cache, use_cache=True)
    return out.logits[0].float().cpu(), mc.cache_of(out), c


def _fma_launches(fma: bool) -> list:
    """With ``fma``: ``small_m_gemm.FMA_MAX_M`` 4 in this rank's process, and a list that collects whether each
    small-M launch took the CUDA-core loop."""
    from tpfuse.kernels import small_m_gemm as smg

    seen = []
    if fma:
        smg.FMA_MAX_M, decide = 4, smg.uses_fma
        smg.uses_fma = lambda x, w: seen.append(decide(x, w)) or seen[-1]
    return seen


def _weight_only_steps(rank, world, arch, act, weight, fold=True, fma=False):
    """A 6-token prefill and 3 decode steps weight-only (bf16 budget vs the oracle, 4 w8 GEMMs a layer, nothing
    quantized; at TP = 1 in a model without o / down biases with the RMSNorms folded into them where ``fold``:
    all but the first qkv GEMM folded); then a new sequence: a 12-token prefill above MOST (the activation scheme:
    quantize calls, FP8 budget) and one decode step weight-only again (FP8 budget: its cache holds the quantized
    prefill's K / V). ``fma``: the decode steps' GEMMs on the CUDA-core loop (``small_m_gemm.FMA_MAX_M`` 4)."""
    from tpfuse.tolerance import assert_logits_close

    fma_seen = _fma_launches(fma)
    model, comm, ids, ref = _model(arch, act, weight, world, fold_norms=fold)
    layers = len(model._tpfuse.layers)
    folds = fold and world == 1 and arch != "llama"  # the tiny llama has o / down biases
    errs, cache, pos = [], None, 0
    for t in (6, 1, 1, 1):
        logits, cache, c = _step(model, comm, ids[pos:pos + t], cache)
        assert (c.w8, c.folded, c.quantize, c.silu, c.quant_norm) == (
            4 * layers, 4 * layers - 1 if folds else 0, 0, 0, 0), (t, vars(c))
        errs.append(assert_logits_close(logits, ref[pos:pos + t], DT, f"{arch} TP={world} {act}/{weight} "
                                        f"weight-only {t} tokens at {pos}"))
        pos += t
    logits, cache, c = _step(model, comm, ids[:12], None)
    assert c.w8 == 0 and c.quant_norm > 0 and model._tpfuse.last_mode == (
        "sequence_parallel" if world > 1 else "allreduce"), vars(c)
    assert_logits_close(logits, ref[:12], DT, f"{arch} TP={world} 12-token prefill", fp8=True)
    logits, cache, c = _step(model, comm, ids[12:13], cache)
    assert (c.w8, c.quant_norm) == (4 * layers, 0), vars(c)
    assert_logits_close(logits, ref[12:13], DT, f"{arch} TP={world} decode after it", fp8=True)
    assert not fma or (any(fma_seen) and not all(fma_seen)), fma_seen  # decode steps on it, prefills not
    comm.close()
    return max(errs)


@pytest.mark.parametrize("arch,world,act,weight,fold", [("llama", 1, "per_token", "per_channel", True),
                                                        ("qwen3", 1, "per_token", "per_channel", True),  # folded
                                                        ("qwen3", 1, "static", "per_tensor", True),  # folded
                                                        ("qwen3", 1, "per_token", "per_channel", False),
                                                        ("qwen3", 2, "per_token", "per_tensor", True),
                                                        ("llama", 2, "static", "per_tensor", True),
                                                        ("mistral", 4, "per_token", "per_channel", True),
                                                        ("phi3", 2, "per_token", "per_channel", True)])
def test_weight_only_steps_match_the_oracle_in_bf16(arch, world, act, weight, fold):
    errs = run_on_ranks(_weight_only_steps, world, arch, act, weight, fold)
    assert len(errs) == world and all(0 < e for e in errs), errs


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter on CPU (a GPU runs the compiled kernel in "
                                                      "test_graph_decode_weight_only_matches_the_oracle)")
@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("fold,fma", [(True, False), (False, False), (True, True), (False, True)])
def test_weight_only_through_the_interpreted_kernel(fold, fma):
    """The same on the small-M Triton kernel (interpreter): e4m3 weights converted in the kernel, folded or not,
    on the tensor-core or the CUDA-core loop."""
    assert os.environ.get("TPFUSE_TRITON_CPU") == "1"
    errs = run_on_ranks(_weight_only_steps, 1, "qwen3", "per_token", "per_channel", fold, fma)
    assert 0 < errs[0], errs


def _off(rank, world):
    """The knob at 0 (and a step above it): the activation scheme, bit for bit as before it existed."""
    model, comm, ids, _ = _model("llama", "per_token", "per_channel", world, fp8_weight_only_max_tokens=0)
    logits, _, c = _step(model, comm, ids[:6], None)
    assert c.w8 == 0 and c.quantize > 0 and c.silu > 0 and c.quant_norm > 0, vars(c)
    model._tpfuse.cache_config.fp8_weight_only_max_tokens = 4
    again, _, c = _step(model, comm, ids[:6], None)
    assert c.w8 == 0 and torch.equal(logits, again), vars(c)
    comm.close()
    return True


def test_weight_only_off_and_above_its_tokens():
    assert all(run_on_ranks(_off, 2))


def test_config_rejects_bad_values():
    from tpfuse.errors import TPFuseInputError
    from tpfuse.parallel import KVCacheConfig

    for bad in (-1, 65, 1.5, True, "8"):
        with pytest.raises(TPFuseInputError, match="fp8_weight_only_max_tokens"):
            KVCacheConfig(fp8_weight_only_max_tokens=bad).validate()


def _graph_decode(rank, world, fma=False):
    """CUDA-graph decode weight-only, with and without PDL where the device has it (bit for bit), folded and (TP = 1)
    not, and eager steps, each against the oracle (bf16 budget); ``fma``: the decode GEMMs on the CUDA-core loop."""
    from tpfuse.kernels import pdl as pdl_launch
    from tpfuse.tolerance import assert_logits_close

    fma_seen = _fma_launches(fma)
    model, comm, ids, ref = _model("qwen3", "per_token", "per_channel", world, graph_safe=world > 1)
    st = model._tpfuse
    got = {}
    modes = [(False, False, True), (True, False, True), (True, True, True)]  # (graphs, pdl, fold_norms)
    modes += [(True, False, False), (True, True, False)] if world == 1 else []  # TP = 1 folds by default
    for graphs, pdl, fold in modes:
        if pdl and not pdl_launch.available(comm.device):
            continue
        st.graphs, st.cache_config.cuda_graphs, st.cache_config.pdl = None, graphs, pdl
        st.cache_config.fold_norms = fold
        logits, cache, c = _step(model, comm, ids[:6], None, "cuda")
        rows = [logits]
        for pos in range(6, 9):
            logits, cache, c = _step(model, comm, ids[pos:pos + 1], cache, "cuda")
            assert st.last_mode == ("decode_graph" if graphs else "allreduce"), st.last_mode
            assert c.quant_norm == 0, vars(c)
            rows.append(logits)
        got[graphs, pdl, fold] = torch.cat(rows)
    for fold in (True, False):
        if (True, True, fold) in got:
            assert torch.equal(got[True, True, fold], got[True, False, fold]), f"fold={fold}: PDL changed the logits"
    errs = [assert_logits_close(v, ref[:9], DT, f"weight-only graphs={k[0]} pdl={k[1]} fold={k[2]}")
            for k, v in got.items()]
    assert not fma or any(fma_seen), "no launch took the CUDA-core loop"
    comm.close()
    return errs


@pytest.mark.gpu
@pytest.mark.parametrize("fma", [False, True], ids=["mma", "fma"])
@pytest.mark.parametrize("tp", gpu_tp_params((1, 2)))
def test_graph_decode_weight_only_matches_the_oracle(tp, fma):
    errs = run_gpu(_graph_decode, tp, fma, timeout_s=600)
    assert all(0 < e for e in errs[0]), errs
