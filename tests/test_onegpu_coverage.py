"""bench/tools/onegpu_coverage.py: which one-GPU tests still need a run at a TP size (``--todo``, what
``bench/gpu_run.sh onegpu`` runs with ``ONEGPU_TODO=1``)."""

import io
import json
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench", "tools"))

import onegpu_coverage as cov  # noqa: E402

F = "tests/distributed/test_x.py::"
COLLECTED = [F + "test_a[4096-tp4-onegpu]", F + "test_b[tp4-onegpu]", F + "test_c[tp4-onegpu]",
             F + "test_soak[tp2-onegpu]", F + "test_catalog[tokens/0_all_gather_tp2-onegpu]",
             F + "test_catalog[peer/hangs-onegpu]"]


def _summary(path, date, tp, cases):
    json.dump({"header": {"date": date, "commit": "c", "sharing": "mps"},
               "per_tp": {str(tp): {"files": {}, "cases": cases}}}, open(path, "w"))


def test_todo_is_what_has_not_passed_at_that_tp(tmp_path):
    # at TP 2: test_a and the catalog's hangs case passed (the same tests at another TP count nothing at TP 4)
    _summary(tmp_path / "onegpu_suite_1.json", "2026-12-06T10:00", 2,
             [[F + "test_a[4096-tp2-onegpu]", "passed", 1.0], [F + "test_catalog[peer/hangs-onegpu]", "passed", 1.0]])
    # at TP 4: test_a passed, test_b failed, test_c passed early and failed later
    _summary(tmp_path / "onegpu_suite_2.json", "2026-12-06T11:00", 4,
             [[F + "test_a[4096-tp4-onegpu]", "passed", 1.0], [F + "test_b[tp4-onegpu]", "failed", 1.0],
              [F + "test_c[tp4-onegpu]", "passed", 1.0]])
    _summary(tmp_path / "onegpu_suite_3.json", "2026-12-06T12:00", 4, [[F + "test_c[tp4-onegpu]", "failed", 1.0]])
    runs = cov.load(str(tmp_path))
    assert cov.todo(COLLECTED, runs, 4) == [F + "test_b[tp4-onegpu]", F + "test_c[tp4-onegpu]"]
    # TP 2: the soak (tp2 parameter) and the catalog (no TP parameter: the TP=2 suite; its own "_tp2" is a name)
    assert cov.todo(COLLECTED, runs, 2) == [F + "test_soak[tp2-onegpu]",
                                            F + "test_catalog[tokens/0_all_gather_tp2-onegpu]"]
    # only runs from a date on: test_a's pass at 11:00 no longer counts
    assert cov.todo(COLLECTED, runs, 4, after="2026-12-06T11:30") == COLLECTED[:3]


def test_todo_cli_prints_shell_quoted_ids(tmp_path, monkeypatch, capsys):
    _summary(tmp_path / "onegpu_suite_1.json", "2026-12-06T10:00", 4, [[F + "test_a[4096-tp4-onegpu]", "passed", 1]])
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(COLLECTED + ["", "6 tests collected"]) + "\n"))
    cov.main(["--results", str(tmp_path), "--todo", "4"])
    printed = capsys.readouterr().out.split("\n")[:-1]
    assert [shlex.split(p)[0] for p in printed] == COLLECTED[1:3]
    assert all(p.startswith("'") for p in printed)  # brackets never reach a shell glob
