"""Benchmark of the local stages on one GPU: add+RMSNorm(+quant) and SiLU*mul(+quant).

Providers: ``eager`` (torch ops in the input dtype, as a user writes them), ``compile`` (torch.compile of that
function, static shapes, compiled once per shape), ``flashinfer`` (``flashinfer.norm.fused_add_rmsnorm``, bf16 out
only, when importable), ``tpfuse`` (:mod:`tpfuse.ops`, Triton kernels).

Timing: 20 calls captured in one CUDA graph (inputs rotated over enough copies to exceed L2 where they are small),
the graph replayed many times, median per call. Effective bandwidth = bytes read + written once / time.

Usage: ``python bench/bench_local.py [--quick] [--out-dir bench/results] [--budget-s 220] [--configs JSON]``.
Writes ``local_<device-slug>.json`` and ``local_<op>_<device-slug>.png``; prints a table. ``--configs`` overlays
a config sweep's winners on :mod:`tpfuse.kernels.local_configs` for this run (recorded in the header).

Launch-configuration sweep (:mod:`local_sweep`): ``python bench/bench_local.py --sweep-configs [--budget-s 240]``
writes ``local_configs_<device-slug>.json``; ``python bench/bench_local.py --bake <that json>`` (no GPU) writes
its winners into the table of ``kernels/local_configs.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tpfuse import ops  # noqa: E402
from tpfuse import quant as q  # noqa: E402

CALLS_PER_GRAPH = 20
L2_ROTATE_BYTES = 256 << 20
EPS = 1e-6


# --------------------------------------------------------------------------------------------------------------
# eager providers (what a user writes)


def eager_quant(y, quant, gs):
    """y: fp32 tensor -> tensors of the quantized form (plain torch)."""
    if quant == "bf16":
        return (y.to(torch.bfloat16),)
    if quant == "fp8_static":
        return (q.fp8_quantize_static(y, gs),)
    if quant == "fp8_group128":
        t, h = y.shape
        yg = y.reshape(t, h // 128, 128)
        sc = (yg.abs().amax(dim=-1, keepdim=True) / q.FP8_MAX).clamp(min=q.FP8_MIN_SCALE)
        return (yg * (1.0 / sc)).clamp(-q.FP8_MAX, q.FP8_MAX).to(q.FP8_DTYPE).reshape(t, h), sc.reshape(t, h // 128)
    if quant == "nvfp4":
        return q.nvfp4_quantize(y, gs, "swizzled128x4")
    raise ValueError(quant)


def eager_add_rmsnorm(x, r, w, scale, quant):
    s = x + r
    sf = s.float()
    y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()
    return (*eager_quant(y, quant, scale), s)


def eager_silu_mul(x, scale, quant):
    gate, up = x.chunk(2, dim=-1)
    if quant == "bf16":
        return (torch.nn.functional.silu(gate) * up,)
    y = torch.nn.functional.silu(gate.float()) * up.float()
    return eager_quant(y, quant, scale)


def spec_for(quant, scale):
    return {"bf16": None, "fp8_static": q.FP8Static(scale) if quant == "fp8_static" else None,
            "fp8_group128": q.FP8PerGroup(128), "nvfp4": q.NVFP4(scale) if quant == "nvfp4" else None}[quant]


# --------------------------------------------------------------------------------------------------------------
# timing


def time_graph(fn_list, target_s=0.025, min_trials=10, max_trials=200):
    """fn_list: CALLS_PER_GRAPH zero-arg callables. Median µs per call over graph replays (as many replays as fit
    in about ``target_s``, within ``[min_trials, max_trials]``)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list[:3]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    # calibrate the number of trials to ~40 ms per measurement set
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    trials = int(min(max_trials, max(min_trials, target_s / max(one, 1e-6))))
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fn_list))
    del g
    return statistics.median(times)


def n_copies(bytes_per_call):
    return int(min(CALLS_PER_GRAPH, max(1, math.ceil(L2_ROTATE_BYTES / max(bytes_per_call, 1)))))


def out_bytes(t, h, quant):
    if quant == "bf16":
        return t * h * 2
    if quant == "fp8_static":
        return t * h
    if quant == "fp8_group128":
        return t * h + t * (h // 128) * 4
    if quant == "nvfp4":
        return t * h // 2 + t * h // 16
    raise ValueError(quant)


# --------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new rows (sweep: buckets) after this many seconds (default 220; sweep 240)")
    ap.add_argument("--configs", default=None, help="overlay a config sweep's winners (local_configs_<dev>.json)")
    ap.add_argument("--sweep-configs", action="store_true", help="run the launch-configuration sweep instead")
    ap.add_argument("--sweep-ops", default="add_rmsnorm,silu_mul,quantize")
    ap.add_argument("--sweep-tokens", default="1,16,128,1024,8192,32768")
    ap.add_argument("--precompile-workers", type=int, default=-1,
                    help="sweep: processes compiling the kernel variants first (-1: cpu count - 2, at most 14)")
    ap.add_argument("--bake", default=None, metavar="SWEEP_JSON",
                    help="write a sweep's winners into kernels/local_configs.py (no GPU needed) and exit")
    args = ap.parse_args()
    if args.bake:
        import local_sweep

        local_sweep.bake(args.bake)
        return
    if args.sweep_configs:
        import local_sweep

        args.budget_s = 240.0 if args.budget_s is None else args.budget_s
        local_sweep.run_sweep(args, time_graph, n_copies, CALLS_PER_GRAPH, common)
        return
    args.budget_s = 220.0 if args.budget_s is None else args.budget_s
    installed = None
    if args.configs:
        from tpfuse.kernels import local_configs

        installed = local_configs.install(args.configs)
        print(f"# using {installed} swept launch configs from {args.configs}")
    t_start = time.time()
    dev = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 1024
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 4096

    try:
        import flashinfer  # noqa: F401
        from flashinfer.norm import fused_add_rmsnorm as fi_fused_add_rmsnorm
    except Exception:  # noqa: BLE001  (its version, when present, is in the results header)
        fi_fused_add_rmsnorm = None

    if args.quick:
        tokens_norm, hiddens, tokens_silu = [1, 16, 1024, 8192], [4096, 8192], [1, 1024, 8192]
        quants_norm = ["bf16", "fp8_static", "fp8_group128", "nvfp4"]
    else:
        tokens_norm, hiddens = [1, 4, 16, 64, 256, 1024, 4096, 16384, 32768], [4096, 8192]
        tokens_silu = [1, 4, 16, 64, 256, 1024, 4096, 16384, 32768]
        quants_norm = ["bf16", "fp8_static", "fp8_group128", "nvfp4"]
    quants_silu = ["bf16", "fp8_static", "fp8_group128", "nvfp4"]
    inter = 14336

    compiled_norm = torch.compile(eager_add_rmsnorm, dynamic=False)
    compiled_silu = torch.compile(eager_silu_mul, dynamic=False)
    rows, skipped = [], []
    gen = torch.Generator(device=dev).manual_seed(0)

    def record(provider, op, quant, t, h, us, nbytes):
        rows.append(dict(provider=provider, op=op, quant=quant, tokens=t, hidden=h, median_us=round(us, 3),
                         gbps=round(nbytes / (us * 1e-6) / 1e9, 1)))

    # ---------------- add + RMSNorm
    for h in hiddens:
        w = torch.randn(h, device=dev, generator=gen).to(torch.bfloat16)
        for t in tokens_norm:
            in_bytes = 2 * t * h * 2 + h * 2
            nc = n_copies(2 * t * h * 2)
            xs = [torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16) for _ in range(nc)]
            rs = [torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16) for _ in range(nc)]
            scale = torch.tensor(0.05, device=dev)
            for quant in quants_norm:
                nbytes = in_bytes + t * h * 2 + out_bytes(t, h, quant)
                spec = spec_for(quant, scale)
                provs = [("eager", lambda i: eager_add_rmsnorm(xs[i], rs[i], w, scale, quant)),
                         ("compile", lambda i: compiled_norm(xs[i], rs[i], w, scale, quant)),
                         ("tpfuse", lambda i: ops.add_rmsnorm(xs[i], rs[i], w, EPS, quant=spec))]
                if quant == "bf16" and fi_fused_add_rmsnorm is not None:
                    provs.append(("flashinfer", lambda i: fi_fused_add_rmsnorm(xs[i], rs[i], w, EPS)))
                for name, f in provs:
                    if time.time() - t_start > args.budget_s:
                        skipped.append((name, "add_rmsnorm", quant, t, h))
                        continue
                    try:
                        if name == "compile":
                            f(0)  # compile outside the graph
                        us = time_graph([(lambda i=i: f(i % nc)) for i in range(CALLS_PER_GRAPH)])
                        record(name, "add_rmsnorm", quant, t, h, us, nbytes)
                    except Exception as e:  # noqa: BLE001
                        print(f"# {name} add_rmsnorm {quant} {t}x{h} failed: {type(e).__name__}: {e}"[:300])
            del xs, rs

    # ---------------- SiLU * mul
    for t in tokens_silu:
        in_b = t * 2 * inter * 2
        try:
            nc = n_copies(in_b)
            xs = [torch.randn(t, 2 * inter, device=dev, generator=gen).to(torch.bfloat16) for _ in range(nc)]
        except torch.OutOfMemoryError:
            skipped.append(("all", "silu_mul", "*", t, inter))
            continue
        scale = torch.tensor(0.05, device=dev)
        for quant in quants_silu:
            nbytes = in_b + out_bytes(t, inter, quant)
            spec = spec_for(quant, scale)
            provs = [("eager", lambda i: eager_silu_mul(xs[i], scale, quant)),
                     ("compile", lambda i: compiled_silu(xs[i], scale, quant)),
                     ("tpfuse", lambda i: ops.silu_mul(xs[i], quant=spec))]
            for name, f in provs:
                if time.time() - t_start > args.budget_s:
                    skipped.append((name, "silu_mul", quant, t, inter))
                    continue
                try:
                    if name == "compile":
                        f(0)
                    us = time_graph([(lambda i=i: f(i % nc)) for i in range(CALLS_PER_GRAPH)])
                    record(name, "silu_mul", quant, t, inter, us, nbytes)
                except Exception as e:  # noqa: BLE001
                    print(f"# {name} silu_mul {quant} {t}x{inter} failed: {type(e).__name__}: {e}"[:300])
        del xs
        torch.cuda.empty_cache()

    # ---------------- output
    slug = common.device_slug()
    header = common.header("local", calls_per_graph=CALLS_PER_GRAPH, quick=args.quick, configs=args.configs,
                           configs_installed=installed,
                           elapsed_s=round(time.time() - t_start, 1), skipped_over_budget=[list(s) for s in skipped])
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"local_{slug}.json")
    with open(path, "w") as fh:
        json.dump(dict(header=header, rows=rows), fh, indent=1)
    print(f"# wrote {path}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for op in ("add_rmsnorm", "silu_mul"):
            op_rows = [r for r in rows if r["op"] == op]
            hs = sorted({r["hidden"] for r in op_rows})
            if not hs:
                continue
            fig, axes = plt.subplots(1, len(hs), figsize=(7 * len(hs), 5), squeeze=False)
            for ax, h in zip(axes[0], hs):
                for key in sorted({(r["provider"], r["quant"]) for r in op_rows if r["hidden"] == h}):
                    pts = sorted((r["tokens"], r["gbps"]) for r in op_rows
                                 if r["hidden"] == h and (r["provider"], r["quant"]) == key)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            linestyle="-" if key[0] == "tpfuse" else "--", label=f"{key[0]} {key[1]}")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("tokens")
                ax.set_ylabel("effective GB/s")
                ax.set_title(f"{op}, hidden {h}, {slug}")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
            fig.tight_layout()
            png = os.path.join(args.out_dir, f"local_{op}_{slug}.png")
            fig.savefig(png, dpi=90)
            plt.close(fig)
            print(f"# wrote {png}")
    except ImportError:
        print("# matplotlib not available: no plots")

    # ---------------- table
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["quant"], r["hidden"], r["tokens"]), {})[r["provider"]] = r
    provs = ["eager", "compile", "flashinfer", "tpfuse"]
    print(f"{'op':12s} {'quant':13s} {'hidden':>6s} {'tokens':>6s} " + " ".join(f"{p + ' us':>14s}" for p in provs)
          + f" {'tpfuse GB/s':>11s} {'vs compile':>10s}")
    for key in sorted(by):
        d = by[key]
        cells = " ".join(f"{d[p]['median_us']:14.2f}" if p in d else f"{'-':>14s}" for p in provs)
        ratio = (d["compile"]["median_us"] / d["tpfuse"]["median_us"]) if ("compile" in d and "tpfuse" in d) else 0
        gb = d["tpfuse"]["gbps"] if "tpfuse" in d else 0
        print(f"{key[0]:12s} {key[1]:13s} {key[2]:6d} {key[3]:6d} {cells} {gb:11.1f} {ratio:9.2f}x")
    if skipped:
        print(f"# {len(skipped)} rows skipped over the time budget")
    print(f"# elapsed {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
