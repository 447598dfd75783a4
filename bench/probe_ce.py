"""Probe: NVLink bandwidth of copy-engine (CE) vs SM-driven peer copies over torch symmetric memory (TP ranks
all copying at once, as a collective would). Decides whether a CE-fed fused all-reduce can beat the SM kernels.

    torchrun --nproc-per-node=2 bench/probe_ce.py [--out bench/results/probe_ce_tp2_h200.json]

Rows: (mode, MiB per rank, median µs, GB/s per direction). Modes: ``ce_push`` (``peer.copy_(local)``: a DMA),
``ce_pull`` (``local.copy_(peer)``), ``sm_push`` (``torch.mul(local, 1, out=peer)``: a kernel's remote stores),
``sm_pull``, ``ce_push_x4`` (the same bytes as 4 back-to-back copies: per-copy overhead).
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def cases(ranks, sizes):
    import torch.distributed._symmetric_memory as symm_mem

    n_max = max(sizes) << 20 >> 1  # bf16 elements
    buf = symm_mem.empty(n_max, dtype=torch.bfloat16, device="cuda")
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    remote = hdl.get_buffer((ranks.rank + 1) % ranks.world, (n_max,), torch.bfloat16, 0)
    local = torch.randn(n_max, device="cuda").to(torch.bfloat16)
    for mib in sizes:
        n = mib << 20 >> 1
        yield common.Case(fields={"mib": mib}, providers={
            "ce_push": lambda: remote[:n].copy_(local[:n]),
            "ce_pull": lambda: local[:n].copy_(remote[:n]),
            "sm_push": lambda: torch.mul(local[:n], 1, out=remote[:n]),
            "sm_pull": lambda: torch.mul(remote[:n], 1, out=local[:n]),
            "ce_push_x4": lambda: [remote[i * n // 4:(i + 1) * n // 4].copy_(local[i * n // 4:(i + 1) * n // 4])
                                   for i in range(4)],
        })


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--mib", default="1,4,8,16,32,64")
    args = ap.parse_args()
    with common.rank_context("nccl", timeout_s=600.0) as ranks:  # torch's default NCCL timeout

        def row(case, mode, timing):
            mib, us = case.fields["mib"], timing.us
            r = {"mode": mode, "mib": mib, "median_us": round(us, 2), "gb_per_s": round((mib << 20) / us / 1e3, 1),
                 "timing": timing.mode}
            if ranks.rank == 0:
                print(f"{mode:11s} {mib:3d} MiB {us:9.1f} us {r['gb_per_s']:7.1f} GB/s", flush=True)
            return r

        rows = common.run_cases(cases(ranks, [int(s) for s in args.mib.split(",")]), row, device="cuda",
                                before=dist.barrier, barrier=dist.barrier, calls=10, replays=20)
        if ranks.rank == 0 and args.out:
            common.write_json(args.out, common.header("probe_ce", world_size=ranks.world), rows)


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
