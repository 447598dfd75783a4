"""Rebuild ``bench_e2e.py`` rows (+ its PNG) from the per-size lines it printed, for a run cut off before it wrote
its JSON. The header records ``"transcribed_from"`` (the log) and the run's device / commit given on the command
line.

    python bench/tools/e2e_log_to_json.py LOG OUT.json --device "..." --commit dce74c5 --date 2026-11-22

Lines: ``[8B decode 1] us/step (4 layers): nocomm=375  unfused=583  ...  tpfuse/nocomm=1.055 ...``.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import transcribe  # noqa: E402 - bench/tools, beside this file


def parse(text):
    rows = []
    for line in text.splitlines():
        m = re.match(r"\[(\S+) (decode|prefill) (\d+)\] us/step \((\d+) layers\): (.*)", line)
        if not m:
            continue
        model, mode, t, layers, rest = m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), m.group(5)
        for prov, us in re.findall(r"(?<![/\w])([a-z_]+)=([0-9.]+)(?!\S*/)", rest):
            rows.append({"model": model, "mode": mode, "tokens": t, "layers": layers, "provider": prov,
                         "us_per_step": float(us), "us_per_layer": float(us) / layers})
    return rows


def main():
    out, rows, hdr = transcribe.cli(__doc__, parse, benchmark="e2e",
                                    header=lambda rows: {"tp": 2, "layers": rows[0]["layers"] if rows else None})
    import common  # bench/ (on the path above)

    base = "tpfuse" if any(r["provider"] == "tpfuse" for r in rows) else rows[0]["provider"]
    common.plot_ratio_panels(out.replace(".json", ".png"), rows, panel=("model", "mode"), x="tokens",
                             y="us_per_step", baseline=base, ylabel=f"time / {base}",
                             xlabel=lambda key: "batch" if key[1] == "decode" else "prefill tokens",
                             title=f"E2E (transcribed from a log), {hdr.get('device')}, {str(hdr.get('commit'))[:10]}")


if __name__ == "__main__":
    main()
