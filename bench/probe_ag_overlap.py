"""Probe: where the all-gather-matmul's time above the GEMM floor goes (TP ranks, symmetric memory).

    torchrun --standalone --nproc-per-node=2 bench/probe_ag_overlap.py [--out probe.json]

For each case (model shard, dtype, M) it times, as CUDA graphs (median per call, slowest rank, rounds with the order
rotated):

``gemm_full``      one GEMM of all M rows (the floor of the benchmark)
``gemm_split``     the GEMMs of the TP row chunks back to back (what any chunked overlap must run at least)
``pull_only``      the copy-engine pulls of every peer's shard (``local.copy_(peer)``), nothing else
``split+pull``     ``gemm_split`` on the main stream while a side stream does the pulls (no semaphores, no
                   dependency: the pulled rows are not consumed) -- the hardware cost of running both at once
``split+copy+pull`` the same with the own-slot copy first on the side stream (what tpfuse's all_gather_matmul does
                   before it signals its peers)
``tpfuse``         ``TPCommunicator.all_gather_matmul`` (path ``tpfuse_async_tp``): the full protocol

``split+pull - gemm_split`` is the interference of the NVLink DMA with the GEMMs; ``tpfuse - split+pull`` what the
protocol (semaphores, events, the dependency of the last GEMM on the last pull) adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CASES = (("8B", 4096, 7168, "fp8", 4096), ("8B", 4096, 7168, "fp8", 8192), ("8B", 4096, 7168, "bf16", 4096),
         ("8B", 4096, 7168, "bf16", 16384), ("70B", 8192, 14336, "bf16", 4096), ("70B", 8192, 14336, "fp8", 16384))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch.distributed._symmetric_memory as symm_mem

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    tp = dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    try:
        import tpfuse
    except Exception as ex:  # noqa: BLE001
        tpfuse = None
        print("tpfuse not importable, its row is skipped:", ex)
    rows = []
    max_bytes = max(m * h * (1 if dt == "fp8" else 2) for _, h, _, dt, m in CASES)
    buf = symm_mem.empty(max_bytes, dtype=torch.uint8, device=dev)
    hdl = symm_mem.rendezvous(buf, dist.group.WORLD)
    peers = {p: hdl.get_buffer(p, [max_bytes], torch.uint8) for p in range(tp) if p != rank}
    pulled = torch.empty(max_bytes, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream(device=dev)
    for model, h, n_shard, dt, m in CASES:
        g = torch.Generator(device=dev).manual_seed(rank)
        x = torch.randn(m, h, device=dev, generator=g).to(torch.bfloat16)
        w = (torch.randn(n_shard, h, device=dev, generator=g) / h ** 0.5).to(torch.bfloat16)
        s = m // tp
        elt = 1 if dt == "fp8" else 2
        shard_bytes = s * h * elt
        if dt == "fp8":
            xq, wq = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            ones_m, ones_n = torch.ones(m, 1, device=dev), torch.ones(1, n_shard, device=dev)

            def gemm(a, out=None):  # row-wise scales, as the benchmark's fp8 rows (torch's row-wise kernel)
                return torch._scaled_mm(a, wq.t(), scale_a=ones_m[: a.shape[0]], scale_b=ones_n,
                                        out_dtype=torch.bfloat16, use_fast_accum=False, out=out)
            xa = xq
        else:
            def gemm(a, out=None):
                return torch.mm(a, w.t(), out=out)
            xa = x
        out = torch.empty(m, n_shard, dtype=torch.bfloat16, device=dev)
        own = xa[rank * s: (rank + 1) * s].contiguous()

        def split():
            for q in range(tp):
                gemm(xa[q * s: (q + 1) * s], out=out[q * s: (q + 1) * s])

        def pulls(with_own_copy):
            if with_own_copy:
                buf[:shard_bytes].copy_(own.view(torch.uint8).view(-1))
            for p, pb in peers.items():
                pulled[:shard_bytes].copy_(pb[:shard_bytes])

        def overlapped(with_own_copy):
            def fn():
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    pulls(with_own_copy)
                split()
                main.wait_stream(side)
            return fn

        cases = {"gemm_full": lambda: gemm(xa, out=out), "gemm_split": split,
                 "pull_only": lambda: pulls(False), "split+pull": overlapped(False),
                 "split+copy+pull": overlapped(True)}
        if tpfuse is not None:
            comm = tpfuse.TPCommunicator(max_tokens=m, hidden_size=h, dtype=torch.bfloat16,
                                         config=tpfuse.CommConfig(force_paths={"all_gather_matmul":
                                                                               "tpfuse_async_tp"}))
            if dt == "fp8":
                ones_rows = torch.ones(s, 1, device=dev)
                ones_cols = torch.ones(n_shard, 1, device=dev)  # row-wise scales, as the benchmark's fp8 rows
                cases["tpfuse"] = lambda: comm.all_gather_matmul(own, wq, num_tokens=m, x_scale=ones_rows,
                                                                 w_scale=ones_cols)
            else:
                cases["tpfuse"] = lambda: comm.all_gather_matmul(own, w, num_tokens=m)
        keys = list(cases)
        vals = {k: [] for k in keys}
        for rnd in range(args.rounds):
            for k in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
                dist.barrier()
                us, _ = common.time_us(cases[k], calls=3, replays=10)
                vals[k].append(common.slowest_rank(us, dev))
        if tpfuse is not None:
            comm.synchronize()
            comm.close()
        med = {k: statistics.median(v) for k, v in vals.items()}
        for k in keys:
            rows.append({"model": model, "dtype": dt, "M": m, "H": h, "N_shard": n_shard, "case": k,
                         "median_us": round(med[k], 2), "rounds_us": [round(v, 2) for v in vals[k]]})
        if rank == 0:
            base = med["gemm_full"]
            print(f"{model} {dt:4s} M={m:6d} " + "  ".join(f"{k}={med[k]:8.1f}({med[k] / base:.3f})" for k in keys),
                  flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as fh:
            json.dump({"header": common.header("probe_ag_overlap", tp=tp, rounds=args.rounds), "rows": rows}, fh,
                      indent=1)
        print("wrote", args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
