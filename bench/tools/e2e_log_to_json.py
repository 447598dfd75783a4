"""Rebuild ``bench_e2e.py`` rows (+ its PNG) from the per-size lines it printed, for a run cut off before it wrote
its JSON. The header records ``"transcribed_from"`` (the log) and the run's device / commit given on the command
line.

    python bench/tools/e2e_log_to_json.py LOG OUT.json --device "..." --commit dce74c5 --date 2026-11-22

Lines: ``[8B decode 1] us/step (4 layers): nocomm=375  unfused=583  ...  tpfuse/nocomm=1.055 ...``.
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("out")
    ap.add_argument("--device", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--date", required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    rows = parse(open(a.log).read())
    hdr = {"benchmark": "e2e", "tp": 2, "layers": rows[0]["layers"] if rows else None, "device": a.device,
           "commit": a.commit, "date": a.date, "transcribed_from": a.log, "note": a.note}
    with open(a.out, "w") as f:
        json.dump({"header": hdr, "rows": rows}, f, indent=1)
    import bench_e2e

    bench_e2e._plot(a.out.replace(".json", ".png"), rows, hdr)
    print(f"{len(rows)} rows -> {a.out}")


if __name__ == "__main__":
    main()
