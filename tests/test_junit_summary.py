"""bench/tools/junit_summary.py: counts per file, failures, the per-test list, and an interrupted run's nameless
testcase left out of the counts (else it counts as a passed test named ``.py``)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench", "tools"))

import junit_summary  # noqa: E402

XML = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.distributed.test_a" name="test_x[tp2-onegpu]" time="1.5"><properties>
<property name="replays" value="100000" /></properties></testcase>
<testcase classname="tests.distributed.test_a" name="test_y[tp2-onegpu]" time="2.0"><failure message="boom">t</failure></testcase>
<testcase classname="tests.distributed.test_b" name="test_z[tp2-onegpu]" time="0.1"><skipped message="s" /></testcase>
<testcase time="0.001" />
</testsuite></testsuites>"""


def test_summary_of_an_interrupted_run(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(XML)
    s = junit_summary.summarise(str(path))
    assert s["files"] == {"tests/distributed/test_a.py": {"passed": 1, "failed": 1},
                          "tests/distributed/test_b.py": {"skipped": 1}}
    assert s["interrupted"] and s["seconds"] == 3.6
    assert [f["test"] for f in s["failures"]] == ["tests/distributed/test_a.py::test_y[tp2-onegpu]"]
    assert s["cases"][0] == ["tests/distributed/test_a.py::test_x[tp2-onegpu]", "passed", 1.5]
    assert len(s["cases"]) == 3
    assert s["properties"] == {"tests/distributed/test_a.py::test_x[tp2-onegpu]": {"replays": "100000"}}


XML_B = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.distributed.test_a" name="test_w[tp2-onegpu]" time="0.5" />
<testcase classname="tests.distributed.test_c" name="test_v[tp2-onegpu]" time="1.0" />
</testsuite></testsuites>"""


def test_two_files_of_one_tp_are_merged(tmp_path, monkeypatch):
    """The onegpu step's concurrent groups write one XML each: one TP size's counts, cases and failures join."""
    import json

    a, b, out = tmp_path / "a.xml", tmp_path / "b.xml", tmp_path / "s.json"
    a.write_text(XML)
    b.write_text(XML_B)
    monkeypatch.setattr(sys, "argv", ["junit_summary", "--out", str(out), "--tp", "2", "2", "4", "--",
                                      str(a), str(b), str(tmp_path / "absent.xml")])
    junit_summary.main()
    per_tp = json.loads(out.read_text())["per_tp"]
    two = per_tp["2"]
    assert two["files"] == {"tests/distributed/test_a.py": {"passed": 2, "failed": 1},
                            "tests/distributed/test_b.py": {"skipped": 1},
                            "tests/distributed/test_c.py": {"passed": 1}}
    assert two["totals"] == {"passed": 3, "failed": 1, "skipped": 1}
    assert len(two["cases"]) == 5 and two["interrupted"] and two["seconds"] == 5.1
    assert [f["test"] for f in two["failures"]] == ["tests/distributed/test_a.py::test_y[tp2-onegpu]"]
    assert per_tp["4"]["missing"] == [str(tmp_path / "absent.xml")] and per_tp["4"]["totals"] == {}
