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
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

try:
    import tpfuse
except Exception as ex:  # noqa: BLE001 - the probe's other rows need only torch
    tpfuse = None
    print("tpfuse not importable, its row is skipped:", ex)

CASES = (("8B", 4096, 7168, "fp8", 4096), ("8B", 4096, 7168, "fp8", 8192), ("8B", 4096, 7168, "bf16", 4096),
         ("8B", 4096, 7168, "bf16", 16384), ("70B", 8192, 14336, "bf16", 4096), ("70B", 8192, 14336, "fp8", 16384))


class Buffers:
    """The symmetric buffer every rank's shard is pulled from, its peers' views, the local landing buffer and the
    side stream of the pulls."""

    def __init__(self, ranks):
        import torch.distributed._symmetric_memory as symm_mem

        max_bytes = max(m * h * (1 if dt == "fp8" else 2) for _, h, _, dt, m in CASES)
        self.buf = symm_mem.empty(max_bytes, dtype=torch.uint8, device=ranks.device)
        hdl = symm_mem.rendezvous(self.buf, dist.group.WORLD)
        self.peers = {p: hdl.get_buffer(p, [max_bytes], torch.uint8) for p in range(ranks.world) if p != ranks.rank}
        self.pulled = torch.empty(max_bytes, dtype=torch.uint8, device=ranks.device)
        self.side = torch.cuda.Stream(device=ranks.device)


def gemm_of(dt, w, m, n_shard, dev):
    """``(gemm(a, out=None), weight operand)``: bf16 ``torch.mm`` or FP8 row-wise ``torch._scaled_mm`` (unit
    scales, as the benchmark's fp8 rows use torch's row-wise kernel)."""
    if dt != "fp8":
        return (lambda a, out=None: torch.mm(a, w.t(), out=out)), w
    wq = w.to(torch.float8_e4m3fn)
    ones_m, ones_n = torch.ones(m, 1, device=dev), torch.ones(1, n_shard, device=dev)

    def gemm(a, out=None):
        return torch._scaled_mm(a, wq.t(), scale_a=ones_m[: a.shape[0]], scale_b=ones_n, out_dtype=torch.bfloat16,
                                use_fast_accum=False, out=out)
    return gemm, wq


def case_providers(ranks, bufs, case):
    """The probe's providers of one case (see the module docstring), tpfuse's communicator (or None)."""
    _, h, n_shard, dt, m = case
    tp, rank, dev = ranks.world, ranks.rank, ranks.device
    g = torch.Generator(device=dev).manual_seed(rank)
    x = torch.randn(m, h, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(n_shard, h, device=dev, generator=g) / h ** 0.5).to(torch.bfloat16)
    s = m // tp
    shard_bytes = s * h * (1 if dt == "fp8" else 2)
    gemm, w_op = gemm_of(dt, w, m, n_shard, dev)
    xa = x.to(torch.float8_e4m3fn) if dt == "fp8" else x
    out = torch.empty(m, n_shard, dtype=torch.bfloat16, device=dev)
    own = xa[rank * s: (rank + 1) * s].contiguous()

    def split():
        for q in range(tp):
            gemm(xa[q * s: (q + 1) * s], out=out[q * s: (q + 1) * s])

    def pulls(with_own_copy):
        if with_own_copy:
            bufs.buf[:shard_bytes].copy_(own.view(torch.uint8).view(-1))
        for p, pb in bufs.peers.items():
            bufs.pulled[:shard_bytes].copy_(pb[:shard_bytes])

    def overlapped(with_own_copy):
        def fn():
            main = torch.cuda.current_stream()
            bufs.side.wait_stream(main)
            with torch.cuda.stream(bufs.side):
                pulls(with_own_copy)
            split()
            main.wait_stream(bufs.side)
        return fn

    provs = {"gemm_full": lambda: gemm(xa, out=out), "gemm_split": split, "pull_only": lambda: pulls(False),
             "split+pull": overlapped(False), "split+copy+pull": overlapped(True)}
    if tpfuse is None:
        return provs, None
    comm = tpfuse.TPCommunicator(max_tokens=m, hidden_size=h, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(force_paths={"all_gather_matmul": "tpfuse_async_tp"}))
    if dt == "fp8":
        ones_rows = torch.ones(s, 1, device=dev)
        ones_cols = torch.ones(n_shard, 1, device=dev)  # row-wise scales, as the benchmark's fp8 rows
        provs["tpfuse"] = lambda: comm.all_gather_matmul(own, w_op, num_tokens=m, x_scale=ones_rows,
                                                         w_scale=ones_cols)
    else:
        provs["tpfuse"] = lambda: comm.all_gather_matmul(own, w_op, num_tokens=m)
    return provs, comm


def cases(ranks):
    bufs = Buffers(ranks)
    for case in CASES:
        provs, comm = case_providers(ranks, bufs, case)
        model, h, n_shard, dt, m = case
        yield common.Case(fields={"model": model, "dtype": dt, "M": m, "H": h, "N_shard": n_shard}, providers=provs)
        if comm is not None:
            comm.synchronize()
            comm.close()


def row(case, name, timing):
    return {**case.fields, "case": name, "median_us": round(timing.us, 2),
            "rounds_us": [round(v, 2) for v in timing.rounds_us]}


def progress(rows):
    """Rank 0, after each case: every provider's median and its ratio to the GEMM floor."""
    f = rows[-1]
    med = {r["case"]: r["median_us"] for r in rows if (r["model"], r["dtype"], r["M"]) == (f["model"], f["dtype"],
                                                                                           f["M"])}
    base = med["gemm_full"]
    print(f"{f['model']} {f['dtype']:4s} M={f['M']:6d} "
          + "  ".join(f"{k}={v:8.1f}({v / base:.3f})" for k, v in med.items()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with common.rank_context("nccl", timeout_s=600.0) as ranks:  # torch's default NCCL timeout
        rows = common.run_cases(cases(ranks), row, rounds=args.rounds, device=ranks.device, calls=3, replays=10,
                                before=dist.barrier, after_case=progress if ranks.rank == 0 else None)
        if ranks.rank == 0 and args.out:
            common.write_json(args.out, common.header("probe_ag_overlap", tp=ranks.world, rounds=args.rounds), rows)
            print("wrote", args.out)


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
