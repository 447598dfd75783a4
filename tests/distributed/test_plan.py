"""plan(): the path chosen per op at sizes on either side of each threshold, the AR <-> SP switch, fallbacks and
their reasons, overrides (CommConfig, $TPFUSE_THRESHOLDS), and table validation."""

import json
import os

import pytest
import torch

import tpfuse
from harness import run_on_ranks
from tpfuse import thresholds
from tpfuse.errors import TPFuseInputError

# a table with round numbers, so the boundaries below are exact
TABLE = {
    "schema": 1,
    "rows": [
        {"arch": "sm90", "tp": 2, "dtype": "bfloat16", "source": {"kind": "test"}, "sp_min_bytes": 1 << 20,
         "paths": {op: [{"max_bytes": 4096, "path": "tpfuse_oneshot"}, {"max_bytes": 65536, "path": "tpfuse_twoshot"},
                        {"max_bytes": None, "path": "nccl"}] for op in thresholds.OPS}},
        {"arch": "sm90", "tp": "*", "dtype": "*", "source": {"kind": "test"}, "sp_min_bytes": 2 << 20,
         "paths": {op: [{"max_bytes": 1024, "path": "flashinfer_oneshot"}, {"max_bytes": None, "path": "nccl"}]
                   for op in thresholds.OPS}},
        {"arch": "*", "tp": "*", "dtype": "*", "source": {"kind": "test"}, "sp_min_bytes": 3 << 20,
         "paths": {op: [{"max_bytes": None, "path": "reference"}] for op in thresholds.OPS}},
    ],
}


def _plans(rank, world, table_path):
    cfg = tpfuse.CommConfig(arch="sm90", thresholds_path=table_path)
    comm = tpfuse.TPCommunicator(max_tokens=4096, hidden_size=64, dtype=torch.bfloat16, config=cfg)
    out = {}
    for t in (0, 1, 8, 9, 32, 33, 512, 513, 4096):
        p = comm.plan(t)
        out[t] = (p.mode, {op: (c.preferred, c.path, c.fallback is not None) for op, c in p.ops.items()},
                  p.table, str(p))
    return out


def test_plan_choices_either_side_of_thresholds(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TABLE))
    tp2 = run_on_ranks(_plans, 2, str(path))
    assert tp2[0] == tp2[1], "plans must be identical on every rank"
    plans = tp2[0]
    # hidden 64 x bf16 = 128 B per token: 4096 B = 32 tokens, 65536 B = 512 tokens, SP from 1 MiB = 8192 tokens
    pref = {t: plans[t][1]["fused_add_rmsnorm"][0] for t in plans}
    assert pref[1] == pref[32] == "tpfuse_oneshot"
    assert pref[33] == pref[512] == "tpfuse_twoshot"
    assert pref[513] == pref[4096] == "nccl"
    assert pref[0] == "tpfuse_oneshot"
    # on CPU/gloo none of those paths exists: what runs is the reference, with the reason recorded
    for t, (mode, ops, table, text) in plans.items():
        for op, (preferred, ran, has_reason) in ops.items():
            assert ran == "reference" and has_reason, (t, op)
        assert "row 0 [sm90/tp2/bfloat16]" in table
        assert mode == "allreduce"
    assert "needs an NCCL group" in plans[4096][3]
    # TP=4 falls to the (sm90, *, *) row
    tp4 = run_on_ranks(_plans, 4, str(path))[0]
    assert tp4[8][1]["all_reduce"][0] == "flashinfer_oneshot" and tp4[9][1]["all_reduce"][0] == "nccl"
    assert "row 1 [sm90/tp*/*]" in tp4[1][2]


def _shipped_plan(rank, world, hidden, tokens, arch):
    comm = tpfuse.TPCommunicator(max_tokens=1 << 15, hidden_size=hidden, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(arch=arch))
    p = comm.plan(tokens)
    return p.mode, p.ops["fused_add_rmsnorm"].preferred, p.ops["fused_add_rmsnorm"].path, p.table


def test_shipped_table_sm90_tp2():
    # the shipped table: decode sizes take the one-shot kernel, prefill sizes switch to sequence parallelism
    mode, pref, path, table = run_on_ranks(_shipped_plan, 2, 8192, 1, "sm90")[0]
    assert (mode, pref, path) == ("allreduce", "tpfuse_oneshot", "reference")
    assert table.endswith("[sm90/tp2/bfloat16/h8192]") and "default.json" in table  # the tuned row for hidden 8192
    assert run_on_ranks(_shipped_plan, 2, 5120, 1, "sm90")[0][3].endswith("[sm90/tp2/*]")  # other hiddens
    # the AR -> SP switch at 64 MiB (E2E measurement): 4095 x 8192 x 2 B is below it, 4096 tokens reach it
    assert run_on_ranks(_shipped_plan, 2, 8192, 4095, "sm90")[0][0] == "allreduce"
    assert run_on_ranks(_shipped_plan, 2, 8192, 4096, "sm90")[0][0] == "sequence_parallel"
    # the CPU row: only the reference path; the SP switch at 1 MiB (hidden 256 bf16: 2048 tokens)
    assert run_on_ranks(_shipped_plan, 2, 256, 2047, None)[0][:3] == ("allreduce", "reference", "reference")
    assert run_on_ranks(_shipped_plan, 2, 256, 2048, None)[0][0] == "sequence_parallel"
    # unknown GPU arch: generic row (NCCL)
    assert run_on_ranks(_shipped_plan, 2, 256, 1, "sm75")[0][1] == "nccl"


def _overrides(rank, world, table_path):
    base = dict(max_tokens=4096, hidden_size=64, dtype=torch.bfloat16)
    # sp_min_tokens overrides the table
    c = tpfuse.TPCommunicator(**base, config=tpfuse.CommConfig(sp_min_tokens=10))
    assert c.plan(9).mode == "allreduce" and c.plan(10).mode == "sequence_parallel"
    # a forced path that cannot run here makes that op raise (never a silent fallback); the other ops still run
    c = tpfuse.TPCommunicator(**base, config=tpfuse.CommConfig(force_paths={"all_reduce": "tpfuse_oneshot"}))
    assert "cannot run here" in c.plan(1)["all_reduce"].error and c.plan(1)["all_gather"].error is None
    with pytest.raises(TPFuseInputError, match="cannot run here"):
        c.all_reduce(torch.ones(1, 64, dtype=torch.bfloat16))
    shard = torch.ones(1, 64, dtype=torch.bfloat16)
    assert torch.equal(c.all_gather(shard, num_tokens=world), torch.ones(world, 64, dtype=torch.bfloat16))
    # a forced path that can run is used and reported
    c = tpfuse.TPCommunicator(**base, config=tpfuse.CommConfig(arch="sm90", force_paths={"all_reduce": "reference"}))
    assert c.plan(1)["all_reduce"].fallback == "forced by CommConfig"
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    assert torch.equal(c.all_reduce(x), x * world) and c.last_path["all_reduce"] == "reference"
    # allowed_paths excludes nccl: the reason says so
    c = tpfuse.TPCommunicator(**base, config=tpfuse.CommConfig(arch="sm90", allowed_paths=frozenset({"reference"})))
    assert "not in allowed_paths" in c.plan(1)["fused_add_rmsnorm"].fallback
    # $TPFUSE_THRESHOLDS points at another table; CommConfig.thresholds_path wins over it
    os.environ["TPFUSE_THRESHOLDS"] = table_path
    try:
        c = tpfuse.TPCommunicator(**base, config=tpfuse.CommConfig(arch="sm90"))
        assert c.table.path == os.path.abspath(table_path)
        c = tpfuse.TPCommunicator(**base, config=tpfuse.CommConfig(arch="sm90", thresholds_path=thresholds.DEFAULT_TABLE))
        assert c.table.path == thresholds.DEFAULT_TABLE
    finally:
        del os.environ["TPFUSE_THRESHOLDS"]
    return True


def test_overrides(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TABLE))
    assert run_on_ranks(_overrides, 2, str(path)) == [True, True]


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.pop("schema"), "schema"),
    (lambda t: t["rows"][0]["paths"].pop("all_gather"), "no buckets for op 'all_gather'"),
    (lambda t: t["rows"][0]["paths"]["all_reduce"].reverse(), "ascending|last bucket"),
    (lambda t: t["rows"][0]["paths"]["all_reduce"].pop(), "last bucket must have max_bytes null"),
    (lambda t: t["rows"][0].update(tp=0), "'tp' must be"),
    (lambda t: t["rows"][0]["paths"].update(bogus=[]), "unknown ops"),
    (lambda t: t["rows"][0].pop("sp_min_bytes"), "lacks"),
])
def test_malformed_tables_are_rejected(tmp_path, mutate, match):
    table = json.loads(json.dumps(TABLE))
    mutate(table)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(table))
    with pytest.raises(thresholds.ThresholdsError, match=match):
        thresholds.load(str(path))


@pytest.mark.parametrize("kwargs,match", [
    (dict(sp_min_tokens=-5), "sp_min_tokens"),
    (dict(sp_min_tokens=0), "sp_min_tokens"),
    (dict(sp_min_tokens=2.5), "sp_min_tokens"),
    (dict(sp_min_tokens=True), "sp_min_tokens"),
    (dict(timeout_s=0), "timeout_s"),
    (dict(timeout_s=float("nan")), "timeout_s"),
    (dict(force_paths={"all_reduce": None}), "force_paths"),
    (dict(allowed_paths="nccl"), "allowed_paths"),
    (dict(pipe_producers=0), "pipe_producers"),
    (dict(pipe_producers=2.0), "pipe_producers"),
])
def test_bad_config_values_are_rejected(kwargs, match):
    with pytest.raises(tpfuse.errors.TPFuseInputError, match=match):
        tpfuse.CommConfig(**kwargs)


def test_config_accepts_any_set_of_allowed_paths():
    assert tpfuse.CommConfig(allowed_paths={"nccl"}, sp_min_tokens=1).allowed_paths == frozenset({"nccl"})


def test_renamed_paths_are_accepted_under_their_former_names(tmp_path):
    with pytest.warns(DeprecationWarning, match="was renamed") as warned:
        cfg = tpfuse.CommConfig(force_paths={"reduce_scatter_rmsnorm": "tpfuse_rs"}, allowed_paths={"tpfuse_ag"})
    assert sorted(str(w.message) for w in warned) == [
        "CommConfig: path 'tpfuse_ag' was renamed 'tpfuse_all_gather'",
        "CommConfig: path 'tpfuse_rs' was renamed 'tpfuse_reduce_scatter'"]
    assert cfg.force_paths == {"reduce_scatter_rmsnorm": "tpfuse_reduce_scatter"}
    assert cfg.allowed_paths == frozenset({"tpfuse_all_gather"})
    table = json.loads(json.dumps(TABLE))  # a table from a sweep run before the rename
    table["rows"][0]["paths"]["all_gather"] = [{"max_bytes": None, "path": "tpfuse_ag"}]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(table))
    assert thresholds.load(str(path)).rows[0].paths["all_gather"] == [(None, "tpfuse_all_gather")]


def test_table_rows_cite_their_source():
    for row in thresholds.load().rows:
        assert row.source.get("kind"), f"row {row.key()} has no source"
        if row.source["kind"] in ("seeded", "measured", "measured+seeded"):
            assert row.source.get("file") and row.source.get("device"), row.key()


def test_workspaces_are_allocated_only_where_the_table_can_route_to_them():
    """table_routes decides whether a backend allocates its symmetric workspace (hundreds of MiB on a GPU)."""
    from types import SimpleNamespace

    from tpfuse.dispatch import table_routes

    table = thresholds.load()

    def fake(tp, hidden, max_tokens, force=None):
        return SimpleNamespace(config=tpfuse.CommConfig(force_paths=force or {}), max_tokens=max_tokens,
                               hidden_size=hidden, dtype=torch.bfloat16,
                               row=table.lookup("sm90", tp, "bfloat16", hidden))

    fused, sp = ("tpfuse_oneshot", "tpfuse_twoshot"), ("tpfuse_async_tp", "tpfuse_reduce_scatter", "tpfuse_all_gather")
    assert table_routes(fake(2, 8192, 16), fused)              # decode sizes take the one-shot kernel
    assert not table_routes(fake(2, 8192, 16), sp)              # 256 KiB: nothing SP-sized fits
    assert table_routes(fake(2, 8192, 4096), sp)                # 64 MiB reaches the SP paths
    assert not table_routes(fake(8, 8192, 8192), fused + sp)    # TP=8 rows: NCCL only, until measured
    assert table_routes(fake(8, 8192, 8, force={"all_reduce": "tpfuse_oneshot"}), fused)


def _former_workspace_attributes(rank, world):
    comm = tpfuse.TPCommunicator(max_tokens=8, hidden_size=16)
    for old, new in (("workspace", "fused_allreduce"), ("async_tp", "async_tp"), ("flashinfer", "flashinfer")):
        with pytest.warns(DeprecationWarning, match=rf"TPCommunicator.{old} is deprecated: .*get\('{new}'\)"):
            assert getattr(comm, old) is None  # gloo: no GPU workspace
    with pytest.raises(AttributeError):
        comm.not_an_attribute
    comm.close()
    return True


def test_former_workspace_attributes_warn():
    assert run_on_ranks(_former_workspace_attributes, 1) == [True]
