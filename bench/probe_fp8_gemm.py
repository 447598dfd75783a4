"""Which FP8 GEMM form pays at which token count: the Llama-3.1-8B linears (one H200, TP=1) as a bf16 ``F.linear``
against ``torch._scaled_mm`` with row-wise scales (per-token x, per-channel w: what ``quantize_fp8``'s default
model runs) and with per-tensor scales, each with and without ``use_fast_accum``; CUDA-graph medians.

    python3 bench/probe_fp8_gemm.py [--m 1,8,64,1024,4096]

Prints a table (µs, and each form's time over bf16) and writes ``probe_fp8_gemm_{device}.json`` to ``$OUT``
(else ``bench/results``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FP8 = torch.float8_e4m3fn


def forms(m, n, k, dev):
    """name -> zero-argument callable of one GEMM ``[m, k] x [n, k]^T``."""
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
    x8, w8 = x.to(FP8), w.to(FP8)
    sx_row, sw_row = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    s1 = torch.ones((), device=dev)
    w8t = w8.t()
    out = {"bf16": lambda: F.linear(x, w)}
    for fast in (False, True):
        tag = "_fast" if fast else ""
        out[f"rowwise{tag}"] = (lambda f=fast: torch._scaled_mm(x8, w8t, sx_row, sw_row, out_dtype=torch.bfloat16,
                                                                use_fast_accum=f))
        out[f"tensorwise{tag}"] = (lambda f=fast: torch._scaled_mm(x8, w8t, s1, s1, out_dtype=torch.bfloat16,
                                                                   use_fast_accum=f))
    return out


def cases(ms, dev):
    for name, (n, k) in LINEARS.items():
        for m in ms:
            yield common.Case(fields={"linear": name, "m": m, "n": n, "k": k}, providers=forms(m, n, k, dev))


def row(case, form, timing):
    if timing.mode.startswith("error"):  # a form this torch build lacks
        print(f"{case.fields['linear']} M={case.fields['m']} {form}: {timing.mode[7:127]}")
    return dict(**case.fields, form=form, us=timing.us)


def compare(rows):
    """After each case: every form's time over bf16's (``vs_bf16``), printed."""
    f = rows[-1]
    sel = [r for r in rows if (r["linear"], r["m"]) == (f["linear"], f["m"])]
    bf16 = next(r["us"] for r in sel if r["form"] == "bf16")
    for r in sel:
        r["vs_bf16"] = r["us"] / bf16
    print(f"{f['linear']:8s} M={f['m']:5d} " + "  ".join(f"{r['form']}={r['us']:7.1f}us ({r['vs_bf16']:.2f}x)"
                                                        for r in sel), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,8,64,1024,4096")
    args = ap.parse_args()
    rows = common.run_cases(cases([int(v) for v in args.m.split(",")], torch.device("cuda")), row,
                            after_case=compare, calls=20, replays=20)
    path = common.result_path("probe_fp8_gemm")
    common.write_json(path, common.header("probe_fp8_gemm"), rows)
    print("wrote", path)


if __name__ == "__main__":
    main()
