"""``bench/results/INDEX.md`` lists every committed result with its header (commit, device, date): a result added
without regenerating the index fails here (``python bench/tools/index_results.py`` rewrites it)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_index_is_current():
    p = subprocess.run([sys.executable, "bench/tools/index_results.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_index_rows_carry_the_headers(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench", "tools"))
    import index_results

    (tmp_path / "x_h200.json").write_text('{"header": {"benchmark": "x", "device": "H200", "commit": "abc1234", '
                                          '"date": "2026-12-02"}, "rows": []}')
    (tmp_path / "x_h200.png").write_bytes(b"")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "gpu_run_abc1234_h200_e2e.log").write_text("")
    (tmp_path / "old.json").write_text("[1, 2]")
    text = index_results.render(str(tmp_path))
    assert "| `x_h200.json` | x | H200 | abc1234 | 2026-12-02 | `x_h200.png` | 1 |" in text
    assert "| `old.json` | - | - | - | - |  |  |" in text
