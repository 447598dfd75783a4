"""Benchmark of the local stages on one GPU: add+RMSNorm(+quant) and SiLU*mul(+quant).

Providers: ``eager`` (torch ops in the input dtype, as a user writes them), ``compile`` (torch.compile of that
function, static shapes, compiled once per shape), ``flashinfer`` (``flashinfer.norm.fused_add_rmsnorm``, bf16 out
only, when importable), ``tpfuse`` (:mod:`tpfuse.ops`, Triton kernels).

Timing (:func:`common.time_us`): 20 calls captured in one CUDA graph (inputs rotated over enough copies to exceed
L2 where they are small), the graph replayed as often as fits in ~25 ms (10..200 times), median per call. Effective
bandwidth = bytes read + written once / time.

Usage: ``python bench/bench_local.py [--quick] [--out-dir bench/results] [--budget-s 220] [--configs JSON]``.
Writes ``local_<device-slug>.json`` and ``local_<device-slug>_<op>.png`` (:func:`common.result_path`: ``--out-dir``,
else ``$OUT``, else ``bench/results``); prints a table. ``--configs`` overlays
a config sweep's winners on :mod:`tpfuse.kernels.local_configs` for this run (recorded in the header).

Launch-configuration sweep (:mod:`local_sweep`): ``python bench/bench_local.py --sweep-configs [--budget-s 240]``
writes ``local_configs_<device-slug>.json``; ``python bench/bench_local.py --bake <that json>`` (no GPU) writes
its winners into the table of ``kernels/local_configs.py``.
"""

from __future__ import annotations

import argparse
import math
import os
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
INTER = 14336
QUANTS = ("bf16", "fp8_static", "fp8_group128", "nvfp4")
PROVIDERS = ("eager", "compile", "flashinfer", "tpfuse")


# --------------------------------------------------------------------------------------------------------------
# eager providers (what a user writes: common's shared baselines)


def eager_add_rmsnorm(x, r, w, scale, quant):
    y, s = common.eager_add_rmsnorm(x, r, w, EPS)
    return (*common.eager_quant(y, quant, scale), s)


def eager_silu_mul(x, scale, quant):
    gate, up = x.chunk(2, dim=-1)
    if quant == "bf16":
        return (torch.nn.functional.silu(gate) * up,)
    y = torch.nn.functional.silu(gate.float()) * up.float()
    return common.eager_quant(y, quant, scale)


def spec_for(quant, scale):
    return {"bf16": None, "fp8_static": q.FP8Static(scale) if quant == "fp8_static" else None,
            "fp8_group128": q.FP8PerGroup(128), "nvfp4": q.NVFP4(scale) if quant == "nvfp4" else None}[quant]


# --------------------------------------------------------------------------------------------------------------
# timing


def time_graph(fn_list, target_s=0.025, min_trials=10, max_trials=200):
    """fn_list: CALLS_PER_GRAPH zero-arg callables. Median µs per call over graph replays (as many replays as fit
    in about ``target_s``, within ``[min_trials, max_trials]``): :func:`common.time_us` with a required graph
    (the form :mod:`local_sweep` takes its timer in)."""
    return common.time_us(fn_list, use_graph=True, replays=min_trials, target_s=target_s, max_replays=max_trials)[0]


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


def rotated(f, nc):
    """CALLS_PER_GRAPH calls of ``f(i)`` over ``nc`` input copies (one graph of them, see :func:`common.time_us`)."""
    return [(lambda i=i: f(i % nc)) for i in range(CALLS_PER_GRAPH)]


# --------------------------------------------------------------------------------------------------------------
# cases x providers


def norm_cases(grid, dev, gen, compiled, fi_fused_add_rmsnorm):
    """add + RMSNorm cases over hidden x tokens x quant; providers eager, compile, tpfuse (+ flashinfer, bf16)."""
    tokens, hiddens = grid
    for h in hiddens:
        w = torch.randn(h, device=dev, generator=gen).to(torch.bfloat16)
        for t in tokens:
            nc = n_copies(2 * t * h * 2)
            xs = [torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16) for _ in range(nc)]
            rs = [torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16) for _ in range(nc)]
            scale = torch.tensor(0.05, device=dev)
            for quant in QUANTS:
                spec = spec_for(quant, scale)
                provs = {"eager": lambda i: eager_add_rmsnorm(xs[i], rs[i], w, scale, quant),
                         "compile": lambda i: compiled(xs[i], rs[i], w, scale, quant),
                         "tpfuse": lambda i: ops.add_rmsnorm(xs[i], rs[i], w, EPS, quant=spec)}
                if quant == "bf16" and fi_fused_add_rmsnorm is not None:
                    provs["flashinfer"] = lambda i: fi_fused_add_rmsnorm(xs[i], rs[i], w, EPS)
                nbytes = 2 * t * h * 2 + h * 2 + t * h * 2 + out_bytes(t, h, quant)
                yield common.Case(fields=dict(op="add_rmsnorm", quant=quant, tokens=t, hidden=h),
                                  providers={n: rotated(f, nc) for n, f in provs.items()}, extra=dict(nbytes=nbytes))
            xs = rs = None  # free this size's inputs before the next one allocates


def silu_cases(tokens, dev, gen, compiled, skipped):
    """SiLU * mul cases over tokens x quant (intermediate INTER); a size that does not fit goes to ``skipped``."""
    for t in tokens:
        in_b = t * 2 * INTER * 2
        try:
            nc = n_copies(in_b)
            xs = [torch.randn(t, 2 * INTER, device=dev, generator=gen).to(torch.bfloat16) for _ in range(nc)]
        except torch.OutOfMemoryError:
            skipped.append(["all", "silu_mul", "*", t, INTER])
            continue
        scale = torch.tensor(0.05, device=dev)
        for quant in QUANTS:
            spec = spec_for(quant, scale)
            provs = {"eager": lambda i: eager_silu_mul(xs[i], scale, quant),
                     "compile": lambda i: compiled(xs[i], scale, quant),
                     "tpfuse": lambda i: ops.silu_mul(xs[i], quant=spec)}
            yield common.Case(fields=dict(op="silu_mul", quant=quant, tokens=t, hidden=INTER),
                              providers={n: rotated(f, nc) for n, f in provs.items()},
                              extra=dict(nbytes=in_b + out_bytes(t, INTER, quant)))
        xs = None  # free this size's inputs before the next one allocates
        torch.cuda.empty_cache()


def row(case, provider, timing):
    """A row ``{provider, op, quant, tokens, hidden, median_us, gbps}``; a failed provider is printed, no row."""
    f = case.fields
    if timing.mode.startswith("error"):
        print(f"# {provider} {f['op']} {f['quant']} {f['tokens']}x{f['hidden']} failed: {timing.mode[7:]}"[:300])
        return None
    us = timing.us
    return dict(provider=provider, **f, median_us=round(us, 3), gbps=round(case.extra["nbytes"] / (us * 1e-6) / 1e9, 1))


# --------------------------------------------------------------------------------------------------------------
# output


def plot(rows, slug, directory):
    plt = common.pyplot()
    if plt is None:
        print("# matplotlib not available: no plots")
        return
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
            common.style_axes(ax, title=f"{op}, hidden {h}, {slug}", ylabel="effective GB/s", ylog=False,
                              legend_size=7)
        fig.tight_layout()
        png = common.result_path("local", tag=op, ext="png", directory=directory)
        fig.savefig(png, dpi=90)
        plt.close(fig)
        print(f"# wrote {png}")


def table(rows):
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["quant"], r["hidden"], r["tokens"]), {})[r["provider"]] = r
    print(f"{'op':12s} {'quant':13s} {'hidden':>6s} {'tokens':>6s} "
          + " ".join(f"{p + ' us':>14s}" for p in PROVIDERS) + f" {'tpfuse GB/s':>11s} {'vs compile':>10s}")
    for key in sorted(by):
        d = by[key]
        cells = " ".join(f"{d[p]['median_us']:14.2f}" if p in d else f"{'-':>14s}" for p in PROVIDERS)
        ratio = (d["compile"]["median_us"] / d["tpfuse"]["median_us"]) if ("compile" in d and "tpfuse" in d) else 0
        gb = d["tpfuse"]["gbps"] if "tpfuse" in d else 0
        print(f"{key[0]:12s} {key[1]:13s} {key[2]:6d} {key[3]:6d} {cells} {gb:11.1f} {ratio:9.2f}x")


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default=None, help="default: $OUT, else bench/results")
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
    return ap.parse_args(argv)


def setup():
    """Dynamo's cache limits raised (one compile per shape), and FlashInfer's fused_add_rmsnorm or None."""
    torch._dynamo.config.cache_size_limit = 1024
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = 4096
    try:
        import flashinfer  # noqa: F401
        from flashinfer.norm import fused_add_rmsnorm
    except Exception:  # noqa: BLE001  (its version, when present, is in the results header)
        return None
    return fused_add_rmsnorm


def main(argv=None):
    args = parse_args(argv)
    if args.bake or args.sweep_configs:
        import local_sweep

        if args.bake:
            local_sweep.bake(args.bake)
            return
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
    fi_fused_add_rmsnorm = setup()
    if args.quick:
        norm_grid, tokens_silu = ([1, 16, 1024, 8192], [4096, 8192]), [1, 1024, 8192]
    else:
        tokens_silu = [1, 4, 16, 64, 256, 1024, 4096, 16384, 32768]
        norm_grid = (tokens_silu, [4096, 8192])
    gen = torch.Generator(device=dev).manual_seed(0)
    skipped, over_budget = [], []
    cases = [norm_cases(norm_grid, dev, gen, torch.compile(eager_add_rmsnorm, dynamic=False), fi_fused_add_rmsnorm),
             silu_cases(tokens_silu, dev, gen, torch.compile(eager_silu_mul, dynamic=False), skipped)]
    rows = [r for c in cases for r in common.run_cases(c, row, deadline=t_start + args.budget_s, skipped=over_budget)]
    skipped += [[name, c["op"], c["quant"], c["tokens"], c["hidden"]] for c in over_budget for name in c["providers"]]
    hdr = common.header("local", calls_per_graph=CALLS_PER_GRAPH, quick=args.quick, configs=args.configs,
                        configs_installed=installed, elapsed_s=round(time.time() - t_start, 1),
                        skipped_over_budget=skipped)
    print(f"# wrote {common.write_json(common.result_path('local', directory=args.out_dir), hdr, rows)}")
    plot(rows, common.device_slug(), args.out_dir)
    table(rows)
    if skipped:
        print(f"# {len(skipped)} rows skipped over the time budget")
    print(f"# elapsed {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
