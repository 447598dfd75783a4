"""One JSON row per profiled launch from an Nsight Compute details page exported as CSV (``ncu --import R.ncu-rep
--page details --csv``, plain or gzip): what ``bash bench/gpu_run.sh ncu`` profiles, in the results' format
(``{"header": ..., "rows": [...]}``, :mod:`bench.tools.index_results`).

    python bench/tools/ncu_summary.py DETAILS.csv[.gz] OUT.json --commit SHA --model 8B/tp2 --batch 1 [--date ISO]

Each row: ``launch`` (ncu's ID, in launch order), ``kernel``, ``grid``, ``block``, ``duration_us``,
``elapsed_cycles``, ``sm_active_cycles_avg`` (averaged over every SM, idle ones included), ``dram_throughput_pct``,
``registers_per_thread``, ``dynamic_smem_per_block``, ``smem_config_kb`` (the launch's L1 / shared-memory split),
``cache_config``, ``achieved_occupancy_pct``. The header names the device from the page (``--device`` otherwise).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json

METRICS = (("duration_us", "GPU Speed Of Light Throughput", "Duration"),
           ("elapsed_cycles", "GPU Speed Of Light Throughput", "Elapsed Cycles"),
           ("sm_active_cycles_avg", "GPU Speed Of Light Throughput", "SM Active Cycles"),
           ("dram_throughput_pct", "GPU Speed Of Light Throughput", "DRAM Throughput"),
           ("registers_per_thread", "Launch Statistics", "Registers Per Thread"),
           ("dynamic_smem_per_block", "Launch Statistics", "Dynamic Shared Memory Per Block"),
           ("smem_config_kb", "Launch Statistics", "Shared Memory Configuration Size"),
           ("cache_config", "Launch Statistics", "Function Cache Configuration"),
           ("achieved_occupancy_pct", "Occupancy", "Achieved Occupancy"))
"""``(row field, ncu section, ncu metric)``; numbers where the value parses as one (thousands separators dropped),
else the text as ncu printed it."""


def _value(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def rows_of(path: str) -> list:
    """The launches of one details CSV, in ncu's ID order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        records = list(csv.DictReader(fh))
    launches: dict = {}
    for r in records:
        d = launches.setdefault(r["ID"], {"kernel": r["Kernel Name"].split("(")[0].strip(), "grid": r["Grid Size"],
                                          "block": r["Block Size"], "device": r.get("Device")})
        d[(r["Section Name"], r["Metric Name"])] = r["Metric Value"]
    out = []
    for i, d in sorted(launches.items(), key=lambda kv: int(kv[0])):
        row = dict(launch=int(i), kernel=d["kernel"], grid=d["grid"], block=d["block"])
        for field, section, metric in METRICS:
            v = d.get((section, metric))
            row[field] = None if v is None else (_value(v) if field not in ("dynamic_smem_per_block", "cache_config")
                                                 else v)
        out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("out")
    ap.add_argument("--commit", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--device", default="NVIDIA H100 80GB HBM3")
    ap.add_argument("--date", default=None, help="ISO time of the run (default: now, UTC)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--raw", default=None, help="where the raw pages are kept (recorded in the header)")
    args = ap.parse_args(argv)
    import datetime

    date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    hdr = dict(benchmark="ncu_decode", device=args.device, device_count=1, commit=args.commit, date=date,
               model=args.model, layers=args.layers, vocab=args.vocab, batch=args.batch,
               method="bash bench/gpu_run.sh ncu: Nsight Compute --set full --clock-control none over the first "
                      "launches matching NCU_KERNELS of bench/profile_decode.py --replay-only (prefill, then "
                      "CUDA-graph decode steps, PDL on); each kernel replayed alone by ncu (no PDL overlap), so "
                      "durations include each launch's own ramp", raw=args.raw)
    with open(args.out, "w") as fh:
        json.dump({"header": hdr, "rows": rows_of(args.csv)}, fh, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
