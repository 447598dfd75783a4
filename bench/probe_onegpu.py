"""What one collective costs in one-GPU mode (N ranks sharing one GPU, :mod:`tpfuse.distributed`): eager wall time
per call of the fused all-reduce kernels and the sequence-parallel all-gather, each call synchronized. Without MPS
the ranks' contexts take turns on the GPU, so this measures the time slicing, not the kernels: it sizes the
one-GPU test suite (how many calls fit a GPU call), and tells whether MPS (``--mps`` in the label: the caller
started the MPS daemon) makes the turns cheaper. Not a speed claim about tpfuse.

    TPFUSE_ONE_GPU=1 torchrun --standalone --nproc-per-node=4 bench/probe_onegpu.py [--label mps]
"""

from __future__ import annotations

import argparse
import time

import torch

import common


def _time_ms(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="timed calls per path")
    ap.add_argument("--label", default="timeslice", help="how the GPU was shared (recorded in the rows)")
    args = ap.parse_args()
    import tpfuse

    with common.rank_context() as ranks:
        h, t = 4096, 8
        force = {"fused_add_rmsnorm": "tpfuse_oneshot", "all_reduce": "tpfuse_twoshot",
                 "all_gather": "tpfuse_all_gather"}
        comm = tpfuse.TPCommunicator(max_tokens=1024, hidden_size=h, dtype=torch.bfloat16,
                                     config=tpfuse.CommConfig(force_paths=force))
        x = torch.randn(t, h, device=ranks.device, dtype=torch.bfloat16)
        w = torch.ones(h, device=ranks.device, dtype=torch.bfloat16)
        shard = torch.randn(t // ranks.world or 1, h, device=ranks.device, dtype=torch.bfloat16)
        rows = []
        for name, fn in (("fused_add_rmsnorm/tpfuse_oneshot", lambda: comm.fused_add_rmsnorm(x, x, w, 1e-6)),
                         ("all_reduce/tpfuse_twoshot", lambda: comm.all_reduce(x)),
                         ("all_gather/tpfuse_all_gather",
                          lambda: comm.all_gather(shard, num_tokens=shard.shape[0] * ranks.world))):
            ms = common.slowest_rank(_time_ms(fn, args.calls), ranks.device)
            rows.append({"op": name, "tp": ranks.world, "sharing": args.label, "ms_per_call": round(ms, 3)})
        comm.close()
        if ranks.rank == 0:
            for r in rows:
                print(r)
            common.write_json(common.result_path("probe_onegpu", tp=ranks.world, tag=f"_{args.label}"),
                              common.header("probe_onegpu", sharing=args.label), rows)


if __name__ == "__main__":
    main()
