"""Benchmark: QK-norm + RoPE and RoPE + paged KV-cache write (:mod:`tpfuse.rope`) on one GPU.

Providers:

* ``torch_eager``: the unfused sequence as vLLM composes it from torch ops: split qkv, per-head RMSNorm of q and k
  (fp32 torch ops, rounded to bf16), then rope (``forward_native``-style: index the cos/sin cache, rotate, round);
  for the cache op, rope then ``index_copy_`` of k and v into the flattened caches (quantized first for FP8);
* ``torch_compile``: the same function under ``torch.compile`` (static shapes, compiled once per shape);
* ``flashinfer``: only when ``flashinfer`` imports (per-head ``flashinfer.norm.rmsnorm`` +
  ``flashinfer.rope.apply_rope_with_cos_sin_cache_inplace``);
* ``tpfuse``: :func:`tpfuse.rope.qk_norm_rope` / :func:`tpfuse.rope.rope_kv_cache_write` (Triton).

Shapes: Qwen3-8B-like, head_dim 128, TP=1 (32 q / 8 kv heads) and TP=2 (16 / 4); tokens 1 .. 16384. Timing: CUDA
graphs of back-to-back calls, median per call (:func:`common.time_us`). Effective GB/s counts the bytes each op must
read and write once (q/k read + written, v read, cache rows written, cos/sin rows and positions read).

Output: ``rope_<device>.json`` in ``--out-dir`` (else ``$OUT``, else ``bench/results``) with the usual header and
rows ``{provider, op, tokens, shape, median_us, gbps}``, and a PNG plot per op (``rope_<device>_<op>.png``) when
matplotlib imports.
``--quick``: fewer token counts. ``--sweep``: also time tpfuse at forced (BLOCK_H, num_warps) configs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tpfuse import rope as R  # noqa: E402

TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
TOKENS_QUICK = (1, 64, 1024, 16384)
TP_SHAPES = {1: (32, 8), 2: (16, 4)}
HEAD_DIM = 128
EPS = 1e-6
MAX_POS = 32768


def cos_sin_cache(max_pos, rot_dim, device):
    inv_freq = 1.0 / (1000000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    f = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((f.cos(), f.sin()), dim=-1).float().to(device)


# ---------------------------------------------------------------------------------------------------------------
# unfused baselines (vLLM-like composition of torch ops)


def rmsnorm_torch(x, w, eps):
    return common.eager_rmsnorm(x, w, eps).to(x.dtype)


def rope_native(positions, q, k, cache, head_dim, is_neox=True):
    cs = cache.index_select(0, positions)
    cos, sin = cs.chunk(2, dim=-1)
    t = positions.shape[0]

    def apply(x):
        return R.rope_math(x.view(t, -1, head_dim).float(), cos, sin, is_neox)

    return apply(q).to(q.dtype).view(t, -1), apply(k).to(k.dtype).view(t, -1)


def unfused_qk_norm_rope(qkv, qw, kw, cache, positions, hq, hkv, d):
    t = qkv.shape[0]
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    qn = rmsnorm_torch(q.reshape(t, hq, d), qw, EPS).view(t, -1)
    kn = rmsnorm_torch(k.reshape(t, hkv, d), kw, EPS).view(t, -1)
    return rope_native(positions, qn, kn, cache, d)


def unfused_rope_kv_cache_write(q, k, v, positions, cache, key_cache, value_cache, slots, kv_scale):
    t, hq, d = q.shape
    qo, ko = rope_native(positions, q.reshape(t, -1), k.reshape(t, -1), cache, d)
    ko = ko.view(k.shape)
    kk, vv = ko, v
    if key_cache.dtype == torch.float8_e4m3fn:
        inv = 1.0 / kv_scale
        kk = torch.clamp(ko.float() * inv, -448.0, 448.0).to(key_cache.dtype)
        vv = torch.clamp(v.float() * inv, -448.0, 448.0).to(key_cache.dtype)
    hkv = k.shape[1]
    if key_cache.element_size() == 1:  # index_copy_ has no e4m3 kernel: copy the bytes
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
        kk, vv = kk.view(torch.uint8), vv.view(torch.uint8)
    key_cache.view(-1, hkv, d).index_copy_(0, slots, kk)
    value_cache.view(-1, hkv, d).index_copy_(0, slots, vv)
    return qo, ko


def flashinfer_qk_norm_rope(fi, qkv, qw, kw, cache, positions, hq, hkv, d):
    t = qkv.shape[0]
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    qn = fi.norm.rmsnorm(q.reshape(t * hq, d), qw, EPS).view(t, -1)
    kn = fi.norm.rmsnorm(k.reshape(t * hkv, d), kw, EPS).view(t, -1)
    fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, qn, kn, d, cache, True)
    return qn, kn


# ---------------------------------------------------------------------------------------------------------------


def qk_bytes(t, hq, hkv, d):
    return t * (hq + hkv) * d * 2 * 2 + t * d * 4 + t * 8


def kv_bytes(t, hq, hkv, d, cache_elt):
    return (t * hq * d * 2 * 2 + t * hkv * d * 2 * 2 + t * hkv * d * 2 + 2 * t * hkv * d * cache_elt
            + t * d * 4 + 2 * t * 8)


def compiled(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True)


def qk_case(args, fi, cache, pos, shape_info, t):
    """QK-norm + RoPE at ``t`` tokens: checked against the unfused eager sequence, then its providers."""
    tp, hq, hkv, qw, kw = shape_info
    d = HEAD_DIM
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda").bfloat16()
    # correctness guard: tpfuse vs the unfused eager sequence (one bf16 rounding apart)
    x = qkv.clone()
    fq, fk = R.qk_norm_rope(x, qw, kw, cache, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d, eps=EPS,
                            is_neox=True)
    uq, uk = unfused_qk_norm_rope(qkv, qw, kw, cache, pos, hq, hkv, d)
    err = ((fq.float() - uq.float()).norm() / uq.float().norm()).item()
    assert err < 2e-2, f"tpfuse qk_norm_rope disagrees with the unfused sequence: {err}"
    provs = {"torch_eager": lambda: unfused_qk_norm_rope(qkv, qw, kw, cache, pos, hq, hkv, d)}
    if not args.no_compile:
        cf = compiled(unfused_qk_norm_rope)
        provs["torch_compile"] = lambda: cf(qkv, qw, kw, cache, pos, hq, hkv, d)
    if fi is not None:
        provs["flashinfer"] = lambda: flashinfer_qk_norm_rope(fi, qkv, qw, kw, cache, pos, hq, hkv, d)
    provs["tpfuse"] = lambda: R.qk_norm_rope(x, qw, kw, cache, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                                             eps=EPS, is_neox=True)
    if args.sweep:
        from tpfuse.kernels.rope import launch_qk_norm_rope

        for bh in (1, 2, 4, 8, 16):
            for nw in (1, 2, 4, 8):
                if bh * d // 2 >= nw * 32:
                    provs[f"tpfuse[bh={bh},nw={nw}]"] = lambda bh=bh, nw=nw: launch_qk_norm_rope(
                        x, qw, kw, cache, pos, hq, hkv, d, EPS, True, False, block_h=bh, num_warps=nw)
    return common.Case(fields={"op": "qk_norm_rope", "tokens": t, "shape": f"tp{tp}:hq{hq}/hkv{hkv}/d{d}"},
                       providers=provs, extra={"nbytes": qk_bytes(t, hq, hkv, d)})


def kv_cases(args, cache, pos, shape_info, t):
    """RoPE + paged KV-cache write at ``t`` tokens, bf16 and FP8 caches."""
    tp, hq, hkv, _, _ = shape_info
    d, dev = HEAD_DIM, "cuda"
    q = torch.randn(t, hq, d, device=dev).bfloat16()
    k = torch.randn(t, hkv, d, device=dev).bfloat16()
    v = torch.randn(t, hkv, d, device=dev).bfloat16()
    block_size = 16
    nblocks = (t + block_size - 1) // block_size + 1
    slots = torch.randperm(nblocks * block_size, device=dev)[:t]
    scale = torch.tensor(0.05, device=dev)
    for cdt, tag in ((torch.bfloat16, "bf16"), (torch.float8_e4m3fn, "fp8")):
        kc = torch.zeros(nblocks, block_size, hkv, d, device=dev).to(cdt)
        vc = torch.zeros_like(kc)
        provs = {"torch_eager": lambda: unfused_rope_kv_cache_write(q, k, v, pos, cache, kc, vc, slots, scale)}
        if not args.no_compile:
            cf = compiled(unfused_rope_kv_cache_write)
            provs["torch_compile"] = lambda: cf(q, k, v, pos, cache, kc, vc, slots, scale)
        qq, kk = q.clone(), k.clone()
        provs["tpfuse"] = lambda: R.rope_kv_cache_write(qq, kk, v, pos, cache, kc, vc, slots, is_neox=True,
                                                        kv_scale=scale)
        yield common.Case(fields={"op": f"rope_kv_cache_write_{tag}", "tokens": t,
                                  "shape": f"tp{tp}:hq{hq}/hkv{hkv}/d{d}"},
                          providers=provs, extra={"nbytes": kv_bytes(t, hq, hkv, d, kc.element_size())})


def cases(args, fi, cache):
    for tp, (hq, hkv) in TP_SHAPES.items():
        shape_info = (tp, hq, hkv, (torch.rand(HEAD_DIM, device="cuda") + 0.5).bfloat16(),
                      (torch.rand(HEAD_DIM, device="cuda") + 0.5).bfloat16())
        for t in (TOKENS_QUICK if args.quick else TOKENS):
            pos = torch.randint(0, MAX_POS, (t,), device="cuda")
            yield qk_case(args, fi, cache, pos, shape_info, t)
            yield from kv_cases(args, cache, pos, shape_info, t)


def row(case, provider, timing):
    """A row ``{provider, op, tokens, shape, median_us, gbps}`` (printed); a failed provider is printed, no row
    (e.g. a FlashInfer API mismatch must not stop the benchmark)."""
    f = case.fields
    if timing.mode.startswith("error"):
        print(f"{provider} skipped ({f['op']} T={f['tokens']}): {timing.mode}")
        return None
    us = timing.us
    r = {"provider": provider, "op": f["op"], "tokens": f["tokens"], "shape": f["shape"], "median_us": round(us, 3),
         "gbps": round(case.extra["nbytes"] / (us * 1e-6) / 1e9, 1)}
    print(f"{r['op']:28s} {r['shape']:22s} T={r['tokens']:6d} {provider:24s} {us:9.2f} us {r['gbps']:8.1f} GB/s",
          flush=True)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time tpfuse at forced (BLOCK_H, num_warps)")
    ap.add_argument("--out-dir", default=None, help="default: $OUT, else bench/results")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_rope needs a CUDA GPU")
    from torch import _dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(_dynamo.config, name):
            setattr(_dynamo.config, name, 4096)
    try:
        import flashinfer as fi  # noqa: F401
    except Exception:
        fi = None
    t_start = time.time()

    def after_case(rows):  # save after every case, so a run cut short still leaves its rows
        print(f"  [{time.time() - t_start:.0f}s]", flush=True)
        save(args, rows)

    rows = common.run_cases(cases(args, fi, cos_sin_cache(MAX_POS, HEAD_DIM, "cuda")), row, after_case=after_case)
    print("wrote", save(args, rows))
    summary(rows)
    plot(rows, args.out_dir)


def save(args, rows):
    return common.write_json(common.result_path("rope", directory=args.out_dir),
                             common.header("bench_rope", quick=args.quick, sweep=args.sweep, head_dim=HEAD_DIM,
                                           tp_shapes={str(k): v for k, v in TP_SHAPES.items()}), rows)


def summary(rows):
    """Per (op, shape, tokens): tpfuse vs the fastest unfused provider."""
    print("\nop / shape / tokens: tpfuse us, best unfused (provider us), speedup")
    keys = sorted({(r["op"], r["shape"], r["tokens"]) for r in rows})
    for op, shape, t in keys:
        sel = [r for r in rows if (r["op"], r["shape"], r["tokens"]) == (op, shape, t)]
        mine = [r for r in sel if r["provider"] == "tpfuse"]
        other = [r for r in sel if not r["provider"].startswith("tpfuse")]
        if not mine or not other:
            continue
        best = min(other, key=lambda r: r["median_us"])
        print(f"{op:28s} {shape:22s} {t:6d}: {mine[0]['median_us']:8.2f}  {best['provider']:14s} "
              f"{best['median_us']:8.2f}  x{best['median_us'] / mine[0]['median_us']:.2f}")


def plot(rows, directory):
    plt = common.pyplot()
    if plt is None:
        print("matplotlib not available: no plot")
        return
    for op in sorted({r["op"] for r in rows}):
        shapes = sorted({r["shape"] for r in rows if r["op"] == op})
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            for prov in sorted({r["provider"] for r in rows if r["op"] == op and "[" not in r["provider"]}):
                sel = sorted((r for r in rows if r["op"] == op and r["shape"] == shape and r["provider"] == prov),
                             key=lambda r: r["tokens"])
                ax.plot([r["tokens"] for r in sel], [r["median_us"] for r in sel], marker="o", label=prov)
            common.style_axes(ax, title=f"{op} {shape}", ylabel="median us (CUDA graph)", legend_size=None)
        fig.tight_layout()
        png = common.result_path("rope", tag=op, ext="png", directory=directory)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        print("wrote", png)


if __name__ == "__main__":
    main()
