"""Host (CPU) time per eager call of every public tpfuse op, next to a plain ``torch.add`` and ``dist.all_reduce``.

What is measured: the Python / dispatch / launch cost of one call. Each op runs on tiny tensors (4 x 4096 bf16:
about 2 us of GPU work), ``--calls`` times back to back with no synchronization inside the loop; the device is
synchronized before the loop starts and after it ends, and the loop's wall time / calls is the host time per call
(median of ``--repeats`` loops). If the GPU were the bottleneck the number would be GPU time, so a row is marked
``gpu_bound`` when it is within 20% of the GPU time of the same loop measured with CUDA events (GPU only).

Process group: under ``torchrun --nproc-per-node=1`` the torchrun environment; otherwise the script builds a
one-process group itself (NCCL when CUDA is present, gloo on CPU). The communicator rows run at TP=1.

On CPU the public ops run their plain-torch reference paths, so the numbers there measure the reference math
plus the dispatch / planning / checking layers, not the Triton launch path. ``--stub-kernels`` (CPU) routes the
local ops through their Triton launchers (``TPFUSE_TRITON_CPU=1``) with the ``@triton.jit`` kernels replaced by
no-ops, which isolates the Python cost in front of the Triton launch (custom-op dispatch, allocation, config
lookups, argument preparation).

Usage::

    python bench/bench_host.py [--calls 2000] [--repeats 7] [--out-dir DIR] [--stub-kernels] [--profile OP]
    torchrun --standalone --nproc-per-node=1 bench/bench_host.py

Writes ``host_<device-slug>[_<tag>].json`` (header: device, commit from ``$TPFUSE_COMMIT``, versions) to
``--out-dir`` (default ``$OUT``, else ``bench/results``: :func:`common.result_path`) and prints a table.
``--profile OP`` prints a cProfile of ``OP``'s loop instead (names as in the table's first column).
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

T, H, I = 4, 4096, 4096          # tokens, hidden, intermediate (silu_mul input is [T, 2I])
HQ, HKV, D, P = 32, 8, 128, 4096  # rope: heads, kv heads, head_dim, cached positions


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, calls: int, repeats: int, warmup: int = 50) -> float:
    """Median over ``repeats`` loops of (loop wall time / calls), in microseconds; no sync inside a loop (host
    time, the quantity this benchmark is about; device time is :func:`gpu_us`)."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(samples)


def gpu_us(fn, calls: int) -> float | None:
    """GPU time per call of the same back-to-back eager loop (:func:`common.time_us`, CUDA events, one
    measurement), or None on CPU."""
    if not torch.cuda.is_available():
        return None
    return common.time_us(fn, calls=calls, replays=1, use_graph=False)[0]


def stub_kernels():
    """Replace every local ``@triton.jit`` kernel by a no-op (``kernel[grid](*args)`` does nothing) and route CPU
    tensors to the Triton launchers: measures the Python layers in front of the launch on a CPU machine."""
    os.environ["TPFUSE_TRITON_CPU"] = "1"
    from tpfuse.kernels import add_rmsnorm, quantize, rope, silu_mul

    class Noop:
        def __getitem__(self, grid):
            return self

        def __call__(self, *args, **kwargs):
            return None

    for mod, name in ((add_rmsnorm, "_add_rmsnorm_kernel"), (silu_mul, "_silu_mul_kernel"),
                      (quantize, "_quantize_kernel"), (rope, "_qk_norm_rope_kernel"),
                      (rope, "_rope_kv_cache_kernel")):
        setattr(mod, name, Noop())


def cases(dev, comm):
    """``(name, fn, baseline)``: one eager call each; ``baseline`` names the row it is compared with."""
    from tpfuse import ops, quant as q, rope

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=dev)

    x, res, w = rnd(T, H), rnd(T, H), rnd(H)
    res_inplace = res.clone()
    gu = rnd(T, 2 * I)
    fp8_static = q.FP8Static(torch.tensor(0.05, device=dev))
    per_token = q.FP8PerToken()
    qkv = rnd(T, (HQ + 2 * HKV) * D)
    qw, kw = rnd(D), rnd(D)
    # a real rotary cache (|rotation| = 1): the in-place rope calls repeat on the same tensors and must not blow up
    ang = torch.arange(P, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
    cos_sin = torch.cat([ang.cos(), ang.sin()], dim=-1).to(dev)
    pos = torch.arange(T, device=dev, dtype=torch.int64)
    qr, kr, vr = rnd(T, HQ, D), rnd(T, HKV, D), rnd(T, HKV, D)
    kc = torch.zeros(16, 16, HKV, D, dtype=torch.bfloat16, device=dev)
    vc = torch.zeros_like(kc)
    slots = torch.arange(T, device=dev, dtype=torch.int64)
    from tpfuse import reference

    ar_buf = x.clone()  # dist.all_reduce is in place: sum into a copy (TP=1: unchanged)
    out = [
        ("torch.add", lambda: torch.add(x, res), None),
        ("torch.clone", lambda: x.clone(), None),
        ("dist.all_reduce", lambda: dist.all_reduce(ar_buf), None),
        ("reference.add_rmsnorm", lambda: reference.add_rmsnorm(x, res, w), None),
        ("reference.add_rmsnorm(no residual)", lambda: reference.add_rmsnorm(x, None, w), None),
        ("reference.add_rmsnorm(fp8_static)", lambda: reference.add_rmsnorm(x, res, w, quant=fp8_static), None),
        ("ops.add_rmsnorm", lambda: ops.add_rmsnorm(x, res, w), "torch.add"),
        ("ops.add_rmsnorm(no residual)", lambda: ops.add_rmsnorm(x, None, w), "torch.add"),
        ("ops.add_rmsnorm(residual_inplace)", lambda: ops.add_rmsnorm(x, res_inplace, w, residual_inplace=True),
         "torch.add"),
        ("ops.add_rmsnorm(fp8_static)", lambda: ops.add_rmsnorm(x, res, w, quant=fp8_static), "torch.add"),
        ("ops.silu_mul", lambda: ops.silu_mul(gu), "torch.add"),
        ("ops.silu_mul(fp8_static)", lambda: ops.silu_mul(gu, quant=fp8_static), "torch.add"),
        ("ops.quantize(fp8_per_token)", lambda: ops.quantize(x, per_token), "torch.add"),
        ("rope.qk_norm_rope", lambda: rope.qk_norm_rope(qkv, qw, kw, cos_sin, pos, num_heads=HQ,
                                                         num_kv_heads=HKV, head_dim=D), "torch.add"),
        ("rope.rope_kv_cache_write", lambda: rope.rope_kv_cache_write(qr, kr, vr, pos, cos_sin, kc, vc, slots),
         "torch.add"),
    ]
    if comm is not None:
        # baselines: what the planned path runs without the communicator around it (TP=1: no collective needed)
        local = "reference" if comm.plan(T).path("fused_add_rmsnorm") == "reference" else "ops"
        ar_base = "torch.clone" if comm.tp == 1 else "dist.all_reduce"
        out += [
            ("comm.plan", lambda: comm.plan(T), None),
            ("comm.all_reduce", lambda: comm.all_reduce(x), ar_base),
            ("comm.fused_add_rmsnorm", lambda: comm.fused_add_rmsnorm(x, res, w), f"{local}.add_rmsnorm"),
            ("comm.fused_add_rmsnorm(no residual)", lambda: comm.fused_add_rmsnorm(x, None, w),
             f"{local}.add_rmsnorm(no residual)"),
            ("comm.fused_add_rmsnorm(fp8_static)", lambda: comm.fused_add_rmsnorm(x, res, w, quant=fp8_static),
             f"{local}.add_rmsnorm(fp8_static)"),
        ]
    return out


def profile(fn, calls):
    """cProfile of ``calls`` back-to-back calls of ``fn`` (after a warm-up), printed."""
    import cProfile
    import pstats

    for _ in range(50):
        fn()
    sync()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    sync()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)


def measure(rows_in, args):
    rows, by_name = [], {}
    for name, fn, base in rows_in:
        us = host_us(fn, args.calls, args.repeats)
        g_us = gpu_us(fn, min(args.calls, 500))
        by_name[name] = us
        rows.append({"op": name, "host_us": round(us, 2), "gpu_us": None if g_us is None else round(g_us, 2),
                     "gpu_bound": bool(g_us is not None and g_us > 0.8 * us), "baseline": base,
                     "over_baseline_us": None if base not in by_name else round(us - by_name[base], 2)})
    return rows


def report(rows, args, backend, mode):
    print(f"host time per eager call: {common.device_name()}, backend={backend}, TP=1, {mode}, "
          f"tensors {T}x{H} bf16, {args.calls} calls x {args.repeats}")
    print(f"{'op':<40} {'host us':>9} {'gpu us':>8} {'baseline':<30} {'+us':>8}")
    for r in rows:
        gp = "" if r["gpu_us"] is None else f"{r['gpu_us']:.2f}" + ("*" if r["gpu_bound"] else "")
        extra = "" if r["over_baseline_us"] is None else f"{r['over_baseline_us']:+.2f}"
        print(f"{r['op']:<40} {r['host_us']:>9.2f} {gp:>8} {r['baseline'] or '':<30} {extra:>8}")
    from tpfuse.kernels import fast_launch

    print(f"fast_launch: enabled={fast_launch.ENABLED} calls {fast_launch.STATS}")
    hdr = common.header("bench_host", mode=mode, backend=backend, tp=1, tokens=T, hidden=H, calls=args.calls,
                        repeats=args.repeats, stub_kernels=bool(args.stub_kernels),
                        fast_launch=dict(enabled=fast_launch.ENABLED, **fast_launch.STATS))
    path = common.write_json(common.result_path("host", tag=args.tag, directory=args.out_dir), hdr, rows)
    print("wrote", path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out-dir", default=None, help="default: $OUT, else bench/results")
    ap.add_argument("--stub-kernels", action="store_true", help="CPU: Triton launchers with no-op kernels")
    ap.add_argument("--profile", default=None, help="cProfile one row's loop instead of timing the table")
    ap.add_argument("--only", default=None, help="comma-separated row names to time")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args(argv)
    # torchrun's process group when its environment is set, else a one-process group of our own
    with common.rank_context(single_process=True) as ranks:
        if args.stub_kernels:
            if ranks.device.type == "cuda":
                raise SystemExit("--stub-kernels is a CPU measurement aid")
            stub_kernels()
        import tpfuse

        comm = tpfuse.TPCommunicator(max_tokens=64, hidden_size=H, dtype=torch.bfloat16)
        rows_in = cases(ranks.device, comm)
        if args.only:
            keep = set(args.only.split(","))
            rows_in = [r for r in rows_in if r[0] in keep or r[0] in {b for _, _, b in rows_in if b}]
        if args.profile:
            profile(dict((n, f) for n, f, _ in rows_in)[args.profile], args.calls)
            return None
        mode = ("reference path (CPU)" if ranks.device.type == "cpu" and not args.stub_kernels else
                "Triton launchers with no-op kernels (CPU)" if args.stub_kernels else "Triton kernels (GPU)")
        path = report(measure(rows_in, args), args, ranks.backend, mode)
        comm.close()
    return path


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)
