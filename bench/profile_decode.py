"""Where a decode step of the parallelized model spends its GPU time: ``torch.profiler`` over graph-replayed decode
steps (``--steps``) of an ``bench_e2e.py`` model, the kernels' total CUDA time per step, sorted, and how many
kernels a step launches per decoder layer.

    torchrun --standalone --nproc-per-node=1 bench/profile_decode.py [--model 8B] [--layers 4|full] [--vocab real|N]
        [--batch 1] [--context 1024] [--no-pdl] [--[no-]fold-norms] [--fp8]
        [--small-m-table PATH [--small-m-everywhere]]

``--model``: a ``bench_e2e.py`` model name, shards (``70B/tp8``) included; ``--layers`` / ``--vocab`` as there;
``--no-pdl`` captures the decode graphs without programmatic dependent launch (``KVCacheConfig.pdl=False``; under
PDL a kernel's profiled time includes its wait for the kernel before it, so per-kernel times read best without);
``--fold-norms`` / ``--no-fold-norms`` set ``KVCacheConfig.fold_norms`` (default: the config's default, on, as users
get it, for the bf16 full models; shards, whose add + RMSNorm the fused all-reduce does, and FP8 layers never fold);
a folded step is ``_foldnorm`` in the file name;
``--fp8`` with the decoder's linears in per-channel e4m3 (``quantize_fp8``'s default, ``_fp8``; the 8B's
``tpfuse_fp8`` rows);
``--small-m-table`` installs a small-M GEMM routing table (``--small-m-everywhere``: every row of it routed to the
kernel), as ``bench_e2e.py``'s variant rows do.
Prints the table and writes it (with device, commit, versions) to ``profile_decode_tp{N}_{device}_{model}_b{B}.json``
in ``$OUT`` (else ``bench/results``; a ``/`` of a shard name becomes ``-``). Each row: ``kernel``,
``calls_per_step``, ``calls_per_layer`` (= calls per step / layers), ``us_per_step``. The header adds
(:func:`kernel_counts`): ``kernels_per_step`` (CUDA kernels of one replayed step, as the profiler traced them,
memcpy / memset not counted), ``kernels_per_layer`` (that / layers), ``layer_kernels_per_layer`` (only the kernels
launched at least once per layer: what one decoder layer launches), ``other_kernels_per_step`` (the rest: embedding,
final norm, lm_head, the caller's argmax, ...), ``copies_per_step`` (memcpy / memset).

Under PDL kernels overlap (a kernel starts while the one before it drains and waits), so the sum of kernel times
is not the step. Each row also has ``exposed_us_per_step`` (:func:`exposed_times`): walking the GPU activities in
start order, the time each one moved the timeline's end forward (the idle gap before it included): what the step
would lose without it, as the trace ordered it. Their sum over a step is the step's GPU span (header
``span_us_per_step``, the host's gaps between replayed steps counted on the step's first kernel). Next to the JSON,
a PNG of the same name: per kernel (the largest first) its exposed and its total time per step.
``--plot PROFILE_JSON [...]`` draws that PNG again from committed profiles (no GPU). ``--replay-only``: the model
built, its decode graphs captured and ``--steps`` steps replayed, nothing profiled or written: the target of an
outside profiler (``bash bench/gpu_run.sh ncu``: Nsight Compute, which cannot share CUPTI with torch.profiler).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402
import common  # noqa: E402
import e2e_models as em  # noqa: E402

import tpfuse  # noqa: E402
from tpfuse.parallel import KVCacheConfig  # noqa: E402
from tpfuse.parallel.generate import greedy_tokens  # noqa: E402


def parse_args(argv=None):
    """The command line, ``--layers`` resolved to a count and ``--vocab`` to a size (the real vocab for
    ``--layers full``, resolved before the layers become a count)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="8B", help=f"one of {sorted(em.SHAPES)}, or a shard <model>/tp<N>")
    ap.add_argument("--layers", type=bench_e2e._layers_arg, default=4, help="an int or full")
    ap.add_argument("--vocab", default=None, help="real or an int (default: real for --layers full, else 32000)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-pdl", dest="pdl", action="store_false",
                    help="decode graphs captured without PDL (KVCacheConfig.pdl=False)")
    ap.add_argument("--fold-norms", action=argparse.BooleanOptionalAction, default=None,
                    help="KVCacheConfig.fold_norms (default: the config's default): the add + RMSNorms folded into "
                         "the GEMMs of bf16 layers at TP = 1")
    ap.add_argument("--fp8", action="store_true",
                    help="the decoder's linears in e4m3 (tpfuse.parallel.quantize_fp8's default: per-channel weight "
                         "scales, per-token activations), converted after parallelize as bench_e2e.py's tpfuse_fp8")
    ap.add_argument("--small-m-table", default="", help="a small-M GEMM routing table (JSON) to install")
    ap.add_argument("--small-m-everywhere", action="store_true", help="every row of that table routed to the kernel")
    ap.add_argument("--replay-only", action="store_true",
                    help="no torch.profiler, no files: capture and replay --steps decode steps (for an outside "
                         "profiler such as Nsight Compute, which cannot share CUPTI with torch.profiler)")
    ap.add_argument("--plot", nargs="+", metavar="PROFILE_JSON", default=None,
                    help="no profile: draw each file's PNG next to it (no GPU)")
    args = ap.parse_args(argv)
    if args.plot:
        return args
    if args.small_m_everywhere and not args.small_m_table:
        ap.error("--small-m-everywhere needs --small-m-table (the table whose rows it routes)")
    if args.fold_norms and "/tp" in args.model:
        ap.error("--fold-norms: a shard stands for a TP > 1 rank, whose add + RMSNorm the fused all-reduce does")
    if args.fold_norms is None:  # what users get; shards and FP8 layers never fold whatever the config says
        args.fold_norms = KVCacheConfig().fold_norms and "/tp" not in args.model and not args.fp8
    if args.layers == "fit":
        ap.error("--layers fit is bench_e2e.py's; give a count or full")
    args.vocab = em.resolve_vocab(args.vocab, args.layers, args.model)
    args.layers = em.resolve_layers(args.layers, args.model)
    return args


def main():
    args = parse_args()
    if args.plot:
        import json

        for path in args.plot:
            with open(path) as fh:
                data = json.load(fh)
            print("wrote", plot_exposed(data["header"], data["rows"], path[:-len(".json")] + ".png"))
        return
    from tpfuse.kernels import pdl

    with common.rank_context() as ranks:
        rows = profile(args, ranks.device)
        if args.replay_only:
            return
        tp, rank = ranks.world, ranks.rank
        pdl_available = pdl.available(ranks.device)  # the header says whether PDL really ran
    if rank != 0:  # every rank profiled its own kernels; rank 0's are the table
        return
    total = sum(r["us_per_step"] for r in rows)
    span = sum(r.get("exposed_us_per_step", 0.0) for r in rows)
    counts = kernel_counts(rows, args.layers)
    print(f"{args.model} decode, batch {args.batch}, context {args.context}, {args.layers} layers: "
          f"{total:.0f} us of kernels per step; {counts['kernels_per_step']:.0f} kernels per step = "
          f"{counts['kernels_per_layer']:.1f} per layer ({counts['layer_kernels_per_layer']:.1f} launched by each "
          f"layer + {counts['other_kernels_per_step']:.0f} outside the layers), {counts['copies_per_step']:.0f} "
          f"memcpy / memset; GPU span {span:.0f} us per step")
    print("   kernel us  exposed us  calls  per layer")
    for r in rows[:40]:
        print(f"{r['us_per_step']:9.1f}  {r.get('exposed_us_per_step', 0.0):9.1f}  {r['calls_per_step']:5.1f}x  "
              f"{r['calls_per_layer']:5.2f}/layer  {r['kernel']}")
        for i, (us, exp) in enumerate(r.get("slots_us_per_step", [])):
            print(f"{us:9.1f}  {exp:9.1f}     slot {i} of each layer")
    hdr = common.header("profile_decode", model=args.model, batch=args.batch, context=args.context,
                        layers=args.layers, vocab=args.vocab, kernel_us_per_step=round(total, 1),
                        span_us_per_step=round(span, 1),
                        pdl=args.pdl and pdl_available,
                        small_m_table=os.path.basename(args.small_m_table) or None,
                        small_m_everywhere=args.small_m_everywhere, fold_norms=args.fold_norms, fp8=args.fp8, **counts)
    variant = ("_smallall" if args.small_m_everywhere else "_smallm") if args.small_m_table else ""
    variant += "_foldnorm" if args.fold_norms else ""
    variant += "_fp8" if args.fp8 else ""
    tag = f"{args.model.replace('/', '-')}_b{args.batch}{variant}{'' if args.pdl else '_nopdl'}"
    path = common.write_json(common.result_path("profile_decode", tp=tp, tag=tag), hdr, rows)
    print("wrote", plot_exposed(hdr, rows, path[:-len(".json")] + ".png"))


def _short(name: str) -> str:
    """A kernel's name cut to what tells it apart (templates and arguments dropped)."""
    name = name.split("(")[0].split("<")[0].replace("void ", "").replace("at::native::", "")
    return name if len(name) <= 44 else name[:41] + "..."


def plot_exposed(hdr: dict, rows, path: str, top: int = 12):
    """Horizontal bars per kernel (the ``top`` largest by exposed time, the rest summed): the time it moved the
    step's end (``exposed_us_per_step``) over its total kernel time. Returns the path, or None without matplotlib or
    without exposed times (profiles from before they were recorded)."""
    plt = common.pyplot()
    if plt is None or not any("exposed_us_per_step" in r for r in rows):
        return None
    ranked = sorted(rows, key=lambda r: -r.get("exposed_us_per_step", 0.0))
    shown, rest = ranked[:top], ranked[top:]
    labels = [_short(r["kernel"]) for r in shown] + [f"{len(rest)} others"]
    exposed = [r.get("exposed_us_per_step", 0.0) for r in shown] + [sum(r.get("exposed_us_per_step", 0.0)
                                                                        for r in rest)]
    total = [r["us_per_step"] for r in shown] + [sum(r["us_per_step"] for r in rest)]
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(labels) + 1.6))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, total, color="#c6dbef", label="kernel time")
    ax.barh(y, exposed, height=0.5, color="#08519c", label="exposed (moved the step's end)")
    for yi, e in zip(y, exposed):
        ax.text(e, yi, f" {e:.0f}", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("us per decode step")
    ax.set_title(f"{hdr.get('model')} decode, batch {hdr.get('batch')}, context {hdr.get('context')}"
                 f"{' FP8' if hdr.get('fp8') else ''}, PDL {'on' if hdr.get('pdl') else 'off'}: GPU span "
                 f"{hdr.get('span_us_per_step', float('nan')):.0f} us / step\n{hdr.get('device')}, "
                 f"{hdr.get('commit')}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _is_copy(name: str) -> bool:
    return name.startswith(("Memcpy", "Memset"))


def kernel_counts(rows, layers: int) -> dict:
    """Kernel counts of one decode step from the profiler rows (``calls_per_step`` per name; see the module
    docstring); adds ``calls_per_layer`` to every row."""
    for r in rows:
        r["calls_per_layer"] = r["calls_per_step"] / layers
    kernels = [r for r in rows if not _is_copy(r["kernel"])]
    per_step = sum(r["calls_per_step"] for r in kernels)
    in_layers = sum(r["calls_per_step"] for r in kernels if r["calls_per_step"] >= layers)
    return dict(kernels_per_step=per_step, kernels_per_layer=per_step / layers,
                layer_kernels_per_layer=in_layers / layers, other_kernels_per_step=per_step - in_layers,
                copies_per_step=sum(r["calls_per_step"] for r in rows if _is_copy(r["kernel"])))


def exposed_times(spans) -> dict:
    """``{name: us}``: per name, how far its activities moved the end of the GPU timeline. ``spans``: ``(start_us,
    end_us, name)`` of every kernel / copy; in start order an activity adds ``end - frontier`` where it ends past
    the latest end before it (``frontier``), gaps included, and nothing where it ends inside what ran before."""
    out = {}
    for (_, _, name), exp in exposed_each(spans):
        out[name] = out.get(name, 0.0) + exp
    return out


def exposed_each(spans):
    """``[(span, exposed_us)]`` in start order: :func:`exposed_times` per activity."""
    out, frontier = [], None
    for span in sorted(spans):
        start, end, _ = span
        frontier = start if frontier is None else frontier
        out.append((span, max(0.0, end - frontier)))
        frontier = max(frontier, end)
    return out


def slot_times(spans, steps: int, layers: int) -> dict:
    """``{name: [[kernel_us, exposed_us] per slot]}`` per step, for each kernel a layer launches more than once and
    every layer the same number of times (``r`` = calls per step / layers, an integer > 1): slot ``i`` is the
    ``i``-th launch of it within a layer, in launch order (the small-M GEMM's qkv, o, gate-up, down). The profile
    holds whole steps, each launching the layers in order, so a launch's slot is its index within its step
    modulo ``r``."""
    by_name = {}
    for (start, end, name), exp in exposed_each(spans):
        by_name.setdefault(name, []).append((end - start, exp))
    out = {}
    for name, evs in by_name.items():
        per_step = len(evs) / steps
        r = per_step / layers
        if len(evs) % steps or per_step % layers or r < 2:
            continue
        r, per_step = int(r), int(per_step)
        slots = [[0.0, 0.0] for _ in range(r)]
        for i, (dur, exp) in enumerate(evs):
            slot = (i % per_step) % r
            slots[slot][0] += dur / steps
            slots[slot][1] += exp / steps
        out[name] = [[round(a, 1), round(b, 1)] for a, b in slots]
    return out


def _gpu_spans(prof):
    """``(start_us, end_us, name[:120])`` of the profiler's device activities (kernels, memcpy, memset)."""
    from torch.autograd import DeviceType

    return [(ev.time_range.start, ev.time_range.end, ev.name[:120]) for ev in prof.events()
            if ev.device_type == DeviceType.CUDA and ev.time_range.end > ev.time_range.start]


def profile(args, dev):
    """Kernel time per decode step (torch profiler over ``--steps`` graph-replayed steps), largest first."""
    import contextlib

    from tpfuse.kernels import small_m_configs as smc

    table = bench_e2e.load_table(args.small_m_table, args.small_m_everywhere) if args.small_m_table else None
    with smc.install(table) if table is not None else contextlib.nullcontext():
        return _profile(args, dev)


def _profile(args, dev):
    model = bench_e2e.build_model(args.model, args.layers, dev, args.vocab)
    comm = tpfuse.TPCommunicator(max_tokens=args.batch * args.context, hidden_size=model.config.hidden_size,
                                 dtype=torch.bfloat16)
    model = tpfuse.parallelize(model, comm, cache=KVCacheConfig(max_batch=args.batch, pdl=args.pdl,
                                                                fold_norms=args.fold_norms,
                                                                max_seq_len=args.context + 2 * args.steps + 8))
    if args.fp8:
        from tpfuse.parallel import quantize_fp8

        quantize_fp8(model)
    ids = torch.randint(0, bench_e2e.VOCAB, (args.batch, args.context), device=dev)
    out = model(ids, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    tok = greedy_tokens(out.logits[:, -1])[:, None]
    for _ in range(args.steps):  # capture + warm replays
        tok = greedy_tokens(model(tok, cache=cache).logits[:, -1])[:, None]
    torch.cuda.synchronize()
    if args.replay_only:  # the replays above were the run (an outside profiler saw them)
        comm.close()
        return []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tok = greedy_tokens(model(tok, cache=cache).logits[:, -1])[:, None]  # as tpfuse.parallel.generate
        torch.cuda.synchronize()
    spans = _gpu_spans(prof)
    exposed, slots = exposed_times(spans), slot_times(spans, args.steps, args.layers)
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": ev.key[:120], "calls_per_step": ev.count / args.steps,
                         "us_per_step": us / args.steps,
                         "exposed_us_per_step": exposed.get(ev.key[:120], 0.0) / args.steps})
            if ev.key[:120] in slots:
                rows[-1]["slots_us_per_step"] = slots[ev.key[:120]]
    rows.sort(key=lambda r: -r["us_per_step"])
    comm.close()
    return rows


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)
