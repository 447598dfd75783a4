"""Benchmark: paged-KV-cache decode attention (:func:`tpfuse.attention.decode_attention`) on one GPU.

Providers:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the equivalent *contiguous* cache
  (``k, v [B, Hkv, ctx, D]``, q ``[B, Hq, 1, D]``), the bool mask of valid positions ``[B, 1, 1, ctx]`` and
  ``enable_gqa=True`` (whatever backend torch picks for a masked GQA decode);
* ``tpfuse``: the Triton flash-decoding kernel on a paged bf16 cache (block tables shuffled);
* ``tpfuse_fp8``: the same on an FP8 e4m3 cache (one device scale; the launch's defaults, so since
  ``decode_attention.FP8_F16`` is on the fp16 tile loop); ``tpfuse_fp8_words``: the same launch with
  the e4m3 tiles loaded as int32 words (``decode_attention.FP8_WORDS``, off by default), its A/B;
  ``tpfuse_fp8_f16``: the same launch with its tile loop in fp16 forced (``fp8_f16=True``);
  ``tpfuse_fp8_f16_words``: both (the word loads converted straight to fp16: no byte-wide shared-memory loads and
  one conversion instruction per two elements in its sm_90 SASS).

Shapes: B in 1, 8, 64; context 1024 and 4096, or ``--contexts`` (every sequence at the full context, or with
``--mixed`` each at a random length in [ctx/2, ctx]; a context past a multiple of the block size leaves its last
block part-empty, as a decode step's cache does); heads 32/8 and 64/8; D 128; bf16 q; ``max_seq_len`` (the
capacity, which only clamps the lengths) is the context. Timing: CUDA graphs of back-to-back calls, median per call
(:func:`common.time_us`). GB/s counts the bytes the op must move: the K and V rows of the valid keys (in the
cache's dtype), q and out.

``--capacity-sweep`` (about a minute on one GPU) times instead the same batch (1, 8) and context (1024 keys, or
``--mixed`` lengths) in caches sized for more: ``max_seq_len`` 1024 / 8192 / 32768 with 8 cache rows, and 256 cache
rows (``max_batch``) at 1024, laid out as the model runtime's static paging (``KVStorage``: row ``b`` owns blocks
``[b * max_seq_len / bs, (b + 1) * max_seq_len / bs)``, block tables ``max_seq_len / bs`` wide), 3 rounds per case;
the issue's target is every time within 3% of the (max_seq_len 1024, 8 rows) one at the same batch and context.
Each capacity's output is checked bit-identical to the first one's (the launch does not depend on the capacity).

Output (``--out-dir``, default ``$OUT``, else ``bench/results``): ``decode_attention_<device>.json`` with the
usual header (device, commit from ``TPFUSE_COMMIT``, versions) and rows ``{provider, shape, batch, ctx,
max_seq_len, max_batch, median_us, gbps, kv_bytes}``, and ``decode_attention_<device>.png`` (time relative to SDPA
per shape and context; with ``--capacity-sweep`` ``..._capacity.json`` / ``.png``: time relative to the smallest
cache per provider). ``--quick``: B 1 and 64 only (``--batches``: those). ``--sweep``: also time tpfuse at forced
(NUM_SPLITS, BLOCK_N, num_warps, num_stages) configs (``--sweep-batches``, ``--sweep-splits``, ``--sweep-stages``,
``--sweep-cache``, ``--sweep-partitions`` (MIN_PARTITION) narrow or widen it; every config is a Triton compile of
its own, ~1 s). ``--heads 8/1,16/4``: other head counts (a TP shard's: 70B at TP 8, 8B at TP 2).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Case, copy_bandwidths, header, plot_ratio_panels, result_path, run_cases, write_json  # noqa: E402

from tpfuse import attention as A  # noqa: E402

BATCHES = (1, 8, 64)
CAPACITY_BATCHES = (1, 8)
CAPACITY_CONTEXT = 1024
CAPACITIES = ((1024, 8), (8192, 8), (32768, 8), (1024, 256))  # (max_seq_len, max_batch): cache rows x tokens
BATCHES_QUICK = (1, 64)
CONTEXTS = (1024, 4096)
HEADS = ((32, 8), (64, 8))
HEAD_DIM = 128
BLOCK_SIZE = 16
FP8 = torch.float8_e4m3fn


def make_case(bsz, ctx, hq, hkv, d, block_size, mixed, gen, dev="cuda"):
    """Paged caches (bf16 and FP8 copies, blocks in shuffled order), block tables, lengths, q, and the contiguous
    SDPA inputs holding the same keys."""
    mb = -(-ctx // block_size)  # a context that is not a multiple of the block leaves the last block part-empty
    num_blocks = bsz * mb
    lens = torch.full((bsz,), ctx, dtype=torch.int32)
    if mixed:
        lens = torch.randint(ctx // 2, ctx + 1, (bsz,), generator=gen, dtype=torch.int32)
    bt = torch.randperm(num_blocks, generator=gen).view(bsz, mb).to(torch.int32)
    kc = torch.randn(num_blocks, block_size, hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(num_blocks, block_size, hkv, d, device=dev, dtype=torch.bfloat16)
    q = torch.randn(bsz, hq, d, device=dev, dtype=torch.bfloat16)
    bt, lens = bt.to(dev), lens.to(dev)
    # contiguous equivalent: k[b, :, i] = cache[bt[b, i // bs], i % bs]
    k_lin = kc[bt.long()].reshape(bsz, mb * block_size, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
    v_lin = vc[bt.long()].reshape(bsz, mb * block_size, hkv, d)[:, :ctx].transpose(1, 2).contiguous()
    mask = (torch.arange(ctx, device=dev)[None, :] < lens[:, None])[:, None, None, :]
    scale = torch.tensor([0.02], device=dev)
    kc8 = (kc.float() / scale).to(FP8)
    vc8 = (vc.float() / scale).to(FP8)
    return dict(q=q, kc=kc, vc=vc, kc8=kc8, vc8=vc8, kv_scale=scale, bt=bt, lens=lens, k_lin=k_lin, v_lin=v_lin,
                mask=mask, n_keys=int(lens.sum()))


def op_bytes(c, hq, hkv, d, cache_elt):
    bsz = c["q"].shape[0]
    return 2 * c["n_keys"] * hkv * d * cache_elt + 2 * bsz * hq * d * 2


def sdpa(c, scale):
    q = c["q"][:, :, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, c["k_lin"], c["v_lin"], attn_mask=c["mask"],
                                                            scale=scale, enable_gqa=True)[:, :, 0, :]


def check(c, scale, ctx):
    """tpfuse (bf16 and FP8 caches, default configs) against SDPA: one bf16 rounding apart / the FP8 cache's
    quantization; the FP8 cache's word loads (``tpfuse_fp8_words``) bit-identical to its e4m3 loads."""
    ref = sdpa(c, scale).float()
    out = A.decode_attention(c["q"], c["kc"], c["vc"], c["bt"], c["lens"], scale=scale, max_seq_len=ctx)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"tpfuse decode attention disagrees with SDPA: {err}"
    out8 = A.decode_attention(c["q"], c["kc8"], c["vc8"], c["bt"], c["lens"], scale=scale, kv_scale=c["kv_scale"],
                              max_seq_len=ctx)
    err8 = ((out8.float() - ref).norm() / ref.norm()).item()
    assert err8 < 1e-1, f"tpfuse decode attention (FP8 cache) disagrees with SDPA: {err8}"
    words = torch.empty_like(out8)
    fp8_words(c, scale, words, ctx)
    assert torch.equal(words, out8), "the FP8 cache's word loads change the output"
    f16, f16w = torch.empty_like(out8), torch.empty_like(out8)
    fp8_f16(c, scale, f16, ctx)
    fp8_f16(c, scale, f16w, ctx, words=True)
    err16 = ((f16.float() - out8.float()).norm() / out8.float().norm()).item()
    assert err16 < 4e-3, f"the FP8 cache's fp16 loop is {err16} from its bf16 loop"
    err16w = ((f16w.float() - f16.float()).norm() / f16.float().norm()).item()
    assert err16w < 4e-3, f"the FP8 cache's word loads move the fp16 loop's output by {err16w}"


SWEEP_SPLITS = (1, 2, 4, 8, 16, 32)


SWEEP_CACHES = {"bf16": ("bf16",), "fp8": ("fp8",), "fp8_words": ("fp8_words",), "fp8_f16": ("fp8_f16",),
                "both": ("bf16", "fp8"), "fp8_both": ("fp8", "fp8_words"), "fp8_f16ab": ("fp8", "fp8_f16"),
                "all": ("bf16", "fp8", "fp8_words", "fp8_f16")}
"""``--sweep-cache``: the cache forms it times; ``fp8_words``: the FP8 cache with its tiles loaded as int32 words
(``decode_attention.FP8_WORDS``); ``fp8_f16``: with its tile loop in fp16 (``decode_attention.FP8_F16``)."""


def sweep(c, d, ctx, scale, provs, splits_list=SWEEP_SPLITS, stages_list=(3,), cache="bf16", partitions=(128,)):
    """tpfuse at forced (NUM_SPLITS, BLOCK_N, num_warps, num_stages, MIN_PARTITION) configs (tiles no longer than
    the partition), added to ``provs`` as ``tpfuse[...]``, or on the FP8 cache (``cache`` ``fp8`` / ``fp8_words``)
    ``tpfuse_fp8[...]`` / ``tpfuse_fp8_words[...]``; a stage count other than Triton's default 3 shows in the name
    (``st=``), a partition other than 128 keys too (``mp=``)."""
    from tpfuse.kernels.decode_attention import launch_decode_attention

    out = torch.empty_like(c["q"])
    fp8, words, f16 = cache != "bf16", cache == "fp8_words", cache == "fp8_f16"
    kc, vc, kvs = (c["kc8"], c["vc8"], c["kv_scale"]) if fp8 else (c["kc"], c["vc"], None)
    tag = {"bf16": "tpfuse", "fp8": "tpfuse_fp8", "fp8_words": "tpfuse_fp8_words", "fp8_f16": "tpfuse_fp8_f16"}[cache]
    for splits, mp in itertools.product(splits_list, partitions):
        if mp * (splits - 1) >= ctx:  # every split past the first would be empty at this context
            continue
        for bn, nw, st in itertools.product((32, 64, 128), (4, 8), stages_list):
            if bn > mp or mp % bn:
                continue
            name = (f"{tag}[s={splits},bn={bn},nw={nw}" + (f",st={st}" if st != 3 else "")
                    + (f",mp={mp}]" if mp != 128 else "]"))
            provs[name] = (
                lambda splits=splits, bn=bn, nw=nw, st=st, mp=mp: launch_decode_attention(
                    c["q"], kc, vc, c["bt"], c["lens"], out, scale, kvs, max_seq_len=ctx,
                    num_splits=splits, min_partition=mp, block_n=bn, num_warps=nw, num_stages=st,
                    fp8_words=words, fp8_f16=f16))


def fp8_words(c, scale, out, ctx):
    """The FP8 cache's launch with its tiles loaded as int32 words (``fp8_words=True``): the A/B of
    ``decode_attention.FP8_WORDS`` against ``tpfuse_fp8``."""
    from tpfuse.kernels.decode_attention import launch_decode_attention

    launch_decode_attention(c["q"], c["kc8"], c["vc8"], c["bt"], c["lens"], out, scale, c["kv_scale"],
                            max_seq_len=ctx, fp8_words=True)


def fp8_f16(c, scale, out, ctx, words=False):
    """The FP8 cache's launch with its tile loop in fp16 (``fp8_f16=True``; ``words``: its tiles loaded as int32
    words too): the A/B of ``decode_attention.FP8_F16`` (and ``FP8_WORDS``) against ``tpfuse_fp8``."""
    from tpfuse.kernels.decode_attention import launch_decode_attention

    launch_decode_attention(c["q"], c["kc8"], c["vc8"], c["bt"], c["lens"], out, scale, c["kv_scale"],
                            max_seq_len=ctx, fp8_f16=True, fp8_words=words)


def make_static_paged_case(bsz, ctx, cap, max_batch, hq, hkv, d, block_size, mixed, gen, dev="cuda"):
    """Caches of ``max_batch`` rows of ``cap`` keys laid out as the model runtime's static paging: batch row ``b``
    is cache row ``b`` and owns blocks ``[b * cap / bs, (b + 1) * cap / bs)``, its keys in the first of them (the
    rest zeros, as ``KVStorage`` allocates them); bf16 and FP8 copies; the SDPA reference of the batch."""
    mb = cap // block_size
    lens = torch.full((bsz,), ctx, dtype=torch.int32)
    if mixed:
        lens = torch.randint(ctx // 2, ctx + 1, (bsz,), generator=gen, dtype=torch.int32)
    used = ctx // block_size
    kc = torch.zeros(max_batch, mb, block_size, hkv, d, device=dev, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    k_rows = torch.randn(bsz, used, block_size, hkv, d, device=dev, dtype=torch.bfloat16)
    v_rows = torch.randn_like(k_rows)
    kc[:bsz, :used], vc[:bsz, :used] = k_rows, v_rows
    kc, vc = kc.flatten(0, 1), vc.flatten(0, 1)
    bt = (torch.arange(bsz, dtype=torch.int32)[:, None] * mb + torch.arange(mb, dtype=torch.int32)[None]).to(dev)
    q = torch.randn(bsz, hq, d, device=dev, dtype=torch.bfloat16)
    lens = lens.to(dev)
    k_lin = k_rows.reshape(bsz, ctx, hkv, d).transpose(1, 2)
    v_lin = v_rows.reshape(bsz, ctx, hkv, d).transpose(1, 2)
    mask = (torch.arange(ctx, device=dev)[None, :] < lens[:, None])[:, None, None, :]
    scale = torch.tensor([0.02], device=dev)
    kc8, vc8 = (kc.float() / scale).to(FP8), (vc.float() / scale).to(FP8)
    return dict(q=q, kc=kc, vc=vc, kc8=kc8, vc8=vc8, kv_scale=scale, bt=bt, lens=lens, k_lin=k_lin, v_lin=v_lin,
                mask=mask, n_keys=int(lens.sum()))


def capacity_cases(args):
    """Per batch x (max_seq_len, max_batch): the same lengths in a cache sized for more; providers tpfuse and
    tpfuse_fp8. Outputs checked against SDPA, and bit-identical across capacities."""
    gen = torch.Generator().manual_seed(0)
    hq, hkv = HEADS[0]
    d, ctx = HEAD_DIM, CAPACITY_CONTEXT
    scale = d ** -0.5
    for bsz in CAPACITY_BATCHES:
        first = None
        for cap, rows in CAPACITIES:
            gen.manual_seed(bsz)  # the same lengths (CPU generator) and q, keys (device RNG) at every capacity
            torch.manual_seed(bsz)
            c = make_static_paged_case(bsz, ctx, cap, rows, hq, hkv, d, args.block_size, args.mixed, gen)
            check(c, scale, cap)
            out, out8 = torch.empty_like(c["q"]), torch.empty_like(c["q"])
            provs = {"tpfuse": lambda: A.decode_attention(c["q"], c["kc"], c["vc"], c["bt"], c["lens"], scale=scale,
                                                          out=out, max_seq_len=cap),
                     "tpfuse_fp8": lambda: A.decode_attention(
                         c["q"], c["kc8"], c["vc8"], c["bt"], c["lens"], scale=scale, kv_scale=c["kv_scale"],
                         out=out8, max_seq_len=cap)}
            for f in provs.values():
                f()
            first = first or (out.clone(), out8.clone())
            assert torch.equal(out, first[0]) and torch.equal(out8, first[1]), f"output changed at capacity {cap}"
            yield Case(fields={"shape": f"hq{hq}/hkv{hkv}/d{d}", "batch": bsz, "ctx": ctx, "max_seq_len": cap,
                               "max_batch": rows}, providers=provs,
                       extra={"nb16": op_bytes(c, hq, hkv, d, 2), "nb8": op_bytes(c, hq, hkv, d, 1)})
            c = provs = None
            torch.cuda.empty_cache()


def cases(args):
    """Per heads x context x batch: a checked paged case, providers sdpa, tpfuse, tpfuse_fp8 (+ the sweep)."""
    gen = torch.Generator().manual_seed(0)
    d = HEAD_DIM
    scale = d ** -0.5
    for hq, hkv in args.heads or HEADS:
        for ctx in args.contexts or CONTEXTS:
            for bsz in args.batches or (BATCHES_QUICK if args.quick else BATCHES):
                c = make_case(bsz, ctx, hq, hkv, d, args.block_size, args.mixed, gen)
                check(c, scale, ctx)
                out = torch.empty_like(c["q"])
                provs = {"sdpa": lambda: sdpa(c, scale),
                         "tpfuse": lambda: A.decode_attention(c["q"], c["kc"], c["vc"], c["bt"], c["lens"],
                                                              scale=scale, out=out, max_seq_len=ctx),
                         "tpfuse_fp8": lambda: A.decode_attention(
                             c["q"], c["kc8"], c["vc8"], c["bt"], c["lens"], scale=scale, kv_scale=c["kv_scale"],
                             out=out, max_seq_len=ctx),
                         "tpfuse_fp8_words": lambda: fp8_words(c, scale, out, ctx),
                         "tpfuse_fp8_f16": lambda: fp8_f16(c, scale, out, ctx),
                         "tpfuse_fp8_f16_words": lambda: fp8_f16(c, scale, out, ctx, words=True)}
                if args.sweep and (not args.sweep_batches or bsz in args.sweep_batches):
                    for cache in SWEEP_CACHES[args.sweep_cache]:
                        sweep(c, d, ctx, scale, provs, args.sweep_splits or SWEEP_SPLITS, args.sweep_stages or (3,),
                              cache, args.sweep_partitions or (128,))
                yield Case(fields={"shape": f"hq{hq}/hkv{hkv}/d{d}", "batch": bsz, "ctx": ctx, "max_seq_len": ctx,
                                   "max_batch": bsz}, providers=provs,
                           extra={"nb16": op_bytes(c, hq, hkv, d, 2), "nb8": op_bytes(c, hq, hkv, d, 1)})
                c = provs = None  # free this case's caches before the next one allocates
                torch.cuda.empty_cache()


def row(case, provider, timing):
    """A row ``{provider, shape, batch, ctx, max_seq_len, max_batch, median_us, gbps, kv_bytes}`` (printed); a
    failed provider: printed."""
    f = case.fields
    where = f"{f['shape']:18s} ctx={f['ctx']:5d} B={f['batch']:3d} cap={f['max_seq_len']:5d}x{f['max_batch']:<3d}"
    if timing.mode.startswith("error"):
        print(f"{where} {provider:28s} {timing.mode}", flush=True)
        return None
    us, nbytes = timing.us, case.extra["nb8" if provider.startswith("tpfuse_fp8") else "nb16"]
    r = {"provider": provider, **f, "median_us": round(us, 3), "gbps": round(nbytes / (us * 1e-6) / 1e9, 1),
         "kv_bytes": nbytes}
    print(f"{where} {provider:28s} {us:9.2f} us {r['gbps']:8.1f} GB/s", flush=True)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="B 1 and 64 only")
    ap.add_argument("--mixed", action="store_true", help="random lengths in [ctx/2, ctx] instead of all at ctx")
    ap.add_argument("--sweep", action="store_true",
                    help="also time forced (NUM_SPLITS, BLOCK_N, warps, stages) configs (unchecked: the defaults are)")
    ints = (lambda text: tuple(int(x) for x in text.split(",") if x))
    ap.add_argument("--sweep-batches", type=ints, default=(), help="--sweep only at these batches (default: all)")
    ap.add_argument("--sweep-splits", type=ints, default=(), help="--sweep's split counts (default 1,2,4,...,32)")
    ap.add_argument("--sweep-stages", type=ints, default=(), help="--sweep's num_stages (default 3)")
    ap.add_argument("--sweep-partitions", type=ints, default=(),
                    help="--sweep's MIN_PARTITION keys (default 128; tiles no longer than the partition)")
    ap.add_argument("--heads", type=lambda t: tuple(tuple(int(v) for v in h.split("/")) for h in t.split(",") if h),
                    default=(), help="Hq/Hkv pairs, e.g. 8/1,16/4 (a TP shard's heads; default 32/8,64/8)")
    ap.add_argument("--sweep-cache", choices=tuple(SWEEP_CACHES), default="bf16",
                    help="the cache(s) --sweep times (fp8: tpfuse_fp8[...] rows; fp8_words: tpfuse_fp8_words[...])")
    ap.add_argument("--batches", type=ints, default=(), help="batches to time (default 1,8,64; --quick 1,64)")
    ap.add_argument("--contexts", type=ints, default=(),
                    help="keys per sequence (default 1024,4096); not a multiple of 128: a partial last tile")
    ap.add_argument("--capacity-sweep", action="store_true",
                    help="only: B 1 / 8 at 1024 keys in caches of max_seq_len 1k / 8k / 32k and 256 rows (~1 min)")
    ap.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="paged-cache block size (default 16)")
    ap.add_argument("--out-dir", default=None, help="default: $OUT, else bench/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention needs a CUDA GPU")
    t_start = time.time()
    if not args.capacity_sweep:  # the ceiling GB/s is read against (the faster way, as bench_e2e's floor)
        ways = copy_bandwidths(torch.device("cuda"))
        args.copy_tb_s = {k: round(v / 1e12, 3) for k, v in ways.items()}
        print(f"device-to-device copy bandwidth (TB/s, read + write): {args.copy_tb_s}", flush=True)

    def after_case(rows):  # after every size, so a run cut short still leaves its rows
        print(f"  [{time.time() - t_start:.0f}s]", flush=True)
        save(args, rows)

    if args.capacity_sweep:
        rows = run_cases(capacity_cases(args), row, after_case=after_case, rounds=3)
        print("wrote", save(args, rows))
        print("wrote", capacity_summary(args, rows) or "no plot (matplotlib missing)")
        return
    rows = run_cases(cases(args), row, after_case=after_case)
    print("wrote", save(args, rows))
    summary(rows, max(args.copy_tb_s.values()))
    png = plot_ratio_panels(result_path("decode_attention", ext="png", directory=args.out_dir),
                            [r for r in rows if "[" not in r["provider"]], panel=("shape", "ctx"), x="batch",
                            y="median_us", baseline="sdpa", ylabel="time / SDPA time (lower is better)",
                            title=f"decode attention, paged cache (block {args.block_size}), bf16 q, "
                                  f"{'mixed' if args.mixed else 'full'} lengths", xlabel="batch")
    print("wrote", png or "no plot (matplotlib missing)")


def save(args, rows):
    tag = "capacity" if args.capacity_sweep else ""
    return write_json(result_path("decode_attention", tag=tag, directory=args.out_dir),
                      header("bench_decode_attention", quick=args.quick, mixed=args.mixed, sweep=args.sweep,
                             sweep_batches=list(args.sweep_batches), sweep_splits=list(args.sweep_splits),
                             sweep_stages=list(args.sweep_stages), batches=list(args.batches),
                             sweep_cache=args.sweep_cache,
                             copy_bandwidth_ways_tb_s=getattr(args, "copy_tb_s", {}),
                             capacity_sweep=args.capacity_sweep, block_size=args.block_size, head_dim=HEAD_DIM,
                             heads=[list(h) for h in (HEADS[:1] if args.capacity_sweep else args.heads or HEADS)]),
                       rows)


def capacity_summary(args, rows):
    """Per provider and batch: the time at each cache size relative to the smallest (target: within 3%); plots
    the same ratios. Returns the PNG's path (None without matplotlib)."""
    base_cap = CAPACITIES[0]
    label = {cap: f"max_seq_len {cap[0]} x {cap[1]} rows" for cap in CAPACITIES}
    print(f"\nprovider / batch: time at each (max_seq_len, rows) / time at {base_cap} (target <= 1.03)")
    for prov, bsz in sorted({(r["provider"], r["batch"]) for r in rows}):
        sel = {(r["max_seq_len"], r["max_batch"]): r["median_us"] for r in rows
               if (r["provider"], r["batch"]) == (prov, bsz)}
        if base_cap not in sel:
            continue
        ratios = {cap: sel[cap] / sel[base_cap] for cap in CAPACITIES if cap in sel}
        worst = max(abs(x - 1) for x in ratios.values())
        print(f"{prov:12s} B={bsz:3d}: " + ", ".join(f"{label[c]} {sel[c]:.2f} us ({x:.3f})" for c, x in ratios.items())
              + f"  -> {'met' if worst <= 0.03 else 'NOT met'}")
    relabeled = [{**r, "cache": r["provider"], "provider": label[(r["max_seq_len"], r["max_batch"])]} for r in rows]
    return plot_ratio_panels(result_path("decode_attention", tag="capacity", ext="png", directory=args.out_dir),
                             relabeled, panel=("cache", "ctx"), x="batch", y="median_us",
                             baseline=label[base_cap], ylabel=f"time / time at {label[base_cap]}",
                             title=f"decode attention vs cache capacity, {HEADS[0][0]}/{HEADS[0][1]} heads, "
                                   f"D {HEAD_DIM}, block {args.block_size}, "
                                   f"{'mixed' if args.mixed else 'full'} lengths (target: within 3%)",
                             xlabel="batch", refs=(1.0, 0.97, 1.03))


def summary(rows, copy_tb_s):
    """Per (shape, ctx, batch): tpfuse / tpfuse_fp8 vs SDPA, and the best swept config when there is one; GB/s
    also as a fraction of the copy bandwidth ``copy_tb_s`` (#22's attention target: >= 0.9 at batch 64)."""
    print(f"\nshape / ctx / batch: sdpa us, tpfuse us (GB/s, of copy {copy_tb_s} TB/s), tpfuse_fp8 us (GB/s), "
          "speedup vs sdpa, best sweep (of copy)")
    for key in sorted({(r["shape"], r["ctx"], r["batch"]) for r in rows}):
        sel = {r["provider"]: r for r in rows if (r["shape"], r["ctx"], r["batch"]) == key}
        if not {"sdpa", "tpfuse", "tpfuse_fp8"} <= sel.keys():
            continue
        s, t, f = sel["sdpa"], sel["tpfuse"], sel["tpfuse_fp8"]
        swept = [r for p, r in sel.items() if p.startswith("tpfuse[")]
        best = min(swept, key=lambda r: r["median_us"]) if swept else None
        swept8 = [r for p, r in sel.items() if p.startswith(("tpfuse_fp8[", "tpfuse_fp8_words["))]
        best8 = min(swept8, key=lambda r: r["median_us"]) if swept8 else None
        frac = (lambda r: r["gbps"] / (copy_tb_s * 1e3))
        print(f"{key[0]:18s} {key[1]:5d} {key[2]:3d}: {s['median_us']:8.2f} {t['median_us']:8.2f} ({t['gbps']:6.0f}, "
              f"{frac(t):.3f}) {f['median_us']:8.2f} ({f['gbps']:6.0f})  x{s['median_us'] / t['median_us']:.2f}"
              + (f"  {best['provider']} {best['median_us']:.2f} ({frac(best):.3f})" if best else "")
              + (f"  {best8['provider']} {best8['median_us']:.2f} ({best8['gbps']:.0f} GB/s)" if best8 else ""))


if __name__ == "__main__":
    main()
