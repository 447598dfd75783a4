"""Where a decode step of the parallelized model spends its GPU time: ``torch.profiler`` over graph-replayed decode
steps (``--steps``) of an ``bench_e2e.py`` model, the kernels' total CUDA time per step, sorted.

    torchrun --standalone --nproc-per-node=1 bench/profile_decode.py [--model 8B] [--batch 1] [--context 1024]

Prints the table and writes it (with device, commit, versions) to ``profile_decode_tp{N}_{device}_{model}_b{B}.json``
in ``$OUT`` (else ``bench/results``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402
import common  # noqa: E402

import tpfuse  # noqa: E402
from tpfuse.parallel import KVCacheConfig  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="8B", choices=sorted(bench_e2e.SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    with common.rank_context() as ranks:
        rows = profile(args, ranks.device)
        tp, rank = ranks.world, ranks.rank
    if rank != 0:  # every rank profiled its own kernels; rank 0's are the table
        return
    total = sum(r["us_per_step"] for r in rows)
    print(f"{args.model} decode, batch {args.batch}, context {args.context}, {args.layers} layers: "
          f"{total:.0f} us of kernels per step")
    for r in rows[:40]:
        print(f"{r['us_per_step']:9.1f} us  {r['calls_per_step']:5.1f}x  {r['kernel']}")
    hdr = common.header("profile_decode", model=args.model, batch=args.batch, context=args.context,
                        layers=args.layers, kernel_us_per_step=round(total, 1))
    common.write_json(common.result_path("profile_decode", tp=tp, tag=f"{args.model}_b{args.batch}"), hdr, rows)


def profile(args, dev):
    """Kernel time per decode step (torch profiler over ``--steps`` graph-replayed steps), largest first."""
    model = bench_e2e.build_model(args.model, args.layers, dev)
    comm = tpfuse.TPCommunicator(max_tokens=args.batch * args.context, hidden_size=model.config.hidden_size,
                                 dtype=torch.bfloat16)
    model = tpfuse.parallelize(model, comm, cache=KVCacheConfig(max_batch=args.batch,
                                                                max_seq_len=args.context + 2 * args.steps + 8))
    ids = torch.randint(0, bench_e2e.VOCAB, (args.batch, args.context), device=dev)
    out = model(ids, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(args.steps):  # capture + warm replays
        tok = model(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tok = model(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": ev.key[:120], "calls_per_step": ev.count / args.steps,
                         "us_per_step": us / args.steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    comm.close()
    return rows


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)
