"""Rebuild a benchmark's rows from the table it printed to its log, for runs whose JSON did not come back from the
GPU machine (the file was written outside $OUT). The header says so: ``"transcribed_from"`` names the log, and
device / commit are given on the command line from that run's record, not invented here.

    python bench/tools/log_table_to_json.py LOG OUT.json --benchmark fused_ar_tp2 --device "2x NVIDIA H200" \
        --commit 8e3f97d --date 2026-11-22

Reads blocks of the form ``hidden H, out FORMAT (us)`` / ``tokens  provider ...`` / rows of numbers (the format
``bench_fused_ar.py`` prints) into rows ``{provider, tokens, hidden, out_format, median_us}``.
"""

import re

import transcribe  # bench/tools, beside this file


def parse(text):
    rows, head, hidden, fmt = [], None, None, None
    for line in text.splitlines():
        m = re.match(r"hidden (\d+), out (\S+) \(us\)", line)
        if m:
            hidden, fmt, head = int(m.group(1)), m.group(2), None
            continue
        if hidden is not None and line.startswith("tokens"):
            head = line.split()[1:]
            continue
        if head and re.match(r"\s*\d+\s", line):
            cells = line.split()
            if len(cells) != len(head) + 1:
                head = None
                continue
            t = int(cells[0])
            for prov, v in zip(head, cells[1:]):
                if v not in ("-", "nan"):
                    rows.append({"provider": prov, "tokens": t, "hidden": hidden, "out_format": fmt,
                                 "median_us": float(v), "mode": "graph"})
        elif head and not line.strip():
            head = None
    return rows


def main():
    transcribe.cli(__doc__, parse)


if __name__ == "__main__":
    main()
