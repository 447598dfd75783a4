"""``KVCacheConfig(fold_attn_combine=True)`` in the model path: a decode step's attention leaves its split partials
(``tpfuse.attention_o.rope_decode_attention_partials``) and o_proj combines them (``attn_o_gemm``, or
``attn_o_gemm_add`` where the RMSNorms are folded too); the logits match the fp64 oracle (bf16 tolerance) and the
model without the fold. Where it cannot run it must not: FP8 layers, fp32 models, prefill.

The tiny models' sequences fit one default partition (128 keys), so the rank functions force 16-key tiles and
partitions (``decode_attention.pick_config``) to make every decode step combine several partials.

CPU: the ops' references (and, for one model, the Triton kernels through the interpreter), eager decode. GPU:
CUDA-graph decode with and without the fold, each with programmatic dependent launch where the device has it (PDL
must not change the logits), against the oracle.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from cases import gpu_tp_params, make_comm, run_gpu  # noqa: E402
from harness import run_on_ranks  # noqa: E402

DT = torch.bfloat16
PROMPT, DECODE = 20, 4


class Counts:
    """Counts the fold's calls in the layers (``tpfuse.parallel.layers``' names) while installed."""

    NAMES = ("rope_decode_attention_partials", "attn_o_gemm", "attn_o_gemm_add")

    def __init__(self):
        from tpfuse.parallel import layers

        self.mod = layers
        self.orig = {n: getattr(layers, n) for n in self.NAMES}
        self.calls = dict.fromkeys(self.NAMES, 0)

    def __enter__(self):
        def counted(name):
            def call(*a, **kw):
                self.calls[name] += 1
                return self.orig[name](*a, **kw)
            return call

        for n in self.NAMES:
            setattr(self.mod, n, counted(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.orig.items():
            setattr(self.mod, n, f)


def small_partitions():
    """16-key tiles and partitions in every decode attention launch of this process (the tiny models' sequences
    then span several)."""
    from tpfuse.kernels import decode_attention as dak

    pick = dak.pick_config

    def forced(*args, **kw):
        kw.update(block_n=16, min_partition=16)
        return pick(*args, **kw)

    dak.pick_config = forced


def _model(arch, world, fp8=None, dtype=DT, **cache_kw):
    import tpfuse
    from tpfuse.parallel import KVCacheConfig, quantize_fp8

    model = mc.build(arch, 0).to(dtype)
    ids = torch.randint(0, mc.VOCAB, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(5))
    ref = mc.oracle(model, ids)
    if fp8:
        model = quantize_fp8(model, activation="per_token", weight="per_channel")
    comm = make_comm(mc.HIDDEN, dtype, 96)
    cfg = KVCacheConfig(**{"max_batch": 2, "max_seq_len": 32, "fold_attn_combine": True, **cache_kw})
    return tpfuse.parallelize(model, comm, cache=cfg), comm, ids, ref


def _steps(model, ids, device="cpu"):
    """Prefill PROMPT tokens, then DECODE one-token steps; fp32 CPU logits per step."""
    return mc.decode_logits(model, ids[:PROMPT + DECODE], PROMPT, device)


def _folded(rank, world, arch, fold_norms):
    """Fold vs no fold vs the oracle; the fold's ops ran once a layer a decode step (the prefill never)."""
    from tpfuse.tolerance import assert_logits_close

    import os

    from kernel_env import LaunchRecorder
    from tpfuse.kernels import attn_o_gemm as kernel

    small_partitions()
    model, comm, ids, ref = _model(arch, world, fold_norms=fold_norms)
    n_layers = len(model._tpfuse.layers)
    rec = kernel._attn_o_gemm_kernel = LaunchRecorder(kernel._attn_o_gemm_kernel)
    with Counts() as c:
        got = _steps(model, ids)
    kernel._attn_o_gemm_kernel = rec.kernel
    interpreted = os.environ.get("TPFUSE_TRITON_CPU") == "1"  # else the ops' references ran
    assert len(rec.launches) == (n_layers * DECODE if interpreted else 0), len(rec.launches)
    folded_norms = fold_norms and world == 1 and arch != "llama"  # llama's tiny model has o / down biases
    want = {"rope_decode_attention_partials": n_layers * DECODE, "attn_o_gemm": 0 if folded_norms else n_layers * DECODE,
            "attn_o_gemm_add": n_layers * DECODE if folded_norms else 0}
    assert c.calls == want, (c.calls, want)
    model._tpfuse.cache_config.fold_attn_combine = False
    with Counts() as c:
        plain = _steps(model, ids)
    assert not any(c.calls.values()), c.calls
    errs = [assert_logits_close(got, ref, DT, f"{arch} folded"), assert_logits_close(plain, ref, DT, f"{arch} plain")]
    assert_logits_close(got, plain.double(), DT, f"{arch} folded vs plain")
    comm.close()
    return errs


@pytest.mark.parametrize("arch,world,fold_norms", [
    ("qwen3", 1, True),       # QK-norm; o_proj with the folded RMSNorm's epilogue
    ("mistral", 1, False),    # o_proj, then the add + RMSNorm kernel
    ("llama", 1, True),       # o / down biases: the norms stay unfolded, the bias goes into the residual
    ("qwen3", 2, True),       # TP 2: this rank's heads, then the fused all-reduce + add + RMSNorm
], ids=["qwen3_foldnorm", "mistral", "llama_bias", "qwen3_tp2"])
def test_fold_runs_and_matches_the_oracle(arch, world, fold_norms):
    errs = run_on_ranks(_folded, world, arch, fold_norms)
    assert all(0 < e for r in errs for e in r), errs


@pytest.mark.usefixtures("kernels")
def test_fold_through_the_interpreted_kernels():
    """The same on the Triton kernels (interpreter): the split kernel's partials and the folded o_proj in a whole
    model, with the RMSNorms folded too."""
    errs = run_on_ranks(_folded, 1, "qwen3", True)
    assert all(0 < e for e in errs[0]), errs


def _not_folded(rank, world, fp8, dtype):
    """fold_attn_combine=True where the fold cannot run: the plain path, bit for bit the model's without it."""
    small_partitions()
    model, comm, ids, _ = _model("qwen3", world, fp8=fp8, dtype=dtype)
    with Counts() as c:
        got = _steps(model, ids)
    assert not any(c.calls.values()), c.calls
    model._tpfuse.cache_config.fold_attn_combine = False
    assert torch.equal(got, _steps(model, ids))
    comm.close()
    return True


@pytest.mark.parametrize("fp8,dtype", [(True, DT), (False, torch.float32)], ids=["fp8", "fp32"])
def test_fold_stays_off_where_it_cannot_run(fp8, dtype):
    assert all(run_on_ranks(_not_folded, 1, fp8, dtype))


def _graph_decode(rank, world, arch):
    """CUDA-graph decode with and without the fold, each with and without PDL where the device has it: vs the
    oracle, and PDL bit-identical to no PDL (16-key partitions, as on the CPU)."""
    from tpfuse.kernels import pdl as pdl_launch
    from tpfuse.tolerance import assert_logits_close

    small_partitions()
    model, comm, ids, ref = _model(arch, world)
    st = model._tpfuse
    pdl_modes = (False, True) if pdl_launch.available(comm.device) else (False,)
    got = {}
    for fold in (True, False):
        for pdl in pdl_modes:
            st.graphs, st.cache_config.pdl, st.cache_config.fold_attn_combine = None, pdl, fold
            with Counts() as c:
                got[fold, pdl] = _steps(model, ids, "cuda")
            assert st.last_mode == "decode_graph", st.last_mode
            assert (c.calls["rope_decode_attention_partials"] > 0) == fold, c.calls  # the captures ran them
    errs = []
    for fold in (True, False):
        if True in pdl_modes:
            assert torch.equal(got[fold, True], got[fold, False]), f"fold={fold}: PDL changed logits"
        errs.append(assert_logits_close(got[fold, False], ref, DT, f"{arch} fold={fold}"))
    comm.close()
    return errs


@pytest.mark.gpu
@pytest.mark.parametrize("tp", gpu_tp_params((1, 2)))
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_graph_decode_folded_matches_the_oracle(tp, arch):
    errs = run_gpu(_graph_decode, tp, arch, timeout_s=600)
    assert all(0 < e for r in errs for e in r), errs
