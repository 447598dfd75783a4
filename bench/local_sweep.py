"""Launch-configuration sweep of the local kernels (``python bench/bench_local.py --sweep-configs``).

For every bucket ``op x format x width x tokens`` (:data:`BUCKETS`, widths H in {4096, 8192}, silu_mul I = 14336,
tokens in :data:`tpfuse.kernels.local_configs.TOKEN_BUCKETS`) it times a handful of candidate
:class:`LaunchConfig` s (:func:`candidates`, the default always among them) through the public ops, 20 calls per
CUDA graph, median per call, and writes ``local_configs_<dev>.json``:

* ``timings``: every measurement (op, format, hidden, tokens, config, label, median_us, pass); the candidates
  are :func:`candidates` plus the table's current entry when it is not among them (a re-sweep keeps it in play);
* ``best``: per bucket the winner (``hidden_bucket`` / ``token_bucket`` are the table keys), its time, the
  default's time and the ratio. Pass 2 re-times the three fastest of pass 1 plus the default, a candidate's
  time is its best of the two passes, and the default is kept unless the winner is >= 1% faster (noise guard);
* ``skipped``: buckets not started within the budget.

Compilation dominates a cold run (a few hundred kernel variants, ~0.5 s each), so the variants are compiled
first by a pool of worker processes (each launches every candidate once on a 2-row input: same specialization,
so the timing process finds the binaries in Triton's on-disk cache). Budget: ``--budget-s`` (default 240 s of
wall time, compile phase included); buckets are ordered by importance (add_rmsnorm, silu_mul, quantize) and a
bucket is not started when the budget is spent. Progress: one line per bucket.

Baking the winners in: ``python bench/bench_local.py --bake bench/results/local_configs_<dev>.json`` rewrites the
generated block of ``kernels/local_configs.py`` (the only file that changes); ``--configs <json>`` tries them
in a normal benchmark run without editing anything.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict

import torch

from tpfuse import ops
from tpfuse import quant as q
from tpfuse.kernels import local_configs as lc
from tpfuse.kernels.local_configs import LaunchConfig

HERE = os.path.dirname(os.path.abspath(__file__))  # imported by bench_local.py, which puts the repo on sys.path

# the format each table name is swept with (NVFP4: the swizzled scales the GEMMs read; "nvfp4" rows serve both)
FMT_IDS = {name: fmt for fmt, name in sorted(lc.FORMAT_NAMES.items())}
GROUP = 128
EPS = 1e-6
INTER = 14336

BUCKETS = ([("add_rmsnorm", f, h) for f in ("none", "fp8_static", "fp8_group", "nvfp4") for h in (4096, 8192)]
           + [("silu_mul", f, INTER) for f in ("none", "fp8_static", "fp8_group", "nvfp4")]
           + [("quantize", f, h) for f in ("fp8_group", "nvfp4", "fp8_per_token") for h in (4096, 8192)])


# --------------------------------------------------------------------------------------------------------------
# candidates


def _uniq(cfgs):
    out = []
    for c in cfgs:
        if c not in out:
            out.append(c)
    return out


def candidates(op: str, fmt: str, width: int, tokens: int):
    """Candidate configs of one bucket, the default first (already sanitized, duplicates dropped)."""
    fid = FMT_IDS[fmt]
    full = lc.next_pow2(width)
    d = lc.default_config(op, fid, width, tokens)
    cands = [d]
    if op == "add_rmsnorm":
        nws = [nw for nw in (4, 8, 16, 32) if 8 <= full // (32 * nw) <= 32]
        if tokens <= 128:
            cands += [LaunchConfig(nw) for nw in nws]
            if fid != 2:
                splits = (2, 4, 8) if tokens <= 16 else (2,)
                cands += [LaunchConfig(nw, split=s) for s in splits for nw in (4, 8)
                          if 4 <= full // s // (32 * nw) <= 16]
        else:
            cands += [LaunchConfig(nw, rows=r) for r in (1, 2, 4) for nw in nws]
    else:
        if fid == 2:  # whole-row tile: only the warps and rows vary
            small = [(full, nw) for nw in (4, 8, 16, 32) if 4 <= full // (32 * nw) <= 32]
            large, paired = small, small
        else:
            # (256, 2), (512, 2), (1024, 2): more, smaller programs for the launch-bound 1..16-token rows (the
            # 9922ba0 sweep's winners there were its smallest tiles, still 6-10% behind torch.compile)
            small = [(256, 2), (512, 2), (1024, 2), (512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8),
                     (4096, 16)]
            large = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]
            paired = [(1024, 4), (2048, 8), (4096, 8)]
        if tokens <= 128:
            cands += [LaunchConfig(nw, block=b) for b, nw in small if b <= full]
        else:
            cands += [LaunchConfig(nw, block=b) for b, nw in large if b <= full]
            cands += [LaunchConfig(nw, block=b, rows=2) for b, nw in paired if b <= full]
            cands += [LaunchConfig(d.num_warps, block=d.block, rows=4)]
    return _uniq([lc.sanitize(op, fid, width, GROUP, c) for c in cands])


# --------------------------------------------------------------------------------------------------------------
# inputs and calls


def make_inputs(op, fmt, width, tokens, n_copies, device):
    """Per-copy argument tuples plus the quant spec."""
    gen = torch.Generator(device=device).manual_seed(0)
    scale = torch.tensor(0.05, device=device)
    spec = {"none": None, "fp8_static": q.FP8Static(scale), "fp8_per_token": q.FP8PerToken(),
            "fp8_group": q.FP8PerGroup(GROUP), "nvfp4": q.NVFP4(torch.tensor(100.0, device=device))}[fmt]
    cols = 2 * width if op == "silu_mul" else width
    xs = [torch.randn(tokens, cols, device=device, generator=gen).to(torch.bfloat16) for _ in range(n_copies)]
    if op == "add_rmsnorm":
        rs = [torch.randn(tokens, width, device=device, generator=gen).to(torch.bfloat16) for _ in range(n_copies)]
        w = torch.randn(width, device=device, generator=gen).to(torch.bfloat16)
        return [(x, r, w) for x, r in zip(xs, rs)], spec
    return [(x,) for x in xs], spec


def call(op, args, spec):
    if op == "add_rmsnorm":
        x, r, w = args
        return ops.add_rmsnorm(x, r, w, EPS, quant=spec)
    if op == "silu_mul":
        return ops.silu_mul(args[0], quant=spec)
    return ops.quantize(args[0], spec)


def bytes_per_call(op, fmt, width, tokens):
    t, h = tokens, width
    out = {"none": 2 * t * h, "fp8_static": t * h, "fp8_per_token": t * h + 4 * t,
           "fp8_group": t * h + 4 * t * (h // GROUP), "nvfp4": t * h // 2 + t * h // 16}[fmt]
    if op == "add_rmsnorm":
        return 2 * t * h * 2 + h * 2 + t * h * 2 + out
    if op == "silu_mul":
        return 2 * t * h * 2 + out
    return t * h * 2 + out


def _precompile_worker(task):
    op, fmt, width, cfg = task
    try:
        args, spec = make_inputs(op, fmt, width, 2, 1, torch.device("cuda"))
        with lc.forced(LaunchConfig(**cfg)):
            call(op, args[0], spec)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported, the timing phase compiles it again
        return f"{op} {fmt} {width} {cfg}: {type(e).__name__}: {e}"[:300]


def precompile(common, tasks, workers, timeout_s=120.0):
    """Compile every distinct (op, format, width, config) in a spawn process pool (``common.precompile_pool``);
    returns (seconds, errors)."""
    return common.precompile_pool(_precompile_worker, tasks, workers, timeout_s)


# --------------------------------------------------------------------------------------------------------------


def _plan(args, bucket_list):
    """The buckets to time, their candidates (the table's current entry kept in play) and the distinct kernel
    variants to precompile."""
    tokens_list = [int(t) for t in args.sweep_tokens.split(",")]
    ops_sel = set(args.sweep_ops.split(","))
    buckets = [(op, f, w, t) for op, f, w in bucket_list if op in ops_sel for t in tokens_list]
    plan = {b: candidates(*b) for b in buckets}
    for (op, f, w, t), cs in plan.items():  # a re-sweep never loses the table's current choice
        cur = lc.lookup(op, FMT_IDS[f], w, t, GROUP)
        if cur not in cs:
            cs.append(cur)
    tasks = sorted({(op, f, w, tuple(sorted(asdict(c).items()))) for (op, f, w, t), cs in plan.items() for c in cs})
    return buckets, plan, [(op, f, w, dict(c)) for op, f, w, c in tasks]


def _time_bucket(bucket, cands, argsets, spec, timer, timings):
    """Pass 1 over every candidate, pass 2 over the three fastest plus the default; ``{config: [us, ...]}``.
    ``timer(config, fns)`` -> µs per call; every measurement is appended to ``timings``."""
    op, fmt, width, tokens = bucket
    nbytes, nc, res = bytes_per_call(op, fmt, width, tokens), len(argsets), {}

    def measure(cfg, pass_no):
        with lc.forced(cfg):
            us = timer([(lambda k=k: call(op, argsets[k % nc], spec)) for k in range(timer.calls)])
        res.setdefault(cfg, []).append(us)
        timings.append(dict(op=op, format=fmt, hidden=width, tokens=tokens, config=asdict(cfg),
                            label=cfg.short(), median_us=round(us, 3), gbps=round(nbytes / us / 1e3, 1),
                            **{"pass": pass_no}))

    for cfg in cands:
        try:
            measure(cfg, 1)
        except Exception as e:  # noqa: BLE001 - a candidate that fails is reported and dropped
            print(f"#   {op} {fmt} {width}x{tokens} {cfg.short()} failed: {type(e).__name__}: {e}"[:300])
    if not res:
        return res
    top = sorted(res, key=lambda c: min(res[c]))[:3]
    for cfg in _uniq(top + ([cands[0]] if cands[0] in res else [])):
        try:
            measure(cfg, 2)
        except Exception as e:  # noqa: BLE001 - keep pass 1's number
            print(f"#   {op} {fmt} {width}x{tokens} {cfg.short()} pass 2 failed: {type(e).__name__}: {e}"[:300])
    return res


def _winner(bucket, default, res):
    """The bucket's ``best`` entry: a candidate's time is its best pass; the default stays unless the winner is
    >= 1% faster (noise guard)."""
    op, fmt, width, tokens = bucket
    nbytes = bytes_per_call(op, fmt, width, tokens)
    score = {c: min(v) for c, v in res.items()}
    win = min(score, key=score.get)
    if default in score and score[win] > 0.99 * score[default]:
        win = default
    d_us = score.get(default, float("nan"))
    return dict(op=op, format=fmt, hidden=width, tokens=tokens, hidden_bucket=lc.next_pow2(width),
                token_bucket=lc.token_bucket(tokens), config=asdict(win), label=win.short(),
                median_us=round(score[win], 3), default_label=default.short(), default_us=round(d_us, 3),
                speedup_vs_default=round(d_us / score[win], 3), gbps=round(nbytes / score[win] / 1e3, 1))


def _write(args, common, best, timings, skipped, run_info):
    header = common.header("local_configs", budget_s=args.budget_s, **run_info,
                           method="CUDA graph of 20 calls, median per call; pass 2 re-times the 3 fastest + "
                                  "default, best of passes; default kept unless >= 1% slower")
    path = common.write_json(common.result_path("local_configs", directory=args.out_dir), header, best=best,
                             timings=timings, skipped=skipped)
    changed = [b for b in best if b["label"] != b["default_label"]]
    print(f"# wrote {path}: {len(best)} buckets, {len(changed)} non-default winners, {len(skipped)} skipped; "
          f"geomean speedup vs default "
          f"{statistics.geometric_mean([b['speedup_vs_default'] for b in best]) if best else 1:.3f}x; "
          f"elapsed {run_info['elapsed_s']:.1f} s")
    print(f"# bake: python bench/bench_local.py --bake {os.path.relpath(path)}")
    return path


def run_sweep(args, time_graph, n_copies, calls_per_graph, common, device="cuda", bucket_list=BUCKETS):
    """The sweep (see the module docstring). ``args``: budget_s, sweep_tokens, sweep_ops, precompile_workers,
    out_dir; ``time_graph(fns, target_s=, min_trials=, max_trials=)`` -> µs per call. ``device`` / ``bucket_list``
    let the CPU test drive it through the Triton interpreter. Returns the JSON path."""
    t_start = time.time()
    dev = torch.device(device)
    buckets, plan, tasks = _plan(args, bucket_list)
    print(f"# sweep: {len(buckets)} buckets, {sum(len(c) for c in plan.values())} candidate timings, "
          f"{len(tasks)} kernel variants; budget {args.budget_s:.0f} s", flush=True)
    workers = args.precompile_workers if args.precompile_workers >= 0 else max(1, min(14, (os.cpu_count() or 2) - 2))
    if dev.type != "cuda":
        workers = 0
    comp_s, errs = precompile(common, tasks, workers, timeout_s=min(120.0, args.budget_s / 2))
    print(f"# precompiled {len(tasks)} variants with {workers} workers in {comp_s:.1f} s"
          + (f"; {len(errs)} failed (first: {errs[0]})" if errs else ""), flush=True)

    def timer(fns):
        return time_graph(fns, target_s=0.012, min_trials=5, max_trials=100)

    timer.calls = calls_per_graph
    timings, best, skipped = [], [], []
    for i, bucket in enumerate(buckets):
        if time.time() - t_start > args.budget_s:
            skipped.append(list(bucket))
            continue
        try:
            argsets, spec = make_inputs(*bucket, n_copies(bytes_per_call(*bucket)), dev)
        except torch.OutOfMemoryError:
            skipped.append(list(bucket))
            continue
        res = _time_bucket(bucket, plan[bucket], argsets, spec, timer, timings)
        argsets = None  # free the inputs before the next bucket allocates
        if not res:
            skipped.append(list(bucket))
            continue
        best.append(_winner(bucket, plan[bucket][0], res))
        b = best[-1]
        print(f"[{i + 1}/{len(buckets)} {time.time() - t_start:6.1f}s] {bucket[0]:11s} {bucket[1]:13s} "
              f"{bucket[2]:5d} x {bucket[3]:5d}: default {b['default_label']:10s} {b['default_us']:9.2f} us -> "
              f"{b['label']:10s} {b['median_us']:9.2f} us ({b['speedup_vs_default']:.2f}x, {b['gbps']:.0f} GB/s)  "
              f"[{len(res)} cands]", flush=True)
        if bucket[3] >= 8192 and dev.type == "cuda":
            torch.cuda.empty_cache()
    return _write(args, common, best, timings, skipped,
                  dict(calls_per_graph=calls_per_graph, elapsed_s=round(time.time() - t_start, 1),
                       precompile_s=round(comp_s, 1), precompile_workers=workers, precompile_errors=errs[:20]))


def bake(path: str, target: str = os.path.join(HERE, "..", "kernels", "local_configs.py")) -> str:
    """Rewrite the generated table of kernels/local_configs.py (``target``) from a sweep JSON; returns its path."""
    with open(path) as fh:
        sweep = json.load(fh)
    entries = lc.winners(sweep)
    with open(target) as fh:
        src = fh.read()
    h = sweep.get("header", {})
    origin = (f"{os.path.relpath(path, os.path.join(HERE, '..'))}, {h.get('device', '?')}, "
              f"commit {h.get('commit', '?')}, {h.get('date', '?')}")
    new = lc.bake(src, entries, origin)
    with open(target, "w") as fh:
        fh.write(new)
    changed = sum(1 for b in sweep["best"] if b["label"] != b["default_label"])
    print(f"# baked {len(entries)} entries ({changed} differ from the default rule) into {os.path.normpath(target)}")
    return target
