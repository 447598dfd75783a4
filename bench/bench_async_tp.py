"""Async-TP benchmark: column-parallel all_gather_matmul and row-parallel matmul_reduce_scatter, TP ranks.

    torchrun --standalone --nproc_per_node=2 bench/bench_async_tp.py [--quick]

Providers (same shapes, bf16, CUDA graphs where capture works, median per call, slowest rank):
``gemm_only`` (the local GEMM of the full gathered input / of the full partial: the floor), ``nccl`` (NCCL
all-gather + cuBLAS / cuBLAS + NCCL reduce-scatter, tpfuse's ``nccl`` path), ``torch_symm`` (torch's
``symm_mem.fused_all_gather_matmul`` / ``fused_matmul_reduce_scatter``), ``tpfuse`` (``tpfuse_async_tp``).
Shapes: Llama-3.1-8B and 70B TP shards: AG side ``[M, H] x [H, I/TP]``, RS side ``[M, I/TP] x [I/TP, H]``.
Writes ``bench/results/async_tp_tp{TP}_{device}.json`` and ``.png``; prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import tpfuse  # noqa: E402
from tpfuse import dispatch  # noqa: E402
from tpfuse.sharding import shard_range  # noqa: E402
from tpfuse.tolerance import REL_ERR, rel_err  # noqa: E402

MODELS = {"8B": (4096, 14336), "70B": (8192, 28672)}  # hidden, intermediate


def _max(v, dev):
    t = torch.tensor([v], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def torch_symm_ops(group):
    """torch's fused ops, or None where this torch lacks them."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        try:
            symm_mem.enable_symm_mem_for_group(group.group_name)
        except Exception:
            pass
        ag = torch.ops.symm_mem.fused_all_gather_matmul
        rs = torch.ops.symm_mem.fused_matmul_reduce_scatter
        return ag, rs
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="8B,70B")
    ap.add_argument("--m", default=None, help="comma-separated M values")
    args = ap.parse_args()
    tpfuse.init_distributed()
    rank, tp = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    ms = [int(m) for m in args.m.split(",")] if args.m else (
        [1024, 4096] if args.quick else [256, 512, 1024, 2048, 4096, 8192, 16384])
    models = args.models.split(",")
    group = dist.group.WORLD
    tsymm = torch_symm_ops(group)
    rows = []
    for model in models:
        h, inter = MODELS[model]
        i_s = inter // tp
        comm = tpfuse.TPCommunicator(max_tokens=max(ms), hidden_size=h, dtype=torch.bfloat16,
                                     config=tpfuse.CommConfig(force_paths={"all_gather_matmul": "tpfuse_async_tp",
                                                                           "matmul_reduce_scatter": "tpfuse_async_tp"}))
        g = torch.Generator(device=dev).manual_seed(1 + rank)
        w_n = torch.randn(i_s, h, device=dev, generator=g, dtype=torch.bfloat16) / h ** 0.5   # AG side [N/TP, H]
        w_k = torch.randn(h, i_s, device=dev, generator=g, dtype=torch.bfloat16) / i_s ** 0.5  # RS side [H, K/TP]
        for m in ms:
            s, e = shard_range(m, tp, rank)
            x_full = torch.randn(m, h, device=dev, generator=g, dtype=torch.bfloat16)
            x_shard = x_full[s:e].contiguous()
            x_k = torch.randn(m, i_s, device=dev, generator=g, dtype=torch.bfloat16)
            calls = 2 if m * h * i_s > 2 ** 36 else 5
            cases = {
                ("AG", "gemm_only"): lambda: torch.mm(x_full, w_n.t()),
                ("AG", "nccl"): lambda: dispatch.implementation("all_gather_matmul", "nccl")(comm, x_shard, w_n, m),
                ("AG", "tpfuse"): lambda: comm.all_gather_matmul(x_shard, w_n, num_tokens=m),
                ("RS", "gemm_only"): lambda: torch.mm(x_k, w_k.t()),
                ("RS", "nccl"): lambda: dispatch.implementation("matmul_reduce_scatter", "nccl")(comm, x_k, w_k),
                ("RS", "tpfuse"): lambda: comm.matmul_reduce_scatter(x_k, w_k),
            }
            if tsymm is not None and m % tp == 0:
                cases[("AG", "torch_symm")] = lambda: tsymm[0](x_shard, [w_n.t()], 0, group.group_name)
                cases[("RS", "torch_symm")] = lambda: tsymm[1](x_k, w_k.t(), "sum", 0, group.group_name)
            # correctness of tpfuse against NCCL before timing
            ref_ag = dispatch.implementation("all_gather_matmul", "nccl")(comm, x_shard, w_n, m)
            ok_ag = rel_err(comm.all_gather_matmul(x_shard, w_n, num_tokens=m), ref_ag) <= REL_ERR[torch.bfloat16]
            ref_rs = dispatch.implementation("matmul_reduce_scatter", "nccl")(comm, x_k, w_k)
            ok_rs = rel_err(comm.matmul_reduce_scatter(x_k, w_k), ref_rs) <= REL_ERR[torch.bfloat16]
            for (side, prov), fn in cases.items():
                try:
                    us, mode = common.time_us(fn, calls=calls, replays=10)
                except Exception as ex:  # a provider that fails here is reported, not fatal
                    us, mode = float("nan"), f"error: {type(ex).__name__}: {ex}"[:200]
                    torch.cuda.synchronize()
                us = _max(us, dev)
                rows.append({"model": model, "side": side, "provider": prov, "M": m, "H": h, "I_shard": i_s,
                             "median_us": us, "timing": mode,
                             "correct": (ok_ag if side == "AG" else ok_rs) if prov == "tpfuse" else None})
            if rank == 0:
                line = "  ".join(f"{r['side']}:{r['provider']}={r['median_us']:.0f}" for r in rows
                                 if r["model"] == model and r["M"] == m)
                print(f"[{model} M={m}] {line}  correct AG={ok_ag} RS={ok_rs}", flush=True)
        comm.close()
    if rank == 0:
        hdr = common.header("async_tp", tp=tp, dtype="bf16")
        path = os.path.join(common.RESULTS, f"async_tp_tp{tp}_{common.device_slug()}.json")
        out = os.environ.get("OUT")
        if out:
            path = os.path.join(out, os.path.basename(path))
        common.write_json(path, hdr, rows)
        _plot(path.replace(".json", ".png"), rows, hdr)
        print("\nratio to GEMM-only (lower is better; 1.00 = communication fully hidden)")
        for model in models:
            for side in ("AG", "RS"):
                for m in ms:
                    base = next(r["median_us"] for r in rows if (r["model"], r["side"], r["M"], r["provider"]) ==
                                (model, side, m, "gemm_only"))
                    cells = "  ".join(f"{r['provider']}={r['median_us'] / base:.3f}" for r in rows
                                      if (r["model"], r["side"], r["M"]) == (model, side, m) and r["provider"] != "gemm_only")
                    print(f"  {model} {side} M={m:<6} gemm={base:8.0f}us  {cells}")
        print("wrote", path)
    dist.barrier()
    dist.destroy_process_group()


def _plot(path, rows, hdr):
    return common.plot_ratio_panels(path, rows, panel=("model", "side"), x="M", y="median_us", baseline="gemm_only",
                                    ylabel="time / GEMM-only", xlabel="M (tokens)", refs=(1.0, 1.03),
                                    title=f"async TP, TP={hdr['tp']}, {hdr['device']}, {hdr['commit'][:10]}")


if __name__ == "__main__":
    main()
