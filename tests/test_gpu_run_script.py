"""bench/gpu_run.sh's onegpu step, on CPU: how a TP size's tests split into two pytest runs at once (ONEGPU_GROUPS),
what each run is told (TPFUSE_ONE_GPU_PROCESSES, its JUnit file), and that a failure of either fails the step.
The script is sourced (it then defines its functions and returns before installing anything); ``timeout``, which
its ``run`` wraps every command in, is replaced by a stub that prints the command and exits as told."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSED = "tests/distributed/test_fused_ar_gpu.py"
FAULT = "tests/distributed/test_fault_gpu.py"
CATALOG = "tests/distributed/test_fault_catalog.py"
ASYNC_ID = "tests/distributed/test_async_tp_gpu.py::test_x[a b-tp8-onegpu]"


def _onegpu_tp(tmp_path, groups, targets, fail_b=False):
    """Source the script, stub ``timeout``, call ``onegpu_tp 8 onegpu TARGET...``; returns (stdout, per-run logs)."""
    script = f"""
source bench/gpu_run.sh
OUT={tmp_path}; status=0; xmls=(); tps=()
timeout() {{ shift 4; printf 'ARG<%s>\\n' "$@"
  [[ "$*" == *onegpu_tp8_b.xml* && -n "{'1' if fail_b else ''}" ]] && return 1
  [[ "$*" == *onegpu_tp8_solo.xml* ]] && return 5  # pytest: no test selected
  return 0; }}
ONEGPU_GROUPS={groups} onegpu_tp 8 onegpu "$@"
echo "XMLS=${{xmls[*]}}"; echo "TPS=${{tps[*]}}"; echo "STATUS=$status"
"""
    res = subprocess.run(["bash", "-c", script, "test"] + targets, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    logs = {p.name: p.read_text() for p in tmp_path.glob("onegpu_tp8*.log")}
    return res.stdout, logs


def _line(out, key):
    return next(ln[len(key) + 1:] for ln in out.splitlines() if ln.startswith(key + "="))


def test_two_groups_split_by_file_and_size_the_grid_for_both(tmp_path):
    out, logs = _onegpu_tp(tmp_path, 2, [FUSED, FAULT, ASYNC_ID, CATALOG])
    a, b, solo = logs["onegpu_tp8.log"], logs["onegpu_tp8_b.log"], logs["onegpu_tp8_solo.log"]
    # the catalog's second-or-less bounds: alone, after both groups, at its own size (nothing selected is no failure)
    assert CATALOG in solo and CATALOG not in a + b and "TPFUSE_ONE_GPU_PROCESSES=8" in solo
    assert "TPFUSE_ONE_GPU_PROCESSES=16" in a and "TPFUSE_ONE_GPU_PROCESSES=16" in b
    assert "--basetemp=/tmp/tpfuse-pytest-onegpu_tp8 " in a and "--basetemp=/tmp/tpfuse-pytest-onegpu_tp8_b " in b
    assert FUSED in a and FAULT not in a and "test_async_tp_gpu" not in a
    assert FAULT in b and FUSED not in b
    assert "test_x\\[a\\ b-tp8-onegpu\\]" in b  # a test id with brackets and a space reaches pytest as one word
    assert _line(out, "XMLS") == " ".join(f"{tmp_path}/onegpu_tp8{s}.xml" for s in ("", "_b", "_solo"))
    assert _line(out, "TPS") == "8 8 8" and _line(out, "STATUS") == "0"
    assert "2 pytest runs at once" in out


def test_one_group_runs_everything_in_one_pytest(tmp_path):
    out, logs = _onegpu_tp(tmp_path, 1, [FUSED, FAULT, CATALOG])
    assert set(logs) == {"onegpu_tp8.log"}
    assert "TPFUSE_ONE_GPU_PROCESSES=8" in logs["onegpu_tp8.log"] and FAULT in logs["onegpu_tp8.log"]
    assert CATALOG in logs["onegpu_tp8.log"]
    assert _line(out, "TPS") == "8"


def test_only_second_group_files_run_alone_at_full_grid(tmp_path):
    out, logs = _onegpu_tp(tmp_path, 2, [FAULT])
    assert set(logs) == {"onegpu_tp8.log"} and "TPFUSE_ONE_GPU_PROCESSES=8" in logs["onegpu_tp8.log"]


def test_a_failing_second_group_fails_the_step(tmp_path):
    out, _ = _onegpu_tp(tmp_path, 2, [FUSED, FAULT], fail_b=True)
    assert _line(out, "STATUS") == "1"
