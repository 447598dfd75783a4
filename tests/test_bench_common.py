"""``bench/common.py`` pieces that every benchmark's numbers rest on: the copy-bandwidth ceiling behind the memory
floors, and the ratio plots (a panel with the baseline alone has nothing to plot and must not warn)."""

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import common  # noqa: E402


def test_copy_bandwidths_on_cpu():
    ways = common.copy_bandwidths("cpu", 1 << 20)
    assert set(ways) == {"graph"} and ways["graph"] > 0  # CPU: wall time only (no CUDA events)


def test_ratio_plot_panel_with_the_baseline_alone(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(panel="decode", tokens=t, us=10.0 * t, provider=p) for t in (1, 8) for p in ("tpfuse", "other")]
    rows += [dict(panel="prefill", tokens=1024, us=5.0, provider="tpfuse")]  # the baseline alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = common.plot_ratio_panels(str(tmp_path / "r.png"), rows, panel=("panel",), x="tokens", y="us",
                                        baseline="tpfuse", ylabel="ratio", title="t")
    assert os.path.getsize(path) > 0
