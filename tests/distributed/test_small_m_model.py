"""The small-M GEMM in the model path (``tpfuse.parallel`` layers, CPU, gloo, TP 1 / 2): with a synthetic routing
table whose rows say the kernel wins at every GEMM of the tiny models, every decode-sized GEMM of the all-reduce
form goes through ``tpfuse.small_gemm.small_m_gemm`` (qkv and gate-up with their biases fused, o and down, the
fused gate-up + SiLU*mul, for FP8-static models with its FP8 output), the sequence-parallel prefill does not, and
the logits still match the fp64 oracle. Without rows, or with rows where the kernel lost, the op is never called
and the logits are bit-identical to a run without any table (the plain ``F.linear`` / ``_scaled_mm`` path).

On CPU the op runs its reference (fp32 math, rounded once), as every local op does there; the kernel itself is
tested in tests/test_small_m_gemm.py.
"""

import pytest
import torch

pytest.importorskip("transformers", reason="tpfuse.parallelize tests need transformers (pip install 'tpfuse[hf]')")

import model_cases as mc  # noqa: E402
from cases import make_comm  # noqa: E402
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
        silu = None if x_row else "fp8_tensor_silu_q8"  # per-token FP8 is never fused (the row amax)
        return [(scheme, *g[k].weight.shape, silu if k == "gate_up" else None) for k in ("qkv", "o", "gate_up",
                                                                                         "down")]
    return [("bf16", *layer._fused["qkv"][0].shape, None), ("bf16", *layer._o.weight.shape, None),
            ("bf16", *layer._fused["gate_up"][0].shape, "bf16_silu"), ("bf16", *layer._down.weight.shape, None)]


def _table(model, beats: bool, silu: bool):
    from tpfuse.kernels import small_m_configs as smc

    rows = {}
    for layer in model._tpfuse.layers:
        for scheme, n, k, silu_scheme in _gemms(layer):
            for name in [scheme] + ([silu_scheme] if silu and silu_scheme else []):
                for b in smc.M_BUCKETS:
                    rows[(name, n, k, b)] = smc.table_row("cpu", name, n, k, b, smc.GemmConfig(), beats)
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
    """Logits of every step of :data:`STEPS` and the op calls ``[(step, M, N, K, silu, fp8 out)]``."""
    from tpfuse import small_gemm

    calls, orig = [], small_gemm.small_m_gemm

    def counted(x, weight, **kw):
        calls.append((step, x.shape[0], *weight.shape, kw.get("silu_mul", False), kw.get("out_scale") is not None))
        return orig(x, weight, **kw)

    small_gemm.small_m_gemm, logits, step = counted, [], 0
    try:
        for seq in STEPS:
            cache, pos = None, 0
            for t in seq:
                out = model(ids[None, pos:pos + t], cache=cache, use_cache=True)
                logits.append(out.logits[0].float())
                cache, pos, step = mc.cache_of(out), pos + t, step + 1
    finally:
        small_gemm.small_m_gemm = orig
    return logits, calls


def _routed(rank, world, arch, fp8, silu):
    import tpfuse
    from tpfuse.kernels import small_m_configs as smc
    from tpfuse.tolerance import assert_logits_close

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
                assert sum(c[4] for c in mine) == (n_layers if fused else 0)
                assert sum(c[5] for c in mine) == (n_layers if fused and fp8 else 0)
            errs.append(assert_logits_close(got[step], ref[pos:pos + t], DT, f"{arch} TP={world} fp8={fp8} step "
                                            f"{step}", fp8=bool(fp8)))
            pos, step = pos + t, step + 1
    comm.close()
    return max(errs)


@pytest.mark.parametrize("arch,world,fp8,silu", [
    ("llama", 1, None, True),                             # biased q/k/v and gate/up: bias fused into the kernel
    ("llama", 2, None, False),
    ("qwen3", 2, ("per_token", "per_channel"), True),     # per-token FP8: GEMMs routed, SiLU*mul never fused
    ("llama", 1, ("static", "per_tensor"), True),         # static FP8: gate-up + SiLU*mul + FP8 quant fused
])
def test_model_routes_decode_gemms_by_the_table(arch, world, fp8, silu):
    errs = run_on_ranks(_routed, world, arch, fp8, silu)
    assert len(errs) == world and all(0 < e for e in errs), errs
