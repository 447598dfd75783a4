"""Async-TP benchmark: column-parallel all_gather_matmul and row-parallel matmul_reduce_scatter, TP ranks.

    torchrun --standalone --nproc_per_node=2 bench/bench_async_tp.py [--quick] [--dtypes bf16,fp8,fp8_tensor]

Providers (same shapes, CUDA graphs where capture works, median per call, slowest rank; ``--rounds`` timing rounds
per size with the provider order rotated, the median of the rounds reported):
``gemm_only`` (the local GEMM of the full gathered input / of the full partial: the floor), ``nccl`` (NCCL
all-gather + GEMM / GEMM + NCCL reduce-scatter, tpfuse's ``nccl`` path), ``torch_symm`` (torch's
``symm_mem.fused_all_gather_matmul`` / ``fused_matmul_reduce_scatter``; for FP8 ``fused_all_gather_scaled_matmul`` /
``fused_scaled_matmul_reduce_scatter``), ``tpfuse`` (``tpfuse_async_tp``).
Dtypes (``--dtypes``, default bf16): ``bf16``; ``fp8``: e4m3 operands with row-wise scales (per-token activations,
per-output-channel weights), ``torch._scaled_mm``, bf16 output; ``fp8_tensor``: the same with per-tensor scales.
Shapes: Llama-3.1-8B and 70B TP shards: AG side ``[M, H] x [H, I/TP]``, RS side ``[M, I/TP] x [I/TP, H]``.
Writes ``bench/results/async_tp_tp{TP}_{device}.json`` (one row per model, dtype, side, provider, M; ``dtype``
field per row) and one ``.png`` per dtype (bf16: ``async_tp_tp{TP}_{device}.png``, others ``..._{dtype}.png``);
prints a table.
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
from tpfuse import quant as q  # noqa: E402
from tpfuse import scaled_gemm  # noqa: E402
from tpfuse.sharding import shard_range  # noqa: E402
from tpfuse.tolerance import REL_ERR, rel_err  # noqa: E402

MODELS = {"8B": (4096, 14336), "70B": (8192, 28672)}  # hidden, intermediate
DTYPES = ("bf16", "fp8", "fp8_tensor")


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


def torch_symm_scaled_ops():
    """torch's fused FP8 ops (``fused_all_gather_scaled_matmul`` / ``fused_scaled_matmul_reduce_scatter``), or
    None where this torch lacks them."""
    try:
        return (torch.ops.symm_mem.fused_all_gather_scaled_matmul,
                torch.ops.symm_mem.fused_scaled_matmul_reduce_scatter)
    except Exception:
        return None


def call_by_schema(op, **named):
    """Call a torch op with the named arguments its schema has (the signatures of torch's fused ops changed
    across releases: e.g. ``scatter_dim`` became ``orig_scatter_dim`` + ``scatter_dim_after_maybe_reshape``)."""
    names = [a.name for a in op.default._schema.arguments]
    return op(**{k: v for k, v in named.items() if k in names})


def quantize(x: torch.Tensor, dtype: str):
    """e4m3 data and fp32 scale: per row ``[rows, 1]`` (``fp8``) or per tensor ``[]`` (``fp8_tensor``)."""
    if dtype == "fp8":
        return q.fp8_quantize_per_token(x)
    scale = q.fp8_dynamic_scale(x.float().abs().amax())
    return q.fp8_quantize_static(x, scale), scale.reshape(())


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="8B,70B")
    # not "--m": torchrun's parser takes "--m" as an ambiguous abbreviation of its own options
    ap.add_argument("--sizes", default=None, help="comma-separated M values")
    ap.add_argument("--dtypes", default="bf16", help=f"comma-separated, of {','.join(DTYPES)}")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per size (provider order rotated)")
    args = ap.parse_args(argv)
    for dt in args.dtypes.split(","):
        if dt not in DTYPES:
            raise SystemExit(f"unknown dtype {dt!r}; choose from {DTYPES}")
    return args


def save(rows, args, tp):
    hdr = common.header("async_tp", tp=tp, dtype=args.dtypes, rounds=args.rounds,
                        timing="per provider: CUDA graph, median of 10 replays, slowest rank; rounds with the "
                               "provider order rotated, median of the round values")
    return common.write_json(common.result_path("async_tp", tp=tp), hdr, rows), hdr


def bf16_providers(comm, m, s, e, x_full, x_k, w_n, w_k, tsymm, group):
    """``{(side, provider): step}`` of the bf16 GEMMs and the arguments of tpfuse's calls (for the check)."""
    agmm_nccl = dispatch.implementation("all_gather_matmul", "nccl")
    mmrs_nccl = dispatch.implementation("matmul_reduce_scatter", "nccl")
    x_shard = x_full[s:e].contiguous()
    provs = {
        ("AG", "gemm_only"): lambda: torch.mm(x_full, w_n.t()),
        ("AG", "nccl"): lambda: agmm_nccl(comm, x_shard, w_n, m),
        ("AG", "tpfuse"): lambda: comm.all_gather_matmul(x_shard, w_n, num_tokens=m),
        ("RS", "gemm_only"): lambda: torch.mm(x_k, w_k.t()),
        ("RS", "nccl"): lambda: mmrs_nccl(comm, x_k, w_k),
        ("RS", "tpfuse"): lambda: comm.matmul_reduce_scatter(x_k, w_k),
    }
    if tsymm is not None and m % comm.tp == 0:
        provs[("AG", "torch_symm")] = lambda: tsymm[0](x_shard, [w_n.t()], 0, group.group_name)
        provs[("RS", "torch_symm")] = lambda: tsymm[1](x_k, w_k.t(), "sum", 0, group.group_name)
    return provs, ((x_shard, w_n), {}), ((x_k, w_k), {})


def fp8_providers(comm, m, s, e, x_full, x_k, wq, dtype, tsymm8, group):
    """The FP8 form of :func:`bf16_providers` (``wq``: the quantized weights and their scales)."""
    (wq_n, sw_n), (wq_k, sw_k) = wq
    agmm_nccl = dispatch.implementation("all_gather_matmul", "nccl")
    mmrs_nccl = dispatch.implementation("matmul_reduce_scatter", "nccl")
    xq_full, sx_full = quantize(x_full, dtype)
    if sx_full.dim() == 0:  # per-tensor: one scale on every rank (tpfuse.scaled_gemm contract)
        dist.all_reduce(sx_full, op=dist.ReduceOp.MAX)
        xq_full = q.fp8_quantize_static(x_full, sx_full)
    xq_shard = xq_full[s:e].contiguous()
    sx_shard = sx_full if sx_full.dim() == 0 else sx_full[s:e].clone()
    xq_k, sx_k = quantize(x_k, dtype)
    ag_args, rs_args = (xq_shard, wq_n), (xq_k, wq_k)
    kw_ag, kw_rs = {"x_scale": sx_shard, "w_scale": sw_n}, {"x_scale": sx_k, "w_scale": sw_k}
    provs = {
        ("AG", "gemm_only"): lambda: scaled_gemm.mm(xq_full, wq_n, sx_full, sw_n),
        ("AG", "nccl"): lambda: agmm_nccl(comm, *ag_args, m, **kw_ag),
        ("AG", "tpfuse"): lambda: comm.all_gather_matmul(*ag_args, num_tokens=m, **kw_ag),
        ("RS", "gemm_only"): lambda: scaled_gemm.mm(xq_k, wq_k, sx_k, sw_k),
        ("RS", "nccl"): lambda: mmrs_nccl(comm, *rs_args, **kw_rs),
        ("RS", "tpfuse"): lambda: comm.matmul_reduce_scatter(*rs_args, **kw_rs),
    }
    if tsymm8 is not None and m % comm.tp == 0:
        b_n = sw_n if sw_n.dim() == 0 else sw_n.view(1, -1)  # _scaled_mm's [1, N] form
        b_k = sw_k if sw_k.dim() == 0 else sw_k.view(1, -1)
        provs[("AG", "torch_symm")] = lambda: call_by_schema(
            tsymm8[0], A=xq_shard, A_shard=xq_shard, Bs=[wq_n.t()], A_scale=sx_shard, B_scales=[b_n],
            gather_dim=0, group_name=group.group_name, biases=[None], result_scales=[None],
            out_dtypes=[torch.bfloat16], use_fast_accum=[False])
        provs[("RS", "torch_symm")] = lambda: call_by_schema(
            tsymm8[1], A=xq_k, B=wq_k.t(), A_scale=sx_k, B_scale=b_k, reduce_op="sum",
            scatter_dim=0, orig_scatter_dim=0, scatter_dim_after_maybe_reshape=0,
            group_name=group.group_name, output_shape=[m, wq_k.shape[0]], out_dtype=torch.bfloat16,
            use_fast_accum=False)
    return provs, (ag_args, kw_ag), (rs_args, kw_rs)


def correct(comm, m, ag, rs):
    """tpfuse against the nccl path (same GEMM kind), checked before timing: ``(AG ok, RS ok)``."""
    agmm_nccl = dispatch.implementation("all_gather_matmul", "nccl")
    mmrs_nccl = dispatch.implementation("matmul_reduce_scatter", "nccl")
    (ag_args, kw_ag), (rs_args, kw_rs) = ag, rs
    ok_ag = rel_err(comm.all_gather_matmul(*ag_args, num_tokens=m, **kw_ag),
                    agmm_nccl(comm, *ag_args, m, **kw_ag)) <= REL_ERR[torch.bfloat16]
    ok_rs = rel_err(comm.matmul_reduce_scatter(*rs_args, **kw_rs),
                    mmrs_nccl(comm, *rs_args, **kw_rs)) <= REL_ERR[torch.bfloat16]
    return ok_ag, ok_rs


def model_cases(ranks, model, dtypes, ms, tsymm, tsymm8):
    """The cases of one model: dtype x M, providers keyed ``(side, provider)``."""
    h, inter = MODELS[model]
    tp, dev = ranks.world, ranks.device
    i_s = inter // tp
    comm = tpfuse.TPCommunicator(max_tokens=max(ms), hidden_size=h, dtype=torch.bfloat16,
                                 config=tpfuse.CommConfig(force_paths={"all_gather_matmul": "tpfuse_async_tp",
                                                                       "matmul_reduce_scatter": "tpfuse_async_tp"}))
    g = torch.Generator(device=dev).manual_seed(1 + ranks.rank)
    w_n = torch.randn(i_s, h, device=dev, generator=g, dtype=torch.bfloat16) / h ** 0.5   # AG side [N/TP, H]
    w_k = torch.randn(h, i_s, device=dev, generator=g, dtype=torch.bfloat16) / i_s ** 0.5  # RS side [H, K/TP]
    for dtype in dtypes:
        wq = (quantize(w_n, dtype), quantize(w_k, dtype)) if dtype != "bf16" else None
        for m in ms:
            s, e = shard_range(m, tp, ranks.rank)
            x_full = torch.randn(m, h, device=dev, generator=g, dtype=torch.bfloat16)
            x_k = torch.randn(m, i_s, device=dev, generator=g, dtype=torch.bfloat16)
            if wq is None:
                provs, ag, rs = bf16_providers(comm, m, s, e, x_full, x_k, w_n, w_k, tsymm, ranks.group)
            else:
                provs, ag, rs = fp8_providers(comm, m, s, e, x_full, x_k, wq, dtype, tsymm8, ranks.group)
            ok_ag, ok_rs = correct(comm, m, ag, rs)
            yield common.Case(fields={"model": model, "dtype": dtype, "M": m, "H": h, "I_shard": i_s},
                              providers=provs, extra={"ok": {"AG": ok_ag, "RS": ok_rs}},
                              timing={"calls": 2 if m * h * i_s > 2 ** 36 else 5})
    comm.synchronize()
    comm.close()


def row(case, key, timing):
    side, prov = key
    f = case.fields
    return {"model": f["model"], "dtype": f["dtype"], "side": side, "provider": prov, "M": f["M"], "H": f["H"],
            "I_shard": f["I_shard"], "median_us": timing.us, "rounds_us": [round(v, 2) for v in timing.rounds_us],
            "timing": timing.mode, "correct": case.extra["ok"][side] if prov == "tpfuse" else None}


def progress(rows, args, tp):
    """After every size (rank 0): its line, and the rows so far saved (a run cut short keeps what it measured)."""
    key = (rows[-1]["model"], rows[-1]["dtype"], rows[-1]["M"])
    sel = [r for r in rows if (r["model"], r["dtype"], r["M"]) == key]
    ok = {r["side"]: r["correct"] for r in sel if r["provider"] == "tpfuse"}
    line = "  ".join(f"{r['side']}:{r['provider']}={r['median_us']:.0f}" for r in sel)
    print(f"[{key[0]} {key[1]} M={key[2]}] {line}  correct AG={ok.get('AG')} RS={ok.get('RS')}", flush=True)
    save(rows, args, tp)


def summary(rows, models, dtypes, ms):
    print("\nratio to GEMM-only (lower is better; 1.00 = communication fully hidden)")
    for model in models:
        for dtype in dtypes:
            for side in ("AG", "RS"):
                for m in ms:
                    key = (model, dtype, side, m)
                    base = next(r["median_us"] for r in rows if (r["model"], r["dtype"], r["side"], r["M"],
                                                                  r["provider"]) == key + ("gemm_only",))
                    cells = "  ".join(f"{r['provider']}={r['median_us'] / base:.3f}" for r in rows
                                      if (r["model"], r["dtype"], r["side"], r["M"]) == key
                                      and r["provider"] != "gemm_only")
                    print(f"  {model} {dtype:<10} {side} M={m:<6} gemm={base:8.0f}us  {cells}")


def main():
    args = parse_args()
    dtypes, models = args.dtypes.split(","), args.models.split(",")
    ms = [int(m) for m in args.sizes.split(",")] if args.sizes else (
        [1024, 4096] if args.quick else [256, 512, 1024, 2048, 4096, 8192, 16384])
    with common.rank_context() as ranks:
        tsymm = torch_symm_ops(ranks.group)
        tsymm8 = torch_symm_scaled_ops() if tsymm is not None else None
        rows = []
        for model in models:
            rows += common.run_cases(
                model_cases(ranks, model, dtypes, ms, tsymm, tsymm8), row, rounds=args.rounds, replays=10,
                device=ranks.device,  # after_case sees this model's rows; `done` holds the earlier models'
                after_case=(lambda rs, done=list(rows): progress(done + rs, args, ranks.world))
                if ranks.rank == 0 else None)
        if ranks.rank == 0:
            path, hdr = save(rows, args, ranks.world)
            for dtype in dtypes:
                png = common.result_path("async_tp", tp=ranks.world, ext="png", tag="" if dtype == "bf16" else dtype)
                _plot(png, [r for r in rows if r["dtype"] == dtype], hdr, dtype)
            summary(rows, models, dtypes, ms)
            print("wrote", path)


def _plot(path, rows, hdr, dtype):
    return common.plot_ratio_panels(path, rows, panel=("model", "side"), x="M", y="median_us", baseline="gemm_only",
                                    ylabel="time / GEMM-only", xlabel="M (tokens)", refs=(1.0, 1.03),
                                    title=f"async TP {dtype}, TP={hdr['tp']}, {hdr['device']}, {hdr['commit'][:10]}")


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
