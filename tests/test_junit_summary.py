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
