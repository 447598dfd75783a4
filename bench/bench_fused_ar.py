"""Benchmark: all-reduce + residual add + RMSNorm (+ FP8-static quant) at TP=2 (run under torchrun, 2 GPUs).

Providers (each a full "partial sums in, (out, residual_out) out" step):

* ``nccl+eager``       NCCL all-reduce (bf16) + torch eager add + RMSNorm (+ quant) in fp32
* ``nccl+tpfuse``      NCCL all-reduce + tpfuse's local fused Triton add_rmsnorm (the ``nccl`` path)
* ``symm2shot+tpfuse`` torch symm_mem ``two_shot_all_reduce_`` on a symmetric buffer (copy-in included) + tpfuse
                       local add_rmsnorm
* ``fi_oneshot`` / ``fi_twoshot``  FlashInfer's trtllm fused kernel as users get it: a ``TPCommunicator`` with
                       ``force_paths={"fused_add_rmsnorm": "flashinfer_oneshot" / "flashinfer_twoshot"}``
                       (:mod:`tpfuse.backends.flashinfer`: trtllm IPC workspace, never backend "auto"), when
                       ``flashinfer`` imports and ``--flashinfer`` is given; checked against NCCL + tpfuse's norm,
                       and the row records the path that ran (``fi_twoshot`` only above TP tokens)
* ``tpfuse_oneshot`` / ``tpfuse_twoshot`` / ``tpfuse_oneshot_pipe``  tpfuse's fused kernels
                       (:mod:`tpfuse.backends.symm`), forced; ``tpfuse_oneshot_pipe_p<N>`` (``--pipe-producers``):
                       the pipelined one-shot with N producer programs
* ``tpfuse_auto``      ``TPCommunicator.fused_add_rmsnorm`` as dispatched by the shipped thresholds table

Timing: ``CALLS`` calls captured in one CUDA graph, replayed; median per call over replays (ranks aligned by a
barrier before each replay). Writes ``bench/results/fused_ar_tp2_<slug>.json`` (+ ``.png``); prints a table.

Usage: ``torchrun --standalone --nproc_per_node=2 bench/bench_fused_ar.py [--quick] [--flashinfer]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import tpfuse  # noqa: E402
from tpfuse import ops  # noqa: E402
from tpfuse import quant as q  # noqa: E402

CALLS = 20
EPS = 1e-6
DT = torch.bfloat16


def eager_norm(s, residual, weight, spec):
    s = s.float() + residual.float()
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()
    if spec is not None:
        y = (y * (1.0 / spec.scale)).clamp(-448, 448).to(q.FP8_DTYPE)
    else:
        y = y.to(DT)
    return y, s.to(DT)


FI_PROVIDERS = {"fi_oneshot": "flashinfer_oneshot", "fi_twoshot": "flashinfer_twoshot"}


def flashinfer_comms(max_tokens, hidden, rank):
    """``{provider: TPCommunicator}`` forced onto each FlashInfer path (the tpfuse backend); providers whose path
    cannot run here are left out with the reason printed. Collective: every rank builds the same ones."""
    from tpfuse import dispatch

    out = {}
    for name, path in FI_PROVIDERS.items():
        c = tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=hidden, dtype=DT,
                                  config=tpfuse.CommConfig(force_paths={"fused_add_rmsnorm": path}))
        reason = dispatch.unavailable_reason("fused_add_rmsnorm", path, c)
        if reason:
            if rank == 0:
                print(f"{name} (hidden {hidden}) unavailable: {reason}")
            c.close()
            continue
        out[name] = c
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--flashinfer", action="store_true", help="add FlashInfer's trtllm fused kernels (JIT ~100 s)")
    ap.add_argument("--replays", type=int, default=25)
    ap.add_argument("--pipe-producers", default="",
                    help="extra tpfuse_oneshot_pipe variants: comma-separated producer-program counts to time")
    ap.add_argument("--out-dir", default=common.RESULTS)
    args = ap.parse_args()

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD
    tokens = [1, 4, 16, 64, 128, 256, 512, 1024, 2048, 8192] if args.quick else [2 ** i for i in range(14)]
    hiddens = [4096, 8192]
    formats = [None, "fp8_static"]
    max_tokens = max(tokens)
    pipe_producers = [int(v) for v in args.pipe_producers.split(",") if v]
    t_start = time.time()

    def barrier():
        torch.cuda.synchronize()
        dist.barrier()

    import torch.distributed._symmetric_memory as symm_mem

    rows = []
    from tpfuse import dispatch

    # every tpfuse kernel path timed from one communicator; FlashInfer's workspace is left to the forced ones below
    tpfuse_paths = frozenset(p for p in dispatch.PATH_DOCS if p not in FI_PROVIDERS.values())
    for h in hiddens:
        comm = tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=h, dtype=DT,
                                     config=tpfuse.CommConfig(all_workspaces=True, allowed_paths=tpfuse_paths))
        ws = comm.workspace
        symm_buf = symm_mem.empty(max_tokens * h, dtype=DT, device=dev)
        symm_mem.rendezvous(symm_buf, group.group_name)
        fi_comms = flashinfer_comms(max_tokens, h, rank) if args.flashinfer else {}
        for t in tokens:
            g = torch.Generator(device=dev).manual_seed(t)
            x = torch.randn(t, h, device=dev, generator=g).to(DT)
            residual = torch.randn(t, h, device=dev, generator=g).to(DT)
            weight = (1 + 0.1 * torch.randn(h, device=dev, generator=g)).to(DT)
            for fmt in formats:
                spec = q.FP8Static(torch.tensor(0.05, device=dev)) if fmt else None
                flat = symm_buf[: t * h].view(t, h)

                def nccl_eager():
                    s = x.clone()
                    dist.all_reduce(s, group=group)
                    return eager_norm(s, residual, weight, spec)

                def nccl_tpfuse():
                    s = x.clone()
                    dist.all_reduce(s, group=group)
                    return ops.add_rmsnorm(s, residual, weight, EPS, quant=spec)

                def symm_two():
                    flat.copy_(x)
                    torch.ops.symm_mem.two_shot_all_reduce_(flat, "sum", group.group_name)
                    return ops.add_rmsnorm(flat, residual, weight, EPS, quant=spec)

                provs = {"nccl+eager": nccl_eager, "nccl+tpfuse": nccl_tpfuse, "symm2shot+tpfuse": symm_two,
                         "tpfuse_oneshot": lambda: ws.oneshot(x, residual, weight, EPS, spec, False),
                         "tpfuse_twoshot": lambda: ws.twoshot(x, residual, weight, EPS, spec, False),
                         "tpfuse_oneshot_pipe": lambda: pipe(default_producers),
                         "tpfuse_auto": lambda: comm.fused_add_rmsnorm(x, residual, weight, EPS, quant=spec)}

                def pipe(producers):
                    ws.producers = producers  # read at launch (a constexpr): each variant is its own kernel
                    return ws.oneshot_pipe(x, residual, weight, EPS, spec, False)

                default_producers = ws.producers
                for p_count in pipe_producers:
                    provs[f"tpfuse_oneshot_pipe_p{p_count}"] = lambda p_count=p_count: pipe(p_count)
                for name, fc_ in fi_comms.items():
                    if name == "fi_twoshot" and t <= world:
                        continue  # FlashInfer's two-shot needs more tokens than ranks (the backend would fall back)
                    provs[name] = lambda fc_=fc_: fc_.fused_add_rmsnorm(x, residual, weight, EPS, quant=spec)
                # correctness against the NCCL + tpfuse-norm result, once per size
                want_out, want_res = nccl_tpfuse()

                def wrong(name):
                    o, r = provs[name]()
                    od = o.dequantize(torch.float32) if spec is not None else o.float()
                    wd = want_out.dequantize(torch.float32) if spec is not None else want_out.float()
                    err_r = tpfuse.tolerance.rel_err(r, want_res)
                    err_o = tpfuse.tolerance.rel_err(od, wd)
                    return None if err_r < 1e-2 and err_o < 6e-2 else f"rel err out {err_o:.2e} res {err_r:.2e}"

                for name in ("tpfuse_oneshot", "tpfuse_twoshot", "tpfuse_oneshot_pipe"):
                    err = wrong(name)
                    if err:
                        raise AssertionError(f"{name} T={t} H={h} {fmt}: {err}")
                fi_ran = {}
                for name in [n for n in FI_PROVIDERS if n in provs]:
                    # a wrong or fallen-back FlashInfer result drops the provider at this size (on every rank alike)
                    err = wrong(name)
                    ran = fi_comms[name].last_path["fused_add_rmsnorm"]
                    if ran != FI_PROVIDERS[name]:
                        err = f"ran {ran}, not {FI_PROVIDERS[name]} ({fi_comms[name].flashinfer.last_fallback})"
                    bad = torch.tensor([1.0 if err else 0.0], device=dev)
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                    if bad.item():
                        if rank == 0:
                            print(f"{name} T={t} H={h} {fmt}: dropped: {err or 'wrong on another rank'}")
                        del provs[name]
                    else:
                        fi_ran[name] = ran
                for name, fn in provs.items():
                    try:
                        us, mode = common.time_us(fn, calls=CALLS, replays=args.replays, barrier=barrier)
                    except Exception as e:  # noqa: BLE001
                        if rank == 0:
                            print(f"{name} T={t} H={h}: failed: {type(e).__name__}: {str(e)[:200]}")
                        barrier()
                        continue
                    # every rank measured; report the slower rank's median (the step's real cost)
                    row = {"provider": name, "tokens": t, "hidden": h, "out_format": fmt or "bf16",
                           "median_us": round(common.slowest_rank(us, dev), 2), "mode": mode}
                    if name == "tpfuse_auto":
                        row["path"] = comm.plan(t).path("fused_add_rmsnorm")
                    elif name in fi_ran:
                        row["path"] = fi_ran[name]
                    rows.append(row)
                ws.producers = default_producers
        comm.synchronize()
        comm.close()
        for c in fi_comms.values():
            c.close()  # collective (frees FlashInfer's IPC buffers)
        del symm_buf
    if rank == 0:
        _report(rows, args.out_dir, time.time() - t_start)
    dist.barrier()
    dist.destroy_process_group()


def _report(rows, out_dir, seconds):
    slug = common.device_slug()
    hdr = common.header("fused_ar_tp2", world_size=2, calls_per_graph=CALLS, seconds=round(seconds, 1),
                        note="median us per call over CUDA-graph replays; max over the 2 ranks")
    path = common.write_json(os.path.join(out_dir, f"fused_ar_tp2_{slug}.json"), hdr, rows)
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    print(f"\n{hdr['device']}  commit {hdr['commit']}  {hdr['versions']}")
    for h in sorted({r["hidden"] for r in rows}):
        for fmt in ("bf16", "fp8_static"):
            sel = [r for r in rows if r["hidden"] == h and r["out_format"] == fmt]
            if not sel:
                continue
            print(f"\nhidden {h}, out {fmt} (us)")
            print("tokens " + " ".join(f"{p:>17}" for p in provs))
            for t in sorted({r["tokens"] for r in sel}):
                vals = {r["provider"]: r["median_us"] for r in sel if r["tokens"] == t}
                print(f"{t:>6} " + " ".join(f"{vals.get(p, float('nan')):>17.2f}" for p in provs))
    print(f"\nwrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hs = sorted({r["hidden"] for r in rows})
        fig, axes = plt.subplots(2, len(hs), figsize=(7 * len(hs), 10), squeeze=False)
        for i, fmt in enumerate(("bf16", "fp8_static")):
            for j, h in enumerate(hs):
                ax = axes[i][j]
                for p in provs:
                    pts = sorted((r["tokens"], r["median_us"]) for r in rows
                                 if r["provider"] == p and r["hidden"] == h and r["out_format"] == fmt)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=p)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens")
                ax.set_ylabel("us per call")
                ax.set_title(f"TP=2 AR+add+RMSNorm, hidden {h}, out {fmt}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"{hdr['device']} commit {hdr['commit'][:12]}")
        fig.tight_layout()
        png = os.path.join(out_dir, f"fused_ar_tp2_{slug}.png")
        fig.savefig(png, dpi=90)
        print(f"wrote {png}")
    except Exception as e:  # noqa: BLE001
        print(f"no PNG: {e}")


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
