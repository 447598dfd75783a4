"""``KVCacheConfig(fold_norms=True)`` in the model path: at TP = 1 every step of at most 64 tokens runs each residual
add + RMSNorm inside the GEMMs around it (``tpfuse.small_gemm.small_m_gemm_add`` for o / down, ``small_m_gemm``
with ``norm_sumsq`` for qkv and gate-up + SiLU*mul), and no add + RMSNorm op runs inside the layers; the logits
match the fp64 oracle (bf16 tolerance) and the unfused model's. Where the fold cannot run it must not: TP > 1 (the
fused all-reduce does the add + RMSNorm), FP8 layers, models with o / down biases, steps above 64 tokens.

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
PROMPT, DECODE = 6, 3


class Counts:
    """Counts the fold's op calls and the add + RMSNorm op calls (``ops.add_rmsnorm``) while installed."""

    def __init__(self):
        from tpfuse import ops, small_gemm

        self.mods = (small_gemm, ops)
        self.orig = (small_gemm.small_m_gemm, small_gemm.small_m_gemm_add, ops.add_rmsnorm)
        self.normed = self.add = self.norm = 0

    def __enter__(self):
        mm, add, norm = self.orig
        sg, ops = self.mods

        def counted_mm(x, w, **kw):
            self.normed += kw.get("norm_sumsq") is not None
            return mm(x, w, **kw)

        def counted_add(*a, **kw):
            self.add += 1
            return add(*a, **kw)

        def counted_norm(*a, **kw):
            self.norm += 1
            return norm(*a, **kw)

        sg.small_m_gemm, sg.small_m_gemm_add, ops.add_rmsnorm = counted_mm, counted_add, counted_norm
        return self

    def __exit__(self, *exc):
        sg, ops = self.mods
        sg.small_m_gemm, sg.small_m_gemm_add, ops.add_rmsnorm = self.orig


def _model(arch, world, fold, fp8=None, dtype=DT, **cache_kw):
    import tpfuse
    from tpfuse.parallel import KVCacheConfig, quantize_fp8

    model = mc.build(arch, 0).to(dtype)
    ids = torch.randint(0, mc.VOCAB, (PROMPT + DECODE,), generator=torch.Generator().manual_seed(5))
    ref = mc.oracle(model, ids)
    if fp8:
        model = quantize_fp8(model, activation="per_token", weight="per_channel")
    comm = make_comm(mc.HIDDEN, dtype, 96)
    cfg = KVCacheConfig(**{"max_batch": 2, "max_seq_len": 32, "fold_norms": fold, **cache_kw})
    return tpfuse.parallelize(model, comm, cache=cfg), comm, ids, ref


def _steps(model, ids, device="cpu"):
    """Prefill PROMPT tokens, then DECODE one-token steps; fp32 CPU logits per step."""
    return mc.decode_logits(model, ids[:PROMPT + DECODE], PROMPT, device)


def _folded(rank, world, arch):
    """Fold vs no fold vs the oracle; the fold's ops ran and no add + RMSNorm inside the layers (the embedding's
    norm and the final norm remain: 2 a step)."""
    from tpfuse.tolerance import assert_logits_close

    import os

    from kernel_env import LaunchRecorder
    from tpfuse.kernels import small_m_gemm as kernel

    model, comm, ids, ref = _model(arch, world, fold=True)
    n_layers, steps = len(model._tpfuse.layers), 1 + DECODE
    rec = kernel._small_m_gemm_norm_kernel = LaunchRecorder(kernel._small_m_gemm_norm_kernel)
    with Counts() as c:
        got = _steps(model, ids)
    kernel._small_m_gemm_norm_kernel = rec.kernel
    assert (c.add, c.normed, c.norm) == (2 * n_layers * steps, (2 * n_layers - 1) * steps, 2 * steps), vars(c)
    interpreted = os.environ.get("TPFUSE_TRITON_CPU") == "1"  # else the ops' references ran
    assert len(rec.launches) == (c.add + c.normed if interpreted else 0), (len(rec.launches), vars(c))
    model._tpfuse.cache_config.fold_norms = False
    with Counts() as c:
        plain = _steps(model, ids)
    assert c.add == 0 and c.normed == 0 and c.norm == (2 * n_layers + 1) * steps, vars(c)
    errs = [assert_logits_close(got, ref, DT, f"{arch} folded"), assert_logits_close(plain, ref, DT, f"{arch} plain")]
    assert_logits_close(got, plain.double(), DT, f"{arch} folded vs plain")
    comm.close()
    return errs


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "mistral"])
def test_fold_runs_and_matches_the_oracle(arch):
    errs = run_on_ranks(_folded, 1, arch)
    assert all(0 < e for e in errs[0]), errs


@pytest.mark.usefixtures("kernels")
def test_fold_through_the_interpreted_kernels():
    """The same on the Triton kernels (interpreter): the fold's kernels in a whole model."""
    errs = run_on_ranks(_folded, 1, "qwen3")
    assert all(0 < e for e in errs[0]), errs


def _not_folded(rank, world, arch, fp8, dtype):
    """fold_norms=True where the fold cannot run: the plain path, bit for bit the unfolded model's logits."""
    model, comm, ids, _ = _model(arch, world, fold=True, fp8=fp8, dtype=dtype)
    with Counts() as c:
        got = _steps(model, ids)
    model._tpfuse.cache_config.fold_norms = False
    plain = _steps(model, ids)
    assert c.add == 0 and c.normed == 0, vars(c)
    assert torch.equal(got, plain)
    comm.close()
    return True


@pytest.mark.parametrize("arch,world,fp8,dtype", [
    ("qwen3", 2, False, DT),                 # TP > 1: the fused all-reduce + add + RMSNorm
    ("qwen3", 1, True, DT),                  # FP8 layers
    ("llama", 1, False, DT),                 # o / down biases
    ("qwen3", 1, False, torch.float16),      # fp16: the un-normalized rows h * w_norm may overflow it
], ids=["tp2", "fp8", "row_bias", "fp16"])
def test_fold_stays_off_where_it_cannot_run(arch, world, fp8, dtype):
    assert all(run_on_ranks(_not_folded, world, arch, fp8, dtype))


def _long_prefill(rank, world):
    """A prefill of 2 x 40 = 80 tokens (above small_gemm.MAX_M) runs unfolded; the decode step after it folds."""
    model, comm, _, _ = _model("qwen3", world, fold=True, max_seq_len=48)
    ids = torch.randint(0, mc.VOCAB, (2, 41), generator=torch.Generator().manual_seed(8))
    with Counts() as c:
        out = model(ids[:, :40], use_cache=True)
    assert c.add == 0 and c.normed == 0, vars(c)
    with Counts() as c:
        model(ids[:, 40:], cache=mc.cache_of(out), use_cache=True)
    assert c.add == 2 * len(model._tpfuse.layers), vars(c)
    comm.close()
    return True


def test_fold_only_up_to_64_tokens():
    assert all(run_on_ranks(_long_prefill, 1))


def _graph_decode(rank, world, arch):
    """CUDA-graph decode folded and plain, each with and without PDL where the device has it: vs the oracle, and
    PDL bit-identical to no PDL."""
    from tpfuse.kernels import pdl as pdl_launch
    from tpfuse.tolerance import assert_logits_close

    model, comm, ids, ref = _model(arch, world, fold=True)
    st = model._tpfuse
    pdl_modes = (False, True) if pdl_launch.available(comm.device) else (False,)
    got = {}
    for fold in (True, False):
        for pdl in pdl_modes:
            st.graphs, st.cache_config.pdl, st.cache_config.fold_norms = None, pdl, fold
            with Counts() as c:
                got[fold, pdl] = _steps(model, ids, "cuda")
            assert st.last_mode == "decode_graph", st.last_mode
            assert (c.add > 0) == fold, vars(c)  # the prefill and the captures ran the fold's ops
    errs = []
    for fold in (True, False):
        if True in pdl_modes:
            assert torch.equal(got[fold, True], got[fold, False]), f"fold={fold}: PDL changed logits"
        errs.append(assert_logits_close(got[fold, False], ref, DT, f"{arch} fold={fold}"))
    comm.close()
    return errs


@pytest.mark.gpu
@pytest.mark.parametrize("tp", gpu_tp_params((1,)))
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_graph_decode_folded_matches_the_oracle(tp, arch):
    errs = run_gpu(_graph_decode, tp, arch, timeout_s=600)
    assert all(0 < e for e in errs[0]), errs
