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
                       (:mod:`tpfuse.backends.fused_allreduce`), forced; ``tpfuse_oneshot_pipe_p<N>``
                       (``--pipe-producers``): the pipelined one-shot with N producer programs, one communicator per N
                       (``CommConfig.pipe_producers``)
* ``tpfuse_auto``      ``TPCommunicator.fused_add_rmsnorm`` as dispatched by the shipped thresholds table

Timing (:func:`common.time_us`): ``CALLS`` calls captured in one CUDA graph, replayed; median per call over
replays (ranks aligned by a barrier before each replay), the slower rank's value. Writes
``fused_ar_tp2_<slug>.json`` (+ ``.png``) to ``--out-dir`` (else ``$OUT``, else ``bench/results``); prints a table.

Usage: ``torchrun --standalone --nproc_per_node=2 bench/bench_fused_ar.py [--quick] [--flashinfer]``.
"""

from __future__ import annotations

import argparse
import os
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
    """The ``nccl+eager`` provider's local step: common's eager add + RMSNorm (added in fp32) + FP8-static quant."""
    y, res = common.eager_add_rmsnorm(s, residual, weight, EPS, add_fp32=True)
    y = common.eager_quant(y, "fp8_static", spec.scale)[0] if spec is not None else y.to(DT)
    return y, res


def pipe_comms(max_tokens, hidden, counts):
    """``{producer count: TPCommunicator}`` whose pipelined one-shot uses that many producer programs
    (``CommConfig.pipe_producers``), for the ``--pipe-producers`` sweep. Collective: every rank builds the same."""
    cfg = dict(all_workspaces=True, allowed_paths={"tpfuse_oneshot_pipe"},
               force_paths={"fused_add_rmsnorm": "tpfuse_oneshot_pipe"})
    return {n: tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=hidden, dtype=DT,
                                     config=tpfuse.CommConfig(pipe_producers=n, **cfg)) for n in counts}


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


def providers(ranks, comm, flat, fi_comms, pipes, inputs):
    """``{provider: step}`` for one size (``inputs`` = x, residual, weight, spec; ``flat``: the symmetric buffer's
    rows of this size; ``pipes``: :func:`pipe_comms`)."""
    x, residual, weight, spec = inputs
    ws, group = comm.workspaces["fused_allreduce"], ranks.group

    def reduced():
        s = x.clone()
        dist.all_reduce(s, group=group)
        return s

    def symm_two():
        flat.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_(flat, "sum", group.group_name)
        return ops.add_rmsnorm(flat, residual, weight, EPS, quant=spec)

    provs = {"nccl+eager": lambda: eager_norm(reduced(), residual, weight, spec),
             "nccl+tpfuse": lambda: ops.add_rmsnorm(reduced(), residual, weight, EPS, quant=spec),
             "symm2shot+tpfuse": symm_two,
             "tpfuse_oneshot": lambda: ws.oneshot(x, residual, weight, EPS, spec, False),
             "tpfuse_twoshot": lambda: ws.twoshot(x, residual, weight, EPS, spec, False),
             "tpfuse_oneshot_pipe": lambda: ws.oneshot_pipe(x, residual, weight, EPS, spec, False),
             "tpfuse_auto": lambda: comm.fused_add_rmsnorm(x, residual, weight, EPS, quant=spec)}
    for p_count, pc in pipes.items():
        pws = pc.workspaces["fused_allreduce"]
        provs[f"tpfuse_oneshot_pipe_p{p_count}"] = lambda pws=pws: pws.oneshot_pipe(x, residual, weight, EPS, spec,
                                                                                    False)
    for name, fc_ in fi_comms.items():
        if name == "fi_twoshot" and x.shape[0] <= ranks.world:
            continue  # FlashInfer's two-shot needs more tokens than ranks (the backend would fall back)
        provs[name] = lambda fc_=fc_: fc_.fused_add_rmsnorm(x, residual, weight, EPS, quant=spec)
    return provs


def check(ranks, provs, fi_comms, spec, what):
    """Correctness against the NCCL + tpfuse-norm result, once per size: a wrong tpfuse kernel raises; a wrong or
    fallen-back FlashInfer result drops that provider at this size (on every rank alike). Returns
    ``{fi provider: path that ran}``."""
    want_out, want_res = provs["nccl+tpfuse"]()

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
            raise AssertionError(f"{name} {what}: {err}")
    fi_ran = {}
    for name in [n for n in FI_PROVIDERS if n in provs]:
        err = wrong(name)
        ran = fi_comms[name].last_path["fused_add_rmsnorm"]
        if ran != FI_PROVIDERS[name]:
            err = f"ran {ran}, not {FI_PROVIDERS[name]} ({fi_comms[name].last_fallback.get('fused_add_rmsnorm')})"
        bad = torch.tensor([1.0 if err else 0.0], device=ranks.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            if ranks.rank == 0:
                print(f"{name} {what}: dropped: {err or 'wrong on another rank'}")
            del provs[name]
        else:
            fi_ran[name] = ran
    return fi_ran


def hidden_cases(args, ranks, h, tokens):
    """The cases of one hidden size: every tpfuse kernel path timed from one communicator (FlashInfer's workspace
    is left to the forced ones), a symmetric buffer for torch's two-shot; all freed after the last case."""
    import torch.distributed._symmetric_memory as symm_mem
    from tpfuse import dispatch

    tpfuse_paths = frozenset(p for p in dispatch.PATH_DOCS if p not in FI_PROVIDERS.values())
    comm = tpfuse.TPCommunicator(max_tokens=max(tokens), hidden_size=h, dtype=DT,
                                 config=tpfuse.CommConfig(all_workspaces=True, allowed_paths=tpfuse_paths))
    symm_buf = symm_mem.empty(max(tokens) * h, dtype=DT, device=ranks.device)
    symm_mem.rendezvous(symm_buf, ranks.group.group_name)
    fi_comms = flashinfer_comms(max(tokens), h, ranks.rank) if args.flashinfer else {}
    pipes = pipe_comms(max(tokens), h, [int(v) for v in args.pipe_producers.split(",") if v])
    for t in tokens:
        g = torch.Generator(device=ranks.device).manual_seed(t)
        x = torch.randn(t, h, device=ranks.device, generator=g).to(DT)
        residual = torch.randn(t, h, device=ranks.device, generator=g).to(DT)
        weight = (1 + 0.1 * torch.randn(h, device=ranks.device, generator=g)).to(DT)
        for fmt in (None, "fp8_static"):
            spec = q.FP8Static(torch.tensor(0.05, device=ranks.device)) if fmt else None
            provs = providers(ranks, comm, symm_buf[: t * h].view(t, h), fi_comms, pipes,
                              (x, residual, weight, spec))
            fi_ran = check(ranks, provs, fi_comms, spec, f"T={t} H={h} {fmt}")
            yield common.Case(fields={"tokens": t, "hidden": h, "out_format": fmt or "bf16"}, providers=provs,
                              extra={"comm": comm, "fi_ran": fi_ran})
    comm.synchronize()
    for c in (comm, *pipes.values()):
        c.close()
    for c in fi_comms.values():
        c.close()  # collective (frees FlashInfer's IPC buffers)
    del symm_buf


def row(case, name, timing, rank):
    """Every rank measured; the row holds the slower rank's median (the step's real cost)."""
    f = case.fields
    if timing.mode.startswith("error"):
        if rank == 0:
            print(f"{name} T={f['tokens']} H={f['hidden']}: failed: {timing.mode[7:207]}")
        return None
    r = {"provider": name, **f, "median_us": round(timing.us, 2), "mode": timing.mode}
    if name == "tpfuse_auto":
        r["path"] = case.extra["comm"].plan(f["tokens"]).path("fused_add_rmsnorm")
    elif name in case.extra["fi_ran"]:
        r["path"] = case.extra["fi_ran"][name]
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--flashinfer", action="store_true", help="add FlashInfer's trtllm fused kernels (JIT ~100 s)")
    ap.add_argument("--replays", type=int, default=25)
    ap.add_argument("--pipe-producers", default="",
                    help="extra tpfuse_oneshot_pipe variants: comma-separated producer-program counts to time")
    ap.add_argument("--out-dir", default=None, help="default: $OUT, else bench/results")
    args = ap.parse_args()
    tokens = [1, 4, 16, 64, 128, 256, 512, 1024, 2048, 8192] if args.quick else [2 ** i for i in range(14)]
    t_start = time.time()
    with common.rank_context("nccl", timeout_s=600.0) as ranks:  # torch's default NCCL timeout: JIT builds
        rows = []
        for h in (4096, 8192):
            rows += common.run_cases(hidden_cases(args, ranks, h, tokens),
                                     lambda case, name, timing: row(case, name, timing, ranks.rank), calls=CALLS,
                                     replays=args.replays, barrier=ranks.barrier, device=ranks.device)
        if ranks.rank == 0:
            _report(rows, args.out_dir, time.time() - t_start, ranks.world)


def _report(rows, out_dir, seconds, world):
    hdr = common.header("fused_ar_tp2", world_size=world, calls_per_graph=CALLS, seconds=round(seconds, 1),
                        note="median us per call over CUDA-graph replays; max over the 2 ranks")
    path = common.write_json(common.result_path("fused_ar", tp=world, directory=out_dir), hdr, rows)
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
        _plot(rows, provs, hdr, path.replace(".json", ".png"))
    except Exception as e:  # noqa: BLE001
        print(f"no PNG: {e}")


def _plot(rows, provs, hdr, png):
    plt = common.pyplot()
    if plt is None:
        raise ImportError("matplotlib not available")
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
            common.style_axes(ax, title=f"TP=2 AR+add+RMSNorm, hidden {h}, out {fmt}", ylabel="us per call")
    fig.suptitle(f"{hdr['device']} commit {hdr['commit'][:12]}")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
