"""Threshold tuner: time every available path of each op over token counts, keep the fastest *correct* one per size,
and write a thresholds table that ``TPCommunicator`` loads (``CommConfig(thresholds_path=...)`` or
``$TPFUSE_THRESHOLDS``; ``--write-default`` regenerates the shipped ``tpfuse/thresholds/default.json`` rows).

    launch/tune.sh -n 2 --hidden 4096,8192 --dtype bf16            # = torchrun ... bench/tune.py ...
    torchrun --standalone --nproc_per_node=2 bench/tune.py --hidden 8192 --tokens 1,2,4,...,8192

For each (op, hidden): every path registered for the op and available on this machine runs at every token count;
its output is checked against the ``reference`` path (``tpfuse.tolerance``; an incorrect path is never chosen),
timed (CUDA graphs on GPU; median; the slowest rank counts) and the per-size winner picked with 3% hysteresis so
noise does not flip buckets (and ``reference``, the oracle, only wins by more than that). Consecutive sizes with
one winner form a bucket whose ``max_bytes`` is the largest measured size in it. Writes (rank 0):

* ``--out`` (default ``thresholds_tp{TP}_{device}.json`` in ``$OUT``, else ``bench/results``): the run's header
  (:func:`common.header`) and the base table with the tuned rows (one per arch/TP/dtype/hidden, ``source`` = this run's file, device, commit, date) added
  or replaced;
* the same name with ``_measurements.json``: every timing (JSON, with the environment header);
* the same name with ``.png``: latency vs tokens per path per (op, hidden), chosen crossovers marked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import tpfuse  # noqa: E402
from tpfuse import dispatch, thresholds  # noqa: E402
from tpfuse.sharding import shard_range  # noqa: E402
from tpfuse.tolerance import REL_ERR, rel_err  # noqa: E402

TUNABLE = ("fused_add_rmsnorm", "all_reduce", "reduce_scatter_rmsnorm", "all_gather")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HYSTERESIS = 0.03


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (launch/tune.sh runs this before starting any rank)
        self.exit(2, f"tune.py: error: {message} (see --help)\n")


def _ints(text: str, what: str, lo: int = 1):
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated ints, got {text!r}") from None
    if not vals or any(v < lo for v in vals):
        raise argparse.ArgumentTypeError(f"{what}: every value must be >= {lo}, got {text!r}")
    return text


def parse_args(argv=None):
    """Parse and validate the options (every rank, and once by launch/tune.sh before any rank starts)."""
    ap = _Parser(prog="tune.py", description="Threshold tuner: time every available path of each op over token "
                 "counts, keep the fastest correct one per size, and write a thresholds table (see the module "
                 "docstring of bench/tune.py). Run on N ranks: launch/tune.sh -n N [options].")
    ap.add_argument("--ops", default="fused_add_rmsnorm,all_reduce", help=f"subset of {','.join(TUNABLE)}")
    ap.add_argument("--hidden", default="4096,8192", type=lambda t: _ints(t, "--hidden"),
                    help="hidden sizes (comma-separated; default %(default)s)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--tokens", default=",".join(str(1 << i) for i in range(14)), help="token counts to sweep",
                    type=lambda t: _ints(t, "--tokens"))
    ap.add_argument("--paths", default=None, help="only these paths (comma-separated; reference always runs)")
    ap.add_argument("--calls", type=int, default=10, help="calls per CUDA graph")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--base", default=None, help="table to add the tuned rows to (default: the shipped table)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--write-default", action="store_true", help="also rewrite tpfuse/thresholds/default.json")
    ap.add_argument("--check-args", action="store_true", help="only validate these options and exit (0 or 2)")
    args = ap.parse_args(argv)
    bad = [o for o in args.ops.split(",") if o not in TUNABLE]
    if bad:
        ap.error(f"--ops: cannot tune {bad}; choose from {', '.join(TUNABLE)}")
    if args.paths:
        unknown = sorted(set(args.paths.split(",")) - set(dispatch.PATH_DOCS))
        if unknown:
            ap.error(f"--paths: unknown path(s) {unknown}; paths: {', '.join(sorted(dispatch.PATH_DOCS))}")
    for name in ("calls", "replays"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.base:
        try:
            thresholds.load(args.base)
        except thresholds.ThresholdsError as e:
            ap.error(f"--base: {e}")
    if args.check_args:
        ap.exit(0)
    return args


def _inputs(op, comm, t, h, dtype, device, gen, shared):
    """This rank's partial sum ``x`` (``gen``: per rank) and the replicated residual and norm weight (``shared``:
    the same seed on every rank - the ops' contract; per-rank residuals would make every correct two-shot path
    look wrong, since it gathers rows normalised with the peer's residual)."""
    x = torch.randn(t, h, generator=gen).to(dtype=dtype, device=device)
    residual = torch.randn(t, h, generator=shared).to(dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(h, generator=shared)).to(dtype=dtype, device=device)
    if op == "fused_add_rmsnorm":
        return (x, residual, weight, 1e-6), {"quant": None, "gemma": False}
    if op == "all_reduce":
        return (x,), {}
    s, e = shard_range(t, comm.tp, comm.rank)
    if op == "reduce_scatter_rmsnorm":
        return (x, residual[s:e].contiguous(), weight, 1e-6), {"quant": None, "gemma": False}
    return (x[s:e].contiguous(), t), {}  # all_gather


def _first(out):
    return out[0] if isinstance(out, tuple) else out




def sweep(args, comm, op, hidden, dtype, tokens, log):
    """{path: {tokens: (us, correct)}} for every available path of ``op``."""
    device = comm.device
    paths = [p for p in dispatch.registered_paths(op) if dispatch.unavailable_reason(op, p, comm) is None]
    if args.paths:
        keep = set(args.paths.split(",")) | {"reference"}
        paths = [p for p in paths if p in keep]
    res = {p: {} for p in paths}
    gen = torch.Generator().manual_seed(1234 + comm.rank)
    shared = torch.Generator().manual_seed(4321)
    for t in tokens:
        a, kw = _inputs(op, comm, t, hidden, dtype, device, gen, shared)
        ref = _first(dispatch.implementation(op, "reference")(comm, *a, **kw))
        for p in paths:
            impl = dispatch.implementation(op, p)
            out = _first(impl(comm, *a, **kw))
            ok = rel_err(out, ref) <= REL_ERR[dtype]
            ok = common.slowest_rank(0.0 if ok else 1.0, device) == 0.0
            us, mode = common.time_us(lambda: impl(comm, *a, **kw), calls=args.calls, replays=args.replays,
                                      barrier=dist.barrier if device.type == "cpu" else None)
            res[p][t] = (common.slowest_rank(us, device), ok, mode)
        log(op, hidden, t, {p: res[p][t] for p in paths})
    return res


def choose(res, tokens, hidden, itemsize):
    """Per-size winners (3% hysteresis) -> table buckets [{"max_bytes", "path"}]."""
    winners = []
    for t in tokens:
        cands = {p: v[t][0] for p, v in res.items() if v[t][1]}
        best = min(cands, key=cands.get)
        # the reference path is the oracle, not a production path: on a near-tie (same collective on NCCL) take
        # the fastest other correct path
        others = {p: v for p, v in cands.items() if p != "reference"}
        if best == "reference" and others and min(others.values()) <= cands[best] * (1 + HYSTERESIS):
            best = min(others, key=others.get)
        prev = winners[-1] if winners else None
        if prev in cands and cands[prev] <= cands[best] * (1 + HYSTERESIS):
            best = prev
        winners.append(best)
    buckets = []
    for i, (t, w) in enumerate(zip(tokens, winners)):
        last = i + 1 == len(tokens) or winners[i + 1] != w
        if last:
            buckets.append({"max_bytes": t * hidden * itemsize, "path": w})
    buckets[-1]["max_bytes"] = None
    return buckets, winners


def plot(path_png, measurements, choices):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot written ({path_png}): matplotlib is not installed (pip install matplotlib, or "
              f"'tpfuse[bench]')", flush=True)
        return None
    keys = sorted(measurements)
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 3.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        op, hidden = key
        for p, series in sorted(measurements[key].items()):
            ts = sorted(series)
            ax.plot(ts, [series[t][0] for t in ts], marker="o", ms=3, label=p)
            bad = [t for t in ts if not series[t][1]]
            if bad:
                ax.scatter(bad, [series[t][0] for t in bad], marker="x", color="red", zorder=5)
        for b in choices[key][:-1]:
            ax.axvline(b["max_bytes"] / (hidden * choices[key + ("itemsize",)]), ls="--", color="gray", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="µs per call",
               title=f"{op}, hidden {hidden}: chosen " + " | ".join(b["path"] for b in choices[key]))
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    return path_png


def main(argv=None):
    args = parse_args(argv)
    with common.rank_context() as ranks:
        tune(args, ranks.rank, ranks.world)


def tune(args, rank, tp):
    """The sweep over hidden sizes and ops, and (rank 0) the table, measurements and plot written."""
    dtype = DTYPES[args.dtype]
    tokens = sorted({int(t) for t in args.tokens.split(",")})
    hiddens = [int(h) for h in args.hidden.split(",")]
    ops = args.ops.split(",")
    out = args.out or common.result_path("thresholds", tp=tp)
    total, done, t0 = len(ops) * len(hiddens) * len(tokens), [0], time.monotonic()

    def log(op, hidden, t, row):
        done[0] += 1
        if rank == 0:
            el = time.monotonic() - t0
            eta = el / done[0] * (total - done[0])
            cells = "  ".join(f"{p}={us:.1f} µs{'' if ok else ' (WRONG)'}" for p, (us, ok, _) in row.items())
            print(f"[{done[0]:>3}/{total} {100 * done[0] // total:>3}% eta {eta:5.0f}s] {op} h={hidden} T={t}: {cells}",
                  flush=True)

    measurements, choices, rows = {}, {}, []
    base = thresholds.load(args.base)
    hdr = common.header("tune", tp=tp, dtype=args.dtype, tokens=tokens)
    # every path can be timed; --paths also keeps the other backends' workspaces (FlashInfer's JIT) from being built
    allowed = frozenset(args.paths.split(",")) | {"reference"} if args.paths else None
    for hidden in hiddens:
        if rank == 0:
            which = "every path" if allowed is None else ", ".join(sorted(allowed))
            print(f"hidden {hidden}: building the communicator's workspaces ({which}; FlashInfer's first use "
                  f"JIT-builds for ~2 min)", flush=True)
        comm = tpfuse.TPCommunicator(max_tokens=max(tokens), hidden_size=hidden, dtype=dtype,
                                     config=tpfuse.CommConfig(all_workspaces=True, allowed_paths=allowed))
        base_row = base.lookup(comm.arch, tp, str(dtype)[6:], hidden)
        paths_cfg = {o: [{"max_bytes": mb, "path": p} for mb, p in base_row.paths[o]] for o in thresholds.OPS}
        for op in ops:
            res = sweep(args, comm, op, hidden, dtype, tokens, log)
            measurements[(op, hidden)] = res
            buckets, _ = choose(res, tokens, hidden, dtype.itemsize)
            choices[(op, hidden)] = buckets
            choices[(op, hidden, "itemsize")] = dtype.itemsize
            paths_cfg[op] = buckets
        comm.close()
        rows.append({"arch": comm.arch, "tp": tp, "dtype": str(dtype)[6:], "hidden": hidden,
                     "source": {"kind": "measured", "tool": "bench/tune.py", "file": os.path.relpath(out, os.getcwd()),
                                "device": hdr["device"], "commit": hdr["commit"], "date": hdr["date"],
                                "tuned_ops": ops,
                                "note": f"ops not in tuned_ops and sp_min_bytes copied from row [{base_row.key()}]"},
                     "sp_min_bytes": base_row.sp_min_bytes, "paths": paths_cfg})
    if rank == 0:
        with open(base.path) as f:
            table = json.load(f)
        keys = {(r["arch"], r["tp"], r["dtype"], r["hidden"]) for r in rows}
        table["rows"] = rows + [r for r in table["rows"]
                                if (r["arch"], r["tp"], r["dtype"], r.get("hidden")) not in keys]
        table.pop("header", None)  # a base table written by this tool carries its own run's header
        # the written table carries this run's header (bench/results' rule); the shipped default stays header-less
        common.write_json(out, hdr, **table)
        thresholds.load(out)  # validate what was written
        meas_rows = [{"op": op, "hidden": h, "path": p, "tokens": t, "us": v[0], "correct": v[1], "timing": v[2]}
                     for (op, h), res in measurements.items() for p, s in res.items() for t, v in s.items()]
        common.write_json(out.replace(".json", "_measurements.json"), hdr, meas_rows)
        png = plot(out.replace(".json", ".png"), measurements, choices)
        if args.write_default:
            with open(thresholds.DEFAULT_TABLE, "w") as f:
                json.dump(table, f, indent=1)
                f.write("\n")
        print(f"\nchosen buckets ({tp} ranks, {hdr['device']}):")
        for (op, h), b in ((k, v) for k, v in choices.items() if len(k) == 2):
            print(f"  {op:<24} h={h:<6} " + "  ".join(
                f"<= {b_['max_bytes']} B ({b_['max_bytes'] // (h * dtype.itemsize)} tokens): {b_['path']}"
                if b_["max_bytes"] else f"above: {b_['path']}" for b_ in b))
        print(f"wrote {out}" + (f", {png}" if png else "") + (" and the shipped default table" if args.write_default else ""))


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
