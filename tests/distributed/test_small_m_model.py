"""The small-M GEMM in the model path (``tpfuse.parallel`` layers, CPU, gloo, TP 1 / 2): with a synthetic routing
table whose rows say the kernel wins at every GEMM of the tiny models, every decode-sized GEMM of the all-reduce
form goes through ``tpfuse.small_gemm.small_m_gemm`` (qkv and gate-up with their biases fused, o and down, the
fused gate-up + SiLU*mul, for FP8-static models with its FP8 output), the sequence-parallel prefill does not, and
the logits still match the fp64 oracle. Without rows, or with rows where the kernel lost, the op is never called
and the logits are bit-identical to a run without any table (the plain ``F.linear`` / ``_scaled_mm`` path).

On CPU the op runs its reference (fp32 math, rounded once), as every local op does there; the kernel itself is
tested in tests/test_small_m_gemm.py. On a GPU (TP 1 and the GPU suite's sizes, ``cases.GPU_TPS``) the same table
sends the decode steps of CUDA-graph-replayed decode (bf16, per-channel FP8, static FP8) to the Triton kernel, and
graph decode with the kernel, graph decode without it, and the fp64 oracle agree: what a shipped sweep table does
to a user's model; each also captured with programmatic dependent launch (``KVCacheConfig.pdl``), which must give
the same logits bit for bit.
"""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from cases import GPU_TPS, gpu_tp_params, make_comm, run_gpu  # noqa: E402
from harness import run_on_ranks  # noqa: E402

SP_MIN = 8
DT = torch.bfloat16
STEPS = ([6, 1, 1, 1], [11, 1])  # all-reduce prefill + decode; sequence-parallel prefill (TP > 1) + decode


def _gemms(layer):
    """``(scheme, N, K, silu_scheme)`` of a parallelized layer's GEMMs as the layer calls them."""
    from tpfuse import quant as q
    from tpfuse.parallel import FP8DecoderLayer

    if isinstance(layer, FP8DecoderLayer):
        g = layer._g
        x_row = type(layer.in_quant) is q.FP8PerToken
        scheme = "fp8_row" if x_row else "fp8_tensor"  # per-token models' weight scales are [N, 1] (row-wise)
        silu = None if x_row else "fp8_tensor_silu_q8"  # per-token: the amax chain instead (below)
        return [(scheme, *g[k].weight.shape, silu if k == "gate_up" else None) for k in ("qkv", "o", "gate_up",
                                                                                         "down")]
    return [("bf16", *layer._fused["qkv"][0].shape, None), ("bf16", *layer._o.weight.shape, None),
            ("bf16", *layer._fused["gate_up"][0].shape, "bf16_silu"), ("bf16", *layer._down.weight.shape, None)]


def _table(model, beats: bool, silu: bool, arch: str = "cpu"):
    from tpfuse.kernels import small_m_configs as smc

    rows = {}
    for layer in model._tpfuse.layers:
        for scheme, n, k, silu_scheme in _gemms(layer):
            for name in [scheme] + ([silu_scheme] if silu and silu_scheme else []):
                for b in smc.M_BUCKETS:
                    rows[(name, n, k, b)] = smc.table_row(arch, name, n, k, b, smc.GemmConfig(), beats)
    return {"schema": 1, "source": {"device": "synthetic"}, "rows": list(rows.values())}


def _model(arch, fp8):
    from tpfuse.parallel import calibrate_input_scales, quantize_fp8

    ids = torch.randint(0, mc.VOCAB, (16,), generator=torch.Generator().manual_seed(7))
    model = mc.build(arch, 0).to(DT)
    if fp8:
        act, weight = fp8
        scales = calibrate_input_scales(model, ids[None]) if act == "static" else None
        model = quantize_fp8(model, activation=act, weight=weight, input_scales=scales)
    return model, ids


def _run(model, comm, ids):
    """Logits of every step of :data:`STEPS` and the op calls ``[(step, M, N, K, silu, fp8 out, amax)]``: amax
    "amax" for ``small_m_gemm_amax`` (the FP8 gate-up with its partial maxima), "" for ``small_m_gemm``."""
    from tpfuse import small_gemm

    calls, orig, orig_amax = [], small_gemm.small_m_gemm, small_gemm.small_m_gemm_amax

    def counted(x, weight, **kw):
        calls.append((step, x.shape[0], *weight.shape, kw.get("silu_mul", False), kw.get("out_scale") is not None,
                      ""))
        return orig(x, weight, **kw)

    def counted_amax(x, weight, **kw):
        calls.append((step, x.shape[0], *weight.shape, kw.get("silu_mul", False), False, "amax"))
        return orig_amax(x, weight, **kw)

    small_gemm.small_m_gemm, small_gemm.small_m_gemm_amax, logits, step = counted, counted_amax, [], 0
    try:
        for seq in STEPS:
            cache, pos = None, 0
            for t in seq:
                out = model(ids[None, pos:pos + t], cache=cache, use_cache=True)
                logits.append(out.logits[0].float())
                cache, pos, step = mc.cache_of(out), pos + t, step + 1
    finally:
        small_gemm.small_m_gemm, small_gemm.small_m_gemm_amax = orig, orig_amax
    return logits, calls


def _routed(rank, world, arch, fp8, silu, chain_max_m):
    import tpfuse
    from tpfuse import small_gemm
    from tpfuse.kernels import small_m_configs as smc
    from tpfuse.tolerance import assert_logits_close

    small_gemm.AMAX_CHAIN_MAX_M = chain_max_m

    model, ids = _model(arch, fp8)
    ref = mc.oracle(model, ids)
    comm = make_comm(mc.HIDDEN, DT, 32, sp_min_tokens=SP_MIN)
    model = tpfuse.parallelize(model, comm)
    n_layers = len(model._tpfuse.layers)
    with smc.install(None):
        base, none_calls = _run(model, comm, ids)
    with smc.install(_table(model, beats=False, silu=silu)):
        lost, lost_calls = _run(model, comm, ids)
    with smc.install(_table(model, beats=True, silu=silu)):
        got, calls = _run(model, comm, ids)
    assert none_calls == [] and lost_calls == [], "a table without winning rows must not route"
    assert all(torch.equal(a, b) for a, b in zip(base, lost)), "no winning row: logits must be the plain path's, bit for bit"
    shapes = {(scheme, n, k) for scheme, n, k, _ in _gemms(model._tpfuse.layers[0])}
    fused = silu and any(s for *_, s in _gemms(model._tpfuse.layers[0]))
    per_token = bool(fp8) and fp8[0] == "per_token"
    inter = model._tpfuse.layers[0]._g["gate_up"].weight.shape[0] // 2 if fp8 else 0  # SiLU*mul's width a rank
    errs, pos, step = [], 0, 0
    for seq in STEPS:
        pos = 0
        for t in seq:
            mine = [c for c in calls if c[0] == step]
            sp = world > 1 and t >= SP_MIN
            assert len(mine) == (0 if sp else 4 * n_layers), (step, t, mine)
            if not sp:
                assert {(n, k) for _, _, n, k, *_ in mine} == {(n, k) for _, n, k in shapes}, (mine, shapes)
                assert all(c[1] == t for c in mine)
                # per-token FP8: gate-up + SiLU*mul with its partial maxima, then quantize_from_amax
                chain = per_token and t <= chain_max_m and inter % 32 == 0
                assert sum(c[4] for c in mine) == (n_layers if fused or chain else 0)
                assert sum(c[5] for c in mine) == (n_layers if fused and fp8 else 0)
                assert [c[6] for c in mine].count("amax") == (n_layers if chain else 0), mine
            errs.append(assert_logits_close(got[step], ref[pos:pos + t], DT, f"{arch} TP={world} fp8={fp8} step "
                                            f"{step}", fp8=bool(fp8)))
            pos, step = pos + t, step + 1
    comm.close()
    return max(errs)


@pytest.mark.parametrize("arch,world,fp8,silu,chain_max_m", [
    ("llama", 1, None, True, 16),                          # biased q/k/v and gate/up: bias fused into the kernel
    ("llama", 2, None, False, 16),
    ("qwen3", 2, ("per_token", "per_channel"), True, 16),  # per-token FP8: the amax chain at every decode step
    ("llama", 1, ("per_token", "per_channel"), True, 4),   # ... at the steps of at most 4 tokens (biased gate-up)
    ("llama", 1, ("static", "per_tensor"), True, 16),      # static FP8: gate-up + SiLU*mul + FP8 quant fused
])
def test_model_routes_decode_gemms_by_the_table(arch, world, fp8, silu, chain_max_m):
    errs = run_on_ranks(_routed, world, arch, fp8, silu, chain_max_m)
    assert len(errs) == world and all(0 < e for e in errs), errs


def _graph_decode(model, ids, prompt):
    """Prefill ``ids[:prompt]``, then decode the rest one token a step (CUDA-graph replays); fp32 CPU logits."""
    out = model(ids[None, :prompt].cuda(), use_cache=True)
    logits, cache = [out.logits[0].float().cpu()], mc.cache_of(out)
    for pos in range(prompt, len(ids)):
        out = model(ids[None, pos:pos + 1].cuda(), cache=cache, use_cache=True)
        logits.append(out.logits[0].float().cpu())
        cache = mc.cache_of(out)
    assert model._tpfuse.last_mode == "decode_graph", model._tpfuse.last_mode
    return torch.cat(logits)


def _routed_graph_decode(rank, world, arch, fp8):
    """Graph decode of one sequence four ways: the library GEMMs and the small-M kernel (a table where it wins at
    every GEMM), each captured without and with programmatic dependent launch (``KVCacheConfig.pdl``; sm_90 and
    later). Each vs the fp64 oracle; PDL changes when a kernel starts, never what it computes (the same kernels
    but for the wait / trigger instructions, every reduction deterministic, the all-reduce pinned to one kernel),
    so its logits must equal the same graph's without it bit for bit; a missing wait could show as a difference.
    The same with the streaming kernels' trigger right after their wait (``pdl.EARLY_TRIGGER``, mode "early") and
    with the rope-split kernel's reads before its wait (``decode_attention.HOIST_LOADS`` 2, mode "hoist") and with
    the GEMMs' 1 MiB weight prefetch before theirs (``small_m_gemm.PREFETCH_BYTES``, mode "gpf")."""
    import tpfuse
    from tpfuse import small_gemm
    from tpfuse.kernels import decode_attention as dak
    from tpfuse.kernels import pdl as pdl_launch
    from tpfuse.kernels import small_m_configs as smc
    from tpfuse.kernels import small_m_gemm as smg
    from tpfuse.parallel import KVCacheConfig
    from tpfuse.tolerance import assert_logits_close

    model, ids = _model(arch, fp8)
    ref = mc.oracle(model, ids)
    cfg = tpfuse.CommConfig(force_paths=mc.GRAPH_SAFE if world > 1 else {})
    comm = tpfuse.TPCommunicator(max_tokens=32, hidden_size=mc.HIDDEN, dtype=DT, config=cfg)
    model = tpfuse.parallelize(model, comm, cache=KVCacheConfig(max_batch=2, max_seq_len=64))
    st, dev_arch = model._tpfuse, small_gemm.device_info(comm.device)[0]
    table = _table(model, beats=True, silu=True, arch=dev_arch)
    calls, orig = [], small_gemm.small_m_gemm
    small_gemm.small_m_gemm = lambda x, w, **kw: calls.append(x.shape[0]) or orig(x, w, **kw)
    pdl_modes = (False, True, "early", "hoist", "gpf") if pdl_launch.available(comm.device) else (False,)  # sm_90+
    engaged, wanted = [], pdl_launch.wanted  # the launchers ask pdl.wanted by attribute: count its yeses
    pdl_launch.wanted = lambda t: engaged.append(wanted(t)) or engaged[-1]
    got, own_pdl, own_early, own_hoist = {}, st.cache_config.pdl, pdl_launch.EARLY_TRIGGER, dak.HOIST_LOADS
    own_pf = smg.PREFETCH_BYTES
    try:
        for routed in (False, True):
            for pdl in pdl_modes:
                engaged.clear()
                st.graphs, st.cache_config.pdl = None, bool(pdl)  # captured anew under this variant
                pdl_launch.EARLY_TRIGGER = pdl == "early"
                dak.HOIST_LOADS = 2 if pdl == "hoist" else own_hoist
                smg.PREFETCH_BYTES = 1 << 20 if pdl == "gpf" else own_pf
                with smc.install(table if routed else None):
                    got[routed, pdl] = _graph_decode(model, ids, 6)
                if not routed:
                    assert not calls, "no table: the library GEMMs"
                assert any(engaged) == bool(pdl), f"PDL launches: {sum(engaged)} with pdl={pdl}"
    finally:
        small_gemm.small_m_gemm, pdl_launch.wanted = orig, wanted
        st.graphs, st.cache_config.pdl, pdl_launch.EARLY_TRIGGER = None, own_pdl, own_early
        dak.HOIST_LOADS, smg.PREFETCH_BYTES = own_hoist, own_pf
    assert calls and 1 in calls and max(calls) <= 6, calls  # the decode GEMMs (and the prefill's) ran the kernel
    what = f"{arch} TP={world} fp8={fp8}"
    for routed in (False, True):
        for pdl in pdl_modes[1:]:
            assert torch.equal(got[routed, pdl], got[routed, False]), f"{what} routed={routed}: PDL {pdl} changed logits"
    errs = [assert_logits_close(got[True, False], ref, DT, f"{what} kernel", fp8=bool(fp8)),
            assert_logits_close(got[False, False], ref, DT, f"{what} library", fp8=bool(fp8))]
    comm.close()
    return errs


@pytest.mark.gpu
@pytest.mark.parametrize("tp", gpu_tp_params((1,) + GPU_TPS))
@pytest.mark.parametrize("arch,fp8", [("llama", None), ("qwen3", ("per_token", "per_channel")),
                                      ("llama", ("static", "per_tensor"))], ids=["bf16", "fp8_row", "fp8_static"])
def test_graph_decode_through_the_kernel_and_with_pdl_matches_the_oracle(tp, arch, fp8):
    errs = run_gpu(_routed_graph_decode, tp, arch, fp8, timeout_s=600)
    assert all(0 < e for pair in errs for e in pair), errs


def _bench_rows(rank, world, table_path):
    """``bench_e2e.variant_rows`` on a tiny model: the ``tpfuse_smallm`` row of one decode batch."""
    import argparse
    import os
    import sys

    import tpfuse
    from tpfuse.parallel import KVCacheConfig

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
    import bench_e2e

    bench_e2e.VOCAB = mc.VOCAB  # the prompts' ids must fit the tiny vocabulary
    model, _ = _model("llama", None)
    comm = make_comm(mc.HIDDEN, DT, 32)
    model = tpfuse.parallelize(model, comm, cache=KVCacheConfig(max_batch=2, max_seq_len=32))
    with open(table_path) as fh:
        rows_in = json.load(fh)["rows"]
    if not rows_in:  # the test's placeholder: this model's shapes, the kernel winning everywhere
        with open(table_path, "w") as fh:
            json.dump(_table(model, beats=True, silu=True), fh)
    rows, args = [], argparse.Namespace(small_m_table=table_path, pdl_ab=False, context=8, steps=2)
    bench_e2e.variant_rows(model, 2, args, comm.device, rows, dict(model="tiny", mode="decode", tokens=2), "tpfuse")
    from tpfuse.kernels import pdl

    available = pdl.available(comm.device)
    comm.close()
    return rows, available


@pytest.mark.parametrize("winning", [True, False])
def test_bench_e2e_small_m_rows_route_by_the_given_table(tmp_path, winning):
    """The benchmark's A/B row (``bench_e2e.py --small-m-table``) times the decode step with that table installed:
    a table whose rows win routes every decode GEMM of the step, one whose rows lose routes none."""
    path = str(tmp_path / "table.json")
    with open(path, "w") as fh:
        json.dump({"schema": 1, "source": None, "rows": []}, fh)
    if not winning:  # a table of this model's shapes where the library won
        run_on_ranks(_bench_rows, 1, path)
        with open(path) as fh:
            table = json.load(fh)
        for r in table["rows"]:
            r["beats_library"] = False
        with open(path, "w") as fh:
            json.dump(table, fh)
    (row,), available = run_on_ranks(_bench_rows, 1, path)[0]
    assert row["provider"] == "tpfuse_smallm" and row["table"] == "table.json" and "error" not in row, row
    # the model's own KVCacheConfig.pdl (the default: _smallm changes the table only), where this device has it
    assert row["pdl"] is available
    assert row["us"] > 0
    # distinct calls at M = 2 (the step) and M = 16 (the prefill of 2 x 8 tokens): qkv and the fused gate-up +
    # SiLU*mul (both 256 x 64, told apart by the epilogue) and o / down (both 64 x 128: one key)
    assert row["routed"] == (6 if winning else 0), row
