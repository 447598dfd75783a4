"""The launch-configuration table of the local kernels (tpfuse.kernels.local_configs) and the config sweep's
plumbing (bench/local_sweep.py): bucket rules, the fallback to the pre-table launch rule, repair of invalid entries,
baking a sweep's winners into the table, and one sweep driven end to end through the Triton interpreter with a
fake clock (every candidate must really be launched with its config; the JSON's winners must bake back exactly)."""

import importlib.util
import json
import os
import sys

import pytest

from kernel_env import ON_GPU, record_launches
from tpfuse.kernels import local_configs as lc
from tpfuse.kernels.local_configs import LaunchConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_token_buckets_nearest_in_log2():
    cases = {1: 1, 2: 1, 4: 1, 5: 16, 16: 16, 45: 16, 46: 128, 362: 128, 363: 1024, 2896: 1024, 2897: 8192,
             16384: 8192, 16385: 32768, 10 ** 6: 32768}
    assert {t: lc.token_bucket(t) for t in cases} == cases


def test_default_config_is_the_pre_table_rule():
    # add_rmsnorm: max(4, min(16, BLOCK // 512)) warps, whole row
    assert [lc.default_config("add_rmsnorm", 5, h, 1).num_warps for h in (1000, 4096, 5120, 8192, 16384)] == \
        [4, 8, 16, 16, 16]
    # silu_mul: tiles of min(next_pow2(I), 2048) (>= 128), max(4, min(16, tile // 256)) warps; per-token: whole row
    assert lc.default_config("silu_mul", 0, 14336, 1) == LaunchConfig(8, block=2048)
    assert lc.default_config("silu_mul", 1, 48, 1) == LaunchConfig(4, block=128)
    assert lc.default_config("silu_mul", 2, 14336, 1) == LaunchConfig(16, block=16384)
    # quantize: tiles of min(next_pow2(H), 4096), max(4, min(16, tile // 512)) warps
    assert lc.default_config("quantize", 3, 8192, 1) == LaunchConfig(8, block=4096)
    assert lc.default_config("quantize", 5, 256, 1) == LaunchConfig(4, block=256)


def test_lookup_uses_table_then_default(monkeypatch):
    monkeypatch.setattr(lc, "TABLE", {("add_rmsnorm", "nvfp4", 8192, 1): LaunchConfig(8, split=4)})
    assert lc.lookup("add_rmsnorm", 5, 8192, 3) == LaunchConfig(8, split=4)    # T=3 -> bucket 1
    assert lc.lookup("add_rmsnorm", 4, 7000, 1) == LaunchConfig(8, split=4)    # linear scales share "nvfp4"
    assert lc.lookup("add_rmsnorm", 5, 8192, 5) == LaunchConfig(16)            # bucket 16: not in the table
    assert lc.lookup("add_rmsnorm", 3, 8192, 1) == LaunchConfig(16)            # other format
    with lc.forced(LaunchConfig(4, rows=2)):
        assert lc.lookup("add_rmsnorm", 5, 8192, 1) == LaunchConfig(4, rows=2)
    assert lc.lookup("add_rmsnorm", 5, 8192, 1) == LaunchConfig(8, split=4)


def test_sanitize_repairs_invalid_entries():
    s = lc.sanitize
    assert s("add_rmsnorm", 2, 4096, 16, LaunchConfig(8, split=4)).split == 1            # per-token: whole row
    assert s("add_rmsnorm", 3, 512, 128, LaunchConfig(4, split=8)).split == 4           # slice >= group, >= 128
    assert s("add_rmsnorm", 0, 8192, 16, LaunchConfig(3, rows=3, block=64)) == LaunchConfig(16)
    assert s("silu_mul", 3, 640, 128, LaunchConfig(4, block=64)).block == 128
    assert s("silu_mul", 0, 640, 16, LaunchConfig(4, block=8192)).block == 1024         # not wider than the row
    assert s("quantize", 2, 640, 16, LaunchConfig(4, block=256, split=2)) == LaunchConfig(4, block=1024)


def test_table_entries_are_valid_and_keyed_by_buckets():
    for (op, fmt, hb, tb), cfg in lc.TABLE.items():
        assert op in lc.OPS and fmt in lc.FORMATS and tb in lc.TOKEN_BUCKETS and hb == lc.next_pow2(hb)
        fid = lc.FORMATS.index(fmt) if fmt != "nvfp4" else 5
        assert lc.sanitize(op, fid, hb, 128, cfg) == cfg, (op, fmt, hb, tb, cfg)


def _import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    return mod


def test_bake_rewrites_only_the_generated_block(tmp_path):
    entries = {("add_rmsnorm", "nvfp4", 8192, 1): LaunchConfig(8, split=4),
               ("silu_mul", "none", 16384, 32768): LaunchConfig(8, block=4096, rows=2),
               ("quantize", "fp8_group", 4096, 16): LaunchConfig(4, block=1024)}
    src = open(lc.__file__).read()
    out = lc.bake(src, entries)
    b0, b1 = out.index("# BEGIN GENERATED TABLE"), out.index("# END GENERATED TABLE")
    s0, s1 = src.index("# BEGIN GENERATED TABLE"), src.index("# END GENERATED TABLE")
    assert out[:b0] == src[:s0] and out[out.index("\n", b1):] == src[src.index("\n", s1):]
    path = tmp_path / "local_configs_baked.py"
    path.write_text(out)
    mod = _import_file(str(path), "local_configs_baked")
    assert {k: v.short() for k, v in mod.TABLE.items()} == {k: v.short() for k, v in entries.items()}
    assert lc.bake(out, entries) == out  # idempotent


def test_install_overlays_winners():
    sweep = {"best": [dict(op="silu_mul", format="fp8_group", hidden_bucket=16384, token_bucket=1,
                           config=dict(num_warps=4, block=1024, rows=1, split=1, num_stages=3))]}
    shipped_2, shipped_64 = lc.lookup("silu_mul", 3, 14336, 2), lc.lookup("silu_mul", 3, 14336, 64)
    try:
        assert lc.install(sweep) == 1
        assert lc.lookup("silu_mul", 3, 14336, 2) == LaunchConfig(4, block=1024)
        assert lc.lookup("silu_mul", 3, 14336, 64) == shipped_64  # other buckets: the shipped table / default
    finally:
        lc.install({"best": []})
    assert lc.lookup("silu_mul", 3, 14336, 2) == shipped_2  # the overlay is gone


# --------------------------------------------------------------------------------------------------------------
# the sweep, end to end on the CPU (interpreter) with a fake clock


@pytest.mark.skipif(ON_GPU, reason="CPU plumbing test (the GPU runs the real sweep)")
def test_sweep_end_to_end_interpreted(tmp_path, monkeypatch, kernels):
    import common
    import local_sweep

    buckets = [("add_rmsnorm", "none", 4096), ("quantize", "fp8_group", 1024)]
    cands = {op: local_sweep.candidates(op, fmt, w, 1) for op, fmt, w in buckets}
    fake_us = {("add_rmsnorm", "w4s4"): 7.0, ("quantize", "w4b512"): 9.95}  # else 10 + a tiny per-config offset
    launches, timed, current_op = [], [], [None]

    class Args:
        budget_s, sweep_tokens, precompile_workers, out_dir = 1e9, "1", -1, str(tmp_path)
        sweep_ops = "add_rmsnorm,quantize"

    orig_call = local_sweep.call

    def call(op, args, spec):
        current_op[0] = op
        return orig_call(op, args, spec)

    def fake_time_graph(fns, target_s, min_trials, max_trials):
        assert len(fns) == 1 and target_s > 0 and min_trials <= max_trials
        cfg = lc._FORCED
        fns[0]()  # runs the interpreted kernel under the candidate config
        timed.append((current_op[0], cfg, launches[-1]))
        return fake_us.get((current_op[0], cfg.short()), 10.0 + 0.001 * len(cfg.short()))

    monkeypatch.setattr(local_sweep, "call", call)
    record_launches(monkeypatch, kernels.add_rmsnorm, "_add_rmsnorm_kernel", launches)
    record_launches(monkeypatch, kernels.quantize, "_quantize_kernel", launches)
    path = local_sweep.run_sweep(Args, fake_time_graph, lambda nbytes: 1, 1, common, device="cpu",
                                 bucket_list=buckets)
    data = json.load(open(path))
    best = {b["op"]: b for b in data["best"]}
    # pass 1 times every candidate once, in order, and each launch carries that candidate's grid / constexprs
    for op in cands:
        assert [c for o, c, _ in timed if o == op][:len(cands[op])] == cands[op]
    assert len(cands["add_rmsnorm"]) >= 6 and LaunchConfig(4, split=4) in cands["add_rmsnorm"]
    for op, cfg, (grid, kw) in timed:
        assert (kw.get("SPLIT", 1), kw["ROWS"], kw["num_warps"]) == (cfg.split, cfg.rows, cfg.num_warps), (op, cfg)
        assert grid == ((1, cfg.split) if op == "add_rmsnorm" else (1024 // cfg.block,)), (op, cfg)
        if op == "quantize":
            assert kw["BLOCK"] == cfg.block
    # winners: the clearly faster split config; the default where the best is within the 1% noise guard
    assert best["add_rmsnorm"]["label"] == "w4s4"
    assert (best["add_rmsnorm"]["hidden_bucket"], best["add_rmsnorm"]["token_bucket"]) == (4096, 1)
    assert LaunchConfig(4, block=512) in cands["quantize"]
    assert best["quantize"]["label"] == best["quantize"]["default_label"] == cands["quantize"][0].short()
    n_pass2 = sum(1 for t in data["timings"] if t["pass"] == 2)
    assert len(data["timings"]) == len(timed) == sum(map(len, cands.values())) + n_pass2 and 2 <= n_pass2 <= 8
    # baking the JSON gives exactly those table entries
    target = tmp_path / "local_configs.py"
    target.write_text(open(lc.__file__).read())
    local_sweep.bake(path, str(target))
    mod = _import_file(str(target), "local_configs_from_sweep")
    assert {k: v.short() for k, v in mod.TABLE.items()} == {
        ("add_rmsnorm", "none", 4096, 1): "w4s4", ("quantize", "fp8_group", 1024, 1): cands["quantize"][0].short()}
