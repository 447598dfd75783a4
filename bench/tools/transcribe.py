"""The command line and JSON writing shared by the log-to-JSON tools (``e2e_log_to_json.py``,
``log_table_to_json.py``): ``LOG OUT.json --device --commit --date [--note]`` -> ``{"header": ..., "rows": ...}``,
the header naming the log it was transcribed from and the run's device / commit as given (never invented here)."""

import argparse
import json


def cli(doc, parse, *, benchmark=None, header=lambda rows: {}):
    """Parse the arguments, transcribe ``LOG`` with ``parse(text) -> rows`` and write ``OUT.json``. ``benchmark``
    fixes the header's benchmark name (else ``--benchmark`` is required); ``header(rows)`` adds fields after it.
    Returns ``(out_path, rows, header)``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("out")
    if benchmark is None:
        ap.add_argument("--benchmark", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--date", required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    with open(a.log) as f:
        rows = parse(f.read())
    hdr = {"benchmark": benchmark or a.benchmark, **header(rows), "device": a.device, "commit": a.commit,
           "date": a.date, "transcribed_from": a.log, "note": a.note}
    with open(a.out, "w") as f:
        json.dump({"header": hdr, "rows": rows}, f, indent=1)
    print(f"{len(rows)} rows -> {a.out}")
    return a.out, rows, hdr
