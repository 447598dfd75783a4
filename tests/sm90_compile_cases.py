"""Compile every tpfuse Triton kernel for Hopper (sm_90) without a GPU: Triton's front end, LLVM and the ptxas it
bundles run on the CPU. Run by tests/test_sm90_compile.py in a clean process (no TRITON_INTERPRET). Prints one line
per case and exits 1 if any case fails to compile. ``--ptx-hashes`` adds each case's PTX fingerprint
(:func:`ptx_hash`); ``--write-fingerprints`` records them in :data:`FINGERPRINTS`, which tests/test_sm90_compile.py
compares against.

Covers the variants a GPU run would build: every output format (the local kernels' multi-row and split-row
variants also with the alignment / divisibility specialization of a real launch, ``hinted``), TP 2/4/8 for the
fused all-reduce kernels, both RoPE styles, bf16 and FP8 KV caches (RoPE cache write, decode attention: single-pass
and split + combine, GQA groups 1 / 4 / 8 padded to 16 rows, D 64 / 128 / 256). Pointer types follow the launchers
(the ``launch_*`` functions beside each kernel; backends/async_tp.py for ``reduce_slots``).
"""

import os
import re
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ptx_checks import pdl_order_problem, ticket_order_problem  # noqa: E402
from tpfuse.kernels import (add_rmsnorm, attn_o_gemm, decode_attention, fused_allreduce, l2_prefetch,  # noqa: E402
                            pdl, quantize, reduce_slots, rope, silu_mul, small_m_gemm)

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"eps", "qk_scale", "qk_eps"}
FINGERPRINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_ptx_fingerprints.txt")
REGENERATE = ("python tests/sm90_compile_cases.py --write-fingerprints -- only together with a GPU re-run of the "
              "changed kernels' tests (tests/distributed/*_gpu.py, the local-op, rope and decode-attention tests on "
              "CUDA, ...): the fingerprints stand for PTX that ran on GPUs")


def out_types(fmt):
    """(data, scale) pointer types of an output format (a tpfuse.quant.QuantFormat id)."""
    if fmt == 0:
        return "*bf16", "*bf16"
    if fmt in (4, 5):
        return "*u8", "*fp8e4nv"
    return "*fp8e4nv", "*fp32"


def compile_kernel(fn, ptrs, const, num_warps=8, hinted=False, num_stages=None, unhinted=("n_rows",), maxnreg=None):
    """``hinted``: declare what the JIT specializes at a real launch -- 16-byte aligned pointers and sizes/strides
    divisible by 16 (``tt.divisibility``; not ``unhinted``: ``n_rows``, which the local kernels exclude from
    specialization, or a kernel's own ``do_not_specialize`` list) -- so the vectorized code that actually runs is
    compiled, with ints as i32. ``num_stages``: the launcher's pipeline depth (None: Triton's default);
    ``maxnreg``: the launcher's register cap (None: none)."""
    names = fn.arg_names
    if "PDL" in names and "PDL" not in const:  # the launch every call makes outside pdl.launches()
        const = dict(const, PDL=False)
    for pf in ("PF_LINES", "PF_KEYS"):  # no L2 prefetch: every launch outside pdl.launches()
        if pf in names and pf not in const:
            const = dict(const, **{pf: 0})
    if "FMA" in names and "FMA" not in const:  # the small-M GEMM's default main loop (tensor cores)
        const = dict(const, FMA=False)
    if "W_DESC" in names and "W_DESC" not in const:  # the small-M GEMM's default weight loads (pointers)
        const = dict(const, W_DESC=False)
    if "FP8_WORDS" in names and "FP8_WORDS" not in const:  # decode attention's default e4m3 tile loads
        const = dict(const, FP8_WORDS=False)
    if "F16_MMA" in names and "F16_MMA" not in const:  # decode attention's default: the tiles in q's dtype
        const = dict(const, F16_MMA=False)
    if "HOIST" in names and "HOIST" not in const:  # the combine kernel's default: no read before its PDL wait
        const = dict(const, HOIST=False)
    if "PARTS" in names and "PARTS" not in const:  # decode attention's default: the output (or the fp32 partials)
        const = dict(const, PARTS=False)
    if "PF_NEXT" in names and "PF_NEXT" not in const:  # no next-weight prefetch: pf_ptr None (a constexpr)
        const = dict(const, PF_NEXT=0, pf_ptr=None)
    sig = {n: ("constexpr" if n in const else ptrs.get(n, "fp32" if n in FLOATS else ("i32" if hinted else "i64")))
           for n in names}
    attrs = {}
    if hinted:
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
                 if sig[n] not in ("constexpr", "fp32") and n not in unhinted}
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in const.items()}, attrs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=TARGET, options=options)


def cases():
    """Every case (:func:`base_cases`), then one PDL variant (``PDL=True``, kernels/pdl.py) of each kernel that
    takes it: the first case of that kernel, renamed ``<case> pdl``; for the streaming kernels (their trigger after
    the main loop: ``pdl.wait`` / ``pdl.trigger``) also ``<case> pdl early`` (``PDL=pdl.EARLY``: the trigger right
    after the wait, ``pdl.EARLY_TRIGGER``)."""
    seen = set()
    pdl_variants = []
    for case in base_cases():
        yield case
        fn = case[1]
        if "PDL" in fn.arg_names and fn not in seen and not case[3].get("PDL"):  # (a PDL-only kernel: as given)
            seen.add(fn)
            pdl_variants.append((case[0] + " pdl", fn, case[2], dict(case[3], PDL=True), *case[4:]))
            if _streaming(fn):
                pdl_variants.append((case[0] + " pdl early", fn, case[2], dict(case[3], PDL=pdl.EARLY), *case[4:]))
    yield from pdl_variants


def _streaming(fn) -> bool:
    """Whether ``fn`` is one of the kernels that trigger after their main loop (``pdl.wait`` / ``pdl.trigger``)."""
    return fn in (decode_attention._split_kernel, decode_attention._rope_split_kernel,
                  decode_attention._split_combine_kernel, decode_attention._rope_split_combine_kernel,
                  small_m_gemm._small_m_gemm_kernel, small_m_gemm._small_m_gemm_norm_kernel,
                  small_m_gemm._small_m_gemm_serial_kernel, attn_o_gemm._attn_o_gemm_kernel)


def base_cases():
    for fmt in range(6):
        out_t, sc_t = out_types(fmt)
        group = 128 if fmt == 3 else 16
        io = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "res_out_ptr": "*bf16", "out_ptr": out_t,
              "scale_ptr": sc_t, "in_scale_ptr": "*fp32"}
        yield (f"add_rmsnorm fmt={fmt}", add_rmsnorm._add_rmsnorm_kernel, io,
               dict(HAS_RES=True, GEMMA=fmt == 2, FMT=fmt, BLOCK=8192, GROUP=group, PAD_BLOCK=512, ROWS=1, SPLIT=1))
        yield (f"add_rmsnorm fmt={fmt} rows=4", add_rmsnorm._add_rmsnorm_kernel, io,
               dict(HAS_RES=True, GEMMA=False, FMT=fmt, BLOCK=4096, GROUP=group, PAD_BLOCK=256, ROWS=4, SPLIT=1),
               8, True)
        if fmt != 2:
            yield (f"add_rmsnorm fmt={fmt} split=4", add_rmsnorm._add_rmsnorm_kernel, io,
                   dict(HAS_RES=True, GEMMA=True, FMT=fmt, BLOCK=8192, GROUP=group, PAD_BLOCK=512, ROWS=1,
                        SPLIT=4), 8, True)
        yield (f"reduce_slots+norm fmt={fmt}", reduce_slots._reduce_slots_kernel, dict(io, slots_ptr="*bf16"),
               dict(NSLOTS=2, NORM=True, HAS_RES=True, GEMMA=False, FMT=fmt, BLOCK=8192, GROUP=group, PAD_BLOCK=512))
        if fmt:
            yield (f"quantize fmt={fmt}", quantize._quantize_kernel, io,
                   dict(FMT=fmt, BLOCK=4096, GROUP=group, PAD_BLOCK=512, ROWS=1))
        if fmt in (0, 1, 3, 5):
            yield (f"silu_mul fmt={fmt}", silu_mul._silu_mul_kernel, io,
                   dict(FMT=fmt, BLOCK=4096, GROUP=group, PAD_BLOCK=1024, ROWS=1))
            yield (f"silu_mul fmt={fmt} rows=2", silu_mul._silu_mul_kernel, io,
                   dict(FMT=fmt, BLOCK=1024, GROUP=group, PAD_BLOCK=1024, ROWS=2), 4, True)
    yield ("reduce_slots sum tp8", reduce_slots._reduce_slots_kernel,
           {"slots_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "res_out_ptr": "*bf16", "out_ptr": "*bf16",
            "scale_ptr": "*bf16", "in_scale_ptr": "*bf16"},
           dict(NSLOTS=8, NORM=False, HAS_RES=False, GEMMA=False, FMT=0, BLOCK=8192, GROUP=16, PAD_BLOCK=1))
    for world in (2, 4, 8):
        for fmt in (0, 1, 5):
            out_t, sc_t = out_types(fmt)
            p1 = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "res_out_ptr": "*bf16", "out_ptr": out_t,
                  "scale_ptr": sc_t, "in_scale_ptr": "*fp32", "ws_x_ptr": "*bf16", "flag_ptr": "*i32",
                  "epoch_ptr": "*i32", "delta_ptr": "*i64", "err_ptr": "*i32"}
            yield (f"fused_allreduce oneshot tp{world} fmt={fmt}", fused_allreduce._oneshot_kernel, p1,
                   dict(RANK=world - 1, WORLD=world, G=132, HAS_RES=True, NORM=True, GEMMA=False, FMT=fmt,
                        BLOCK=8192, GROUP=16, X_ELEM=2))
            yield (f"fused_allreduce oneshot_pipe tp{world} fmt={fmt}", fused_allreduce._oneshot_pipe_kernel, p1,
                   dict(RANK=0, WORLD=world, P=66, C=66, HAS_RES=True, NORM=True, GEMMA=False, FMT=fmt,
                        BLOCK=8192, GROUP=16, X_ELEM=2, PB=128))
            p2 = dict(p1, st_out_ptr=out_t, st_res_ptr="*bf16", st_scale_ptr=sc_t)
            yield (f"fused_allreduce twoshot tp{world} fmt={fmt}", fused_allreduce._twoshot_kernel, p2,
                   dict(RANK=1, WORLD=world, G=132, HAS_RES=True, NORM=True, GEMMA=True, FMT=fmt,
                        ST_FMT=4 if fmt == 5 else fmt, BLOCK=8192, GROUP=16, SC_BLOCK=512, OUT_ELEM=1 if fmt else 2,
                        SC_ELEM=1 if fmt in (4, 5) else 4, X_ELEM=2))
    for neox in (True, False):
        yield (f"qk_norm_rope neox={neox}", rope._qk_norm_rope_kernel,
               {"qkv_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "cs_ptr": "*fp32", "pos_ptr": "*i64"},
               dict(HALF=64, BH=8, IS_NEOX=neox, GEMMA=False))
    for fp8 in (False, True):
        cache = "*fp8e4nv" if fp8 else "*bf16"
        yield (f"rope_kv_cache_write fp8={fp8}", rope._rope_kv_cache_kernel,
               {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "cs_ptr": "*fp32",
                "kc_ptr": cache, "vc_ptr": cache, "slot_ptr": "*i64", "scale_ptr": "*fp32"},
               dict(HALF=64, BH=4, IS_NEOX=True, CACHE_FP8=fp8))

    yield ("l2_prefetch", l2_prefetch._l2_prefetch_kernel, {"ptr": "*u8"}, dict(LINES=l2_prefetch.LINES), 4, True)
    yield from decode_attention_cases()
    yield from small_m_gemm_cases()
    yield from small_m_gemm_norm_cases()
    yield from small_m_gemm_tma_cases()
    yield from attn_o_gemm_cases()


def attn_o_gemm_cases():
    """o_proj with the decode attention's combine folded in (kernels/attn_o_gemm.py), at the tiles
    :func:`~tpfuse.kernels.attn_o_gemm.tile_config` takes from the shipped table for the 8B (TP 1 / 2) and the 70B
    TP 8 rank at batch 1 (16 splits: 16 rows) and the 8B at batch 4 (8 splits: 32 rows), plain and ADD_RES, with the
    prefetch lines of a batch-1 PDL launch; and the rope-split kernels writing those partials (``PARTS``)."""
    from tpfuse.kernels import small_m_configs as smc

    bf, fp32 = "*bf16", "*fp32"
    ptrs = {"p_ptr": bf, "w_ptr": bf, "am_ptr": fp32, "al_ptr": fp32, "sl_ptr": "*i64", "out_ptr": bf, "res_ptr": bf,
            "sqo_ptr": fp32, "nw_ptr": bf, "xo_ptr": bf}
    for model, hq, n_out, bsz, splits in (("8B", 32, 4096, 1, 16), ("8B/tp2", 16, 4096, 1, 16),
                                          ("70B/tp8", 8, 8192, 1, 16), ("8B", 32, 4096, 4, 8)):
        b_pad, s_pad = attn_o_gemm.rows_pad(bsz, splits)
        for add in (False, True):
            cfg = attn_o_gemm.tile_config(n_out, hq * 128, 128, bsz, b_pad * s_pad, "bf16", "sm90", 132, add)
            const = dict(D=128, NUM_SPLITS=splits, MIN_PARTITION=128, ATTN_BLOCK_N=128, B_PAD=b_pad, S_PAD=s_pad,
                         HQ_PAD=hq, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ADD_RES=add)
            name = f"attn_o_gemm {model} b{bsz} s{splits} {cfg.short()}" + (" add_res" if add else "")
            yield (name, attn_o_gemm._attn_o_gemm_kernel, ptrs, const, cfg.num_warps, True, cfg.num_stages, ("M",))
            lines = attn_o_gemm.prefetch_lines(n_out, hq * 128, 1, 2, cfg.block_n, bsz)
            if lines:
                yield (name + f" pdl prefetch{lines}", attn_o_gemm._attn_o_gemm_kernel, ptrs,
                       dict(const, PDL=True, PF_LINES=lines), cfg.num_warps, True, cfg.num_stages, ("M",))
    assert smc.SUMSQ_ROWS == 32
    rope_ptrs = {"q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "pos_ptr": "*i64", "cs_ptr": fp32, "qw_ptr": bf,
                 "kw_ptr": bf, "kc_ptr": bf, "vc_ptr": bf, "bt_ptr": "*i32", "sl_ptr": "*i64", "kvs_ptr": fp32,
                 "out_ptr": bf, "ws_o_ptr": fp32, "ws_m_ptr": fp32, "ws_l_ptr": fp32}
    for splits in (16, 8):  # the group is a runtime argument (GROUP_PAD 16 for groups up to 16)
        const = dict(D=128, GROUP_PAD=16, BLOCK_N=128, MIN_PARTITION=128, BLOCK_SIZE=256, NUM_SPLITS=splits,
                     CACHE_FP8=False, PV_HILO=True, PREC="tf32", QK_NORM=False, GEMMA=False, PARTS=True)
        name = f"rope_decode_attention parts splits={splits}"
        for pdl_on in (False, True):
            yield (name + (" pdl" if pdl_on else ""), decode_attention._rope_split_kernel, rope_ptrs,
                   dict(const, PDL=pdl_on), 4, True)
        yield (name + " pdl hoist1", decode_attention._rope_split_hoist_kernel, rope_ptrs,
               dict(const, PDL=True, HOIST=1), 4, True)


def decode_attention_cases():
    """The configs :func:`tpfuse.kernels.decode_attention.pick_config` picks at H100 / H200 shapes (bf16 caches:
    BLOCK_N 128 for D <= 128 with 16-bit q, 32 for D=256 / fp32; up to 16 splits, 8 warps at one split (32-key tiles
    at 4 warps from 3 programs an SM on: ``ONE_SPLIT_TILES``); FP8 caches:
    4 warps, 32 splits of 64-key tiles at B=1, 8 / 2 splits of 32-key tiles at B=8 / 64, with PDL too), and the
    earlier FP8 rule's (64-key tiles, 8 / 1 splits), bf16 / fp16 / fp32 q, single pass and split, the int32-word
    e4m3 tile loads (``FP8_WORDS``, off), the split kernel with the step's RoPE (+ QK-norm) and cache write folded
    in (``_rope_split_kernel``: the model's decode path), both with the combine in their last programs
    (``FUSE_COMBINE``, off: ``fusedcomb``), and the combine kernel (power-of-two and other split counts). Partitions
    are computed on the device (``MIN_PARTITION`` 128)."""
    for q_t, cache, d, group, bn, splits, warps in (
            ("*bf16", "*bf16", 128, 4, 128, 16, 4), ("*bf16", "*bf16", 128, 4, 128, 4, 4),
            ("*bf16", "*bf16", 128, 8, 128, 1, 8), ("*bf16", "*bf16", 64, 1, 128, 16, 4),
            ("*bf16", "*fp8e4nv", 128, 4, 64, 32, 4), ("*bf16", "*fp8e4nv", 128, 8, 64, 8, 4),
            ("*bf16", "*fp8e4nv", 128, 4, 64, 1, 4), ("*fp16", "*fp8e4nv", 256, 16, 32, 8, 4),
            ("*fp32", "*fp32", 128, 4, 32, 4, 4), ("*bf16", "*bf16", 256, 8, 32, 11, 4),
            ("*bf16", "*fp8e4nv", 128, 4, 32, 8, 4), ("*bf16", "*fp8e4nv", 128, 8, 32, 2, 4),
            ("*bf16", "*bf16", 128, 4, 32, 1, 4)):
        ptrs = {"q_ptr": q_t, "kc_ptr": cache, "vc_ptr": cache, "bt_ptr": "*i32", "sl_ptr": "*i32",
                "kvs_ptr": "*fp32", "out_ptr": q_t, "ws_o_ptr": "*fp32", "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32"}
        const = dict(D=d, GROUP_PAD=max(16, group), BLOCK_N=bn, MIN_PARTITION=max(128, bn), BLOCK_SIZE=16,
                     NUM_SPLITS=splits, CACHE_FP8=cache == "*fp8e4nv", PV_HILO=q_t != "*fp32",
                     PREC="ieee" if q_t == "*fp32" else "tf32")
        name = f"decode_attention q={q_t[1:]} cache={cache[1:]} d={d} group={group} splits={splits} block_n={bn} "
        yield (name + f"warps={warps}", decode_attention._split_kernel, ptrs, const, warps, True)
        if cache == "*fp8e4nv" and bn == 32 and d == 128:  # the FP8 rule at B=8 / 64, with PDL as in graphs
            yield (name + f"warps={warps} pdl", decode_attention._split_kernel, ptrs, dict(const, PDL=True), warps,
                   True)
        if cache == "*fp8e4nv" and q_t != "*fp32" and d == 128:  # word loads of e4m3 tiles (FP8_WORDS)
            for pdl_on in (False, True):
                yield (name + f"warps={warps} words" + (" pdl" if pdl_on else ""), decode_attention._split_kernel,
                       ptrs, dict(const, FP8_WORDS=True, PDL=pdl_on), warps, True)
        if (q_t, splits) in (("*bf16", 16), ("*bf16", 32), ("*bf16", 1)) and d == 128:  # PDL + K/V prefetch
            yield (name + f"warps={warps} pdl prefetch{bn}", decode_attention._split_kernel, ptrs,
                   dict(const, PDL=True, PF_KEYS=bn), warps, True)
            lines = decode_attention.NEXT_PF_MAX_LINES  # PDL + the next weight's prefetch
            yield (name + f"warps={warps} pdl next{lines}", decode_attention._split_kernel, dict(ptrs, pf_ptr="*u8"),
                   dict(const, PDL=True, PF_NEXT=lines), warps, True)
        if cache == "*fp8e4nv" and q_t == "*bf16":  # the fp16 tile loop of e4m3 caches (FP8_F16)
            for pdl_on in (False, True):
                yield (name + f"warps={warps} f16" + (" pdl" if pdl_on else ""), decode_attention._split_kernel,
                       ptrs, dict(const, F16_MMA=True, PDL=pdl_on), warps, True)
                yield (name + f"warps={warps} words f16" + (" pdl" if pdl_on else ""),
                       decode_attention._split_kernel, ptrs, dict(const, FP8_WORDS=True, F16_MMA=True, PDL=pdl_on),
                       warps, True)
        if splits > 1 and (q_t != "*fp16"):  # the combine in the split kernel's last programs (FUSE_COMBINE)
            for pdl_on in (False, True):
                yield (name + f"warps={warps} fusedcomb" + (" pdl" if pdl_on else ""),
                       decode_attention._split_combine_kernel, dict(ptrs, cnt_ptr="*i32"),
                       dict(const, PDL=pdl_on, SPLITS_PAD=triton.next_power_of_2(splits)), warps, True)
    for q_t, cache, d, group, bn, splits, warps, qk_norm in (
            ("*bf16", "*bf16", 128, 4, 128, 16, 4, False), ("*bf16", "*bf16", 128, 4, 128, 4, 4, False),
            ("*bf16", "*bf16", 128, 8, 128, 1, 8, True), ("*bf16", "*fp8e4nv", 128, 4, 64, 32, 4, False),
            ("*bf16", "*fp8e4nv", 128, 8, 64, 1, 4, True), ("*fp32", "*fp32", 64, 4, 32, 4, 4, True),
            ("*bf16", "*fp8e4nv", 128, 4, 32, 8, 4, False), ("*bf16", "*fp8e4nv", 128, 4, 32, 2, 4, True),
            ("*bf16", "*bf16", 128, 4, 32, 1, 4, False)):
        ptrs = {"q_ptr": q_t, "k_ptr": q_t, "v_ptr": q_t, "pos_ptr": "*i64", "cs_ptr": "*fp32", "qw_ptr": q_t,
                "kw_ptr": q_t, "kc_ptr": cache, "vc_ptr": cache, "bt_ptr": "*i32", "sl_ptr": "*i64",
                "kvs_ptr": "*fp32", "out_ptr": q_t, "ws_o_ptr": "*fp32", "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32"}
        const = dict(D=d, GROUP_PAD=max(16, group), BLOCK_N=bn, MIN_PARTITION=max(128, bn), BLOCK_SIZE=256,
                     NUM_SPLITS=splits, CACHE_FP8=cache == "*fp8e4nv", PV_HILO=q_t != "*fp32",
                     PREC="ieee" if q_t == "*fp32" else "tf32", QK_NORM=qk_norm, GEMMA=False)
        cap = decode_attention.rope_max_registers(decode_attention.DecodeConfig(splits, max(128, bn), bn, warps),
                                                  cache == "*fp8e4nv")
        name = (f"rope_decode_attention q={q_t[1:]} cache={cache[1:]} d={d} group={group} splits={splits} "
                f"block_n={bn} warps={warps} qk_norm={qk_norm}" + (f" maxnreg={cap}" if cap else ""))
        opts = (warps, True, None, ("n_rows",), cap)  # the launcher's register cap (rope_max_registers)
        for pdl_on in (False, True):
            yield (name + (" pdl" if pdl_on else ""), decode_attention._rope_split_kernel, ptrs,
                   dict(const, PDL=pdl_on), *opts)
            if splits > 1:
                yield (name + " fusedcomb" + (" pdl" if pdl_on else ""), decode_attention._rope_split_combine_kernel,
                       dict(ptrs, cnt_ptr="*i32"), dict(const, PDL=pdl_on, SPLITS_PAD=triton.next_power_of_2(splits)),
                       *opts)
        if q_t == "*bf16":  # PDL + the K / V prefetch before the wait (decode_attention.PREFETCH)
            yield (name + f" pdl prefetch{bn}", decode_attention._rope_split_kernel, ptrs,
                   dict(const, PDL=True, PF_KEYS=bn), *opts)
        if q_t == "*bf16" and splits in (16, 32, 1):  # PDL + the next weight's prefetch (KVCacheConfig.prefetch_o_proj)
            lines = decode_attention.NEXT_PF_MAX_LINES
            yield (name + f" pdl next{lines}", decode_attention._rope_split_kernel, dict(ptrs, pf_ptr="*u8"),
                   dict(const, PDL=True, PF_NEXT=lines), *opts)
        if cache == "*bf16":  # the reads before the PDL wait (HOIST_LOADS; 16-bit caches)
            for level in (1, 2):
                yield (name + f" pdl hoist{level}", decode_attention._rope_split_hoist_kernel, ptrs,
                       dict(const, PDL=True, HOIST=level), *opts)
        if q_t == "*bf16" and cache == "*fp8e4nv":  # the fp16 tile loop (FP8_F16)
            for pdl_on in (False, True):
                yield (name + " f16" + (" pdl" if pdl_on else ""), decode_attention._rope_split_kernel, ptrs,
                       dict(const, F16_MMA=True, PDL=pdl_on), *opts)
    for d, bn, splits in ((128, 64, 32), (128, 128, 16), (64, 128, 11), (128, 32, 8), (128, 32, 2)):
        yield (f"decode_attention combine d={d} splits={splits} block_n={bn}", decode_attention._combine_kernel,
               {"ws_o_ptr": "*fp32", "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32", "sl_ptr": "*i32", "out_ptr": "*bf16"},
               dict(D=d, BLOCK_N=bn, MIN_PARTITION=128, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
                    CHUNK=min(16, triton.next_power_of_2(splits))), 4, True)
        yield (f"decode_attention combine d={d} splits={splits} block_n={bn} pdl hoist",
               decode_attention._combine_kernel,
               {"ws_o_ptr": "*fp32", "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32", "sl_ptr": "*i32", "out_ptr": "*bf16"},
               dict(D=d, BLOCK_N=bn, MIN_PARTITION=128, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
                    CHUNK=min(16, triton.next_power_of_2(splits)), PDL=True, HOIST=True), 4, True)


def small_m_gemm_cases():
    """The small-M GEMM (kernels/small_m_gemm.py) in the variants the launcher builds: bf16 / fp16 / e4m3-weight /
    e4m3 x e4m3 (row-wise and per-tensor scales), bias, fused SiLU*mul (bf16 out, static-FP8 out), with and
    without split-K partials (and their reduce kernel), BLOCK_M 16 / 32 / 64, wgmma-sized (BLOCK_N 64 / 128) and
    mma.sync-sized (BLOCK_N 32) tiles, a masked K tail; pointers as the launcher passes them (absent scales / bias
    / partials: the output tensor as a dummy), ints hinted as a real launch specializes them."""
    nospec = ("M", "n_kb", "split_k")
    fp8, fp32 = "*fp8e4nv", "*fp32"
    for name, x_t, w_t, xs, ws, bias, silu, out_fp8, part, bm, bn, bk, warps, stages, even in (
            ("bf16", "*bf16", "*bf16", 0, 0, False, False, False, False, 16, 64, 128, 4, 4, True),
            ("bf16 bias split", "*bf16", "*bf16", 0, 0, True, False, False, True, 64, 128, 128, 4, 3, True),
            ("fp16 bn32 k-tail", "*fp16", "*fp16", 0, 0, False, False, False, False, 32, 32, 64, 4, 4, False),
            ("fp8 row", fp8, fp8, 2, 2, False, False, False, False, 16, 64, 256, 4, 4, True),
            ("fp8 row split", fp8, fp8, 2, 2, True, False, False, True, 64, 64, 256, 4, 4, True),
            ("fp8 tensor", fp8, fp8, 1, 1, False, False, False, False, 32, 128, 256, 8, 3, True),
            ("w8 bf16", "*bf16", fp8, 0, 2, False, False, False, False, 16, 64, 256, 4, 4, True),
            ("bf16 silu", "*bf16", "*bf16", 0, 0, False, True, False, False, 16, 64, 128, 4, 3, True),
            ("fp8 tensor silu q8 split", fp8, fp8, 1, 1, False, True, True, True, 16, 64, 256, 4, 3, True)):
        out_t = fp8 if out_fp8 else ("*fp16" if x_t == "*fp16" else "*bf16")
        ptrs = {"x_ptr": x_t, "w_ptr": w_t, "xs_ptr": fp32 if xs else out_t, "ws_ptr": fp32 if ws else out_t,
                "b_ptr": "*bf16" if bias else out_t, "out_ptr": out_t, "os_ptr": fp32 if out_fp8 else out_t,
                "part_ptr": fp32 if part else out_t}
        epi = dict(X_SCALE=xs, W_SCALE=ws, HAS_BIAS=bias, SILU_MUL=silu, OUT_FP8=out_fp8)
        yield (f"small_m_gemm {name} m{bm} n{bn} k{bk}", small_m_gemm._small_m_gemm_kernel, ptrs,
               dict(X_FP8=x_t == fp8, W_FP8=w_t == fp8, **epi, PARTIAL=part, EVEN_K=even, BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=bk), warps, True, stages, nospec)
        if part:
            yield (f"small_m_gemm reduce {name} m{bm}", small_m_gemm._split_k_reduce_kernel, ptrs,
                   dict(**epi, BLOCK_M=bm, BLOCK_N=small_m_gemm.REDUCE_BLOCK_N), 4, True, 1, nospec)
            yield (f"small_m_gemm {name} m{bm} n{bn} k{bk} serial", small_m_gemm._small_m_gemm_serial_kernel,
                   dict(ptrs, cnt_ptr="*i32"), dict(X_FP8=x_t == fp8, W_FP8=w_t == fp8, **epi, EVEN_K=even,
                                                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), warps, True, stages, nospec)
        if name in ("bf16", "fp8 tensor silu q8 split"):  # PDL with the weight prefetch before the wait
            lines = 16  # prefetch_lines() of the 8B qkv at small_m_gemm.PREFETCH_BYTES_TRIED (16 MiB)
            yield (f"small_m_gemm {name} m{bm} n{bn} k{bk} pdl prefetch{lines}", small_m_gemm._small_m_gemm_kernel,
                   ptrs, dict(X_FP8=x_t == fp8, W_FP8=w_t == fp8, **epi, PARTIAL=part, EVEN_K=even, BLOCK_M=bm,
                              BLOCK_N=bn, BLOCK_K=bk, PDL=True, PF_LINES=lines), warps, True, stages, nospec)
        if name == "bf16":  # PREFETCH_MAX_M's rule: 1-4 lines a row (the 8B's / 70B TP 8 rank's GEMMs at batch 1)
            for lines in (1, 2, 4):
                yield (f"small_m_gemm {name} m{bm} n{bn} k{bk} pdl prefetch{lines}", small_m_gemm._small_m_gemm_kernel,
                       ptrs, dict(X_FP8=False, W_FP8=False, **epi, PARTIAL=part, EVEN_K=even, BLOCK_M=bm, BLOCK_N=bn,
                                  BLOCK_K=bk, PDL=True, PF_LINES=lines), warps, True, stages, nospec)


def small_m_gemm_norm_cases():
    """The small-M GEMM with the RMSNorm folded in (``_small_m_gemm_norm_kernel``, the model's bf16 decode layers):
    NORM_IN (qkv; gate-up + SiLU*mul) and ADD_RES (o / down: one program per tile, and split-K with the reduce
    kernel's epilogue), BLOCK_M 16 and 64, pointers as the launcher passes them."""
    nospec = ("M", "n_kb", "split_k", "n_sq")
    bf, fp32 = "*bf16", "*fp32"
    for name, norm_in, add_res, silu, part, bias, bm, bn, bk, stages in (
            ("norm_in", True, False, False, False, True, 16, 32, 256, 4),
            ("norm_in silu", True, False, True, False, False, 16, 64, 128, 3),
            ("norm_in split", True, False, False, True, False, 64, 64, 128, 4),
            ("add_res", False, True, False, False, False, 16, 32, 256, 4),
            ("add_res wide", False, True, False, False, False, 64, 64, 256, 3),
            ("add_res split", False, True, False, True, False, 16, 64, 128, 4)):
        ptrs = {"x_ptr": bf, "w_ptr": bf, "xs_ptr": bf, "ws_ptr": bf, "b_ptr": bf, "out_ptr": bf, "os_ptr": bf,
                "part_ptr": fp32 if part else bf, "nw_ptr": bf, "sq_ptr": fp32 if norm_in else bf,
                "res_ptr": bf, "sqo_ptr": fp32 if add_res else bf, "xo_ptr": bf}
        epi = dict(X_SCALE=0, W_SCALE=0, HAS_BIAS=bias, SILU_MUL=silu, OUT_FP8=False)
        yield (f"small_m_gemm_norm {name} m{bm} n{bn} k{bk}", small_m_gemm._small_m_gemm_norm_kernel, ptrs,
               dict(X_FP8=False, W_FP8=False, **epi, PARTIAL=part, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    PF_LINES=0, NORM_IN=norm_in, ADD_RES=add_res and not part, SQ_BLOCK=128 if norm_in else 1,
                    AMAX_OUT=False),
               4, True, stages, nospec)
        if part and add_res:
            yield (f"small_m_gemm reduce_add m{bm}", small_m_gemm._split_k_reduce_add_kernel, ptrs,
                   dict(**epi, BLOCK_M=bm, BLOCK_N=small_m_gemm.REDUCE_BLOCK_N), 4, True, 1, nospec)
    yield from small_m_gemm_w8_norm_cases()
    yield from small_m_gemm_fma_cases()
    yield from small_m_gemm_amax_cases()


def small_m_gemm_tma_cases():
    """The weight tiles through a TMA descriptor (``W_DESC``; ``GemmConfig.tma``): bf16 and per-channel FP8 x FP8
    (split-K serial), SiLU*mul with a static-FP8 output, a folded NORM_IN launch; BLOCK_M 16 / 64."""
    nospec = ("M", "n_kb", "split_k", "n_sq")
    bf, fp8, fp32 = "*bf16", "*fp8e4nv", "*fp32"
    for name, x_t, scale, silu, out_fp8, part, norm_in, bm, bn, bk, stages in (
            ("bf16", bf, 0, False, False, False, False, 16, 64, 128, 4),
            ("bf16", bf, 0, False, False, False, False, 64, 64, 128, 4),
            ("fp8 row split", fp8, 2, False, False, True, False, 16, 64, 256, 4),
            ("fp8 tensor silu q8", fp8, 1, True, True, False, False, 16, 64, 256, 3),
            ("bf16 norm_in silu", bf, 0, True, False, False, True, 16, 64, 128, 3)):
        w_el = "bf16" if x_t == bf else "fp8e4nv"
        out_t = fp8 if out_fp8 else bf
        ptrs = {"x_ptr": x_t, "w_ptr": f"tensordesc<{w_el}[{bn},{bk}]>", "xs_ptr": fp32 if scale else out_t,
                "ws_ptr": fp32 if scale else out_t, "b_ptr": out_t, "out_ptr": out_t,
                "os_ptr": fp32 if out_fp8 else out_t,
                "part_ptr": fp32 if part else out_t, "nw_ptr": bf, "sq_ptr": fp32 if norm_in else bf, "res_ptr": bf,
                "sqo_ptr": bf, "xo_ptr": bf}
        const = dict(X_FP8=x_t == fp8, W_FP8=x_t == fp8, X_SCALE=scale, W_SCALE=scale, HAS_BIAS=False, SILU_MUL=silu,
                     OUT_FP8=out_fp8, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        label = f"small_m_gemm tma {name} m{bm} n{bn} k{bk}"
        if norm_in:
            yield (label, small_m_gemm._small_m_gemm_norm_kernel, ptrs,
                   dict(const, PARTIAL=False, PDL=False, PF_LINES=0, NORM_IN=True, ADD_RES=False, SQ_BLOCK=128,
                        AMAX_OUT=False, FMA=False, W_DESC=True), 4, True, stages, nospec)
        elif part:
            yield (label + " serial", small_m_gemm._small_m_gemm_serial_kernel, dict(ptrs, cnt_ptr="*i32"),
                   dict(const, W_DESC=True), 4, True, stages, nospec)
        else:
            yield (label, small_m_gemm._small_m_gemm_kernel, ptrs, dict(const, PARTIAL=False, W_DESC=True), 4, True,
                   stages, nospec)


def small_m_gemm_fma_cases():
    """The weight-only GEMM's CUDA-core main loop (``FMA``; ``small_m_gemm.FMA_MAX_M``): e4m3 weights with
    per-channel scales, bf16 x, ``fma_config``'s 16 x (512 / BLOCK_M) tiles (32 rows with ADD_RES) at 4 warps, one
    stage: plain (split-K partials with their reduce kernel or serial at BLOCK_M 1, SiLU*mul, BLOCK_M 4) and folded
    (NORM_IN, ADD_RES), with and without PDL + the batch-1 weight prefetch."""
    nospec = ("M", "n_kb", "split_k", "n_sq")
    bf, fp8, fp32 = "*bf16", "*fp8e4nv", "*fp32"
    for name, norm_in, add_res, silu, part, bm, pf in (
            ("", False, False, False, True, 1, 0), (" silu", False, False, True, False, 1, 1),
            (" m4", False, False, False, False, 4, 0), (" norm_in silu", True, False, True, False, 1, 1),
            (" add_res", False, True, False, False, 1, 2)):
        ptrs = {"x_ptr": bf, "w_ptr": fp8, "xs_ptr": bf, "ws_ptr": fp32, "b_ptr": bf, "out_ptr": bf, "os_ptr": bf,
                "part_ptr": fp32 if part else bf, "nw_ptr": bf, "sq_ptr": fp32 if norm_in else bf,
                "res_ptr": bf, "sqo_ptr": fp32 if add_res else bf, "xo_ptr": bf}
        epi = dict(X_SCALE=0, W_SCALE=2, HAS_BIAS=False, SILU_MUL=silu, OUT_FP8=False)
        bn, bk = (32 if add_res else 16), 512 // bm  # fma_config's (ADD_RES launches: 32 rows)
        const = dict(X_FP8=False, W_FP8=True, **epi, PARTIAL=part, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     PDL=pf > 0, PF_LINES=pf)
        label = f"small_m_gemm fma w8{name} m{bm} n{bn} k{bk}{' pdl prefetch%d' % pf if pf else ''}"
        if norm_in or add_res:
            yield (label, small_m_gemm._small_m_gemm_norm_kernel, ptrs,
                   dict(const, NORM_IN=norm_in, ADD_RES=add_res, SQ_BLOCK=128 if norm_in else 1, AMAX_OUT=False,
                        FMA=True), 4, True, 1, nospec)
        else:
            yield label, small_m_gemm._small_m_gemm_kernel, ptrs, dict(const, FMA=True), 4, True, 1, nospec
        if part:
            yield (f"small_m_gemm reduce w8 m{bm}", small_m_gemm._split_k_reduce_kernel, ptrs,
                   dict(**epi, BLOCK_M=bm, BLOCK_N=small_m_gemm.REDUCE_BLOCK_N), 4, True, 1, nospec)
            serial = {k: v for k, v in const.items() if k != "PARTIAL"}
            yield (label + " serial", small_m_gemm._small_m_gemm_serial_kernel, dict(ptrs, cnt_ptr="*i32"),
                   dict(serial, FMA=True), 4, True, 1, nospec)


def small_m_gemm_w8_norm_cases():
    """The folded RMSNorm with e4m3 weights and per-channel scales (the FP8 layers' weight-only steps, bf16 x):
    NORM_IN (qkv, gate-up + SiLU*mul), ADD_RES (o / down; split-K with its reduce kernel), with and without PDL."""
    nospec = ("M", "n_kb", "split_k", "n_sq")
    bf, fp8, fp32 = "*bf16", "*fp8e4nv", "*fp32"
    for name, norm_in, add_res, silu, part, bm, bn, bk, stages, pdl_on in (
            ("norm_in", True, False, False, False, 16, 64, 256, 4, False),
            ("norm_in silu", True, False, True, False, 16, 64, 256, 4, True),
            ("add_res", False, True, False, False, 16, 64, 256, 4, True),
            ("add_res split", False, True, False, True, 16, 64, 256, 4, False)):
        ptrs = {"x_ptr": bf, "w_ptr": fp8, "xs_ptr": bf, "ws_ptr": fp32, "b_ptr": bf, "out_ptr": bf, "os_ptr": bf,
                "part_ptr": fp32 if part else bf, "nw_ptr": bf, "sq_ptr": fp32 if norm_in else bf,
                "res_ptr": bf, "sqo_ptr": fp32 if add_res else bf, "xo_ptr": bf}
        epi = dict(X_SCALE=0, W_SCALE=2, HAS_BIAS=False, SILU_MUL=silu, OUT_FP8=False)
        yield (f"small_m_gemm_norm w8 {name} m{bm} n{bn} k{bk}{' pdl' if pdl_on else ''}",
               small_m_gemm._small_m_gemm_norm_kernel, ptrs,
               dict(X_FP8=False, W_FP8=True, **epi, PARTIAL=part, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    PDL=pdl_on, PF_LINES=0, NORM_IN=norm_in, ADD_RES=add_res and not part,
                    SQ_BLOCK=128 if norm_in else 1, AMAX_OUT=False),
               4, True, stages, nospec)
        if part and add_res:
            yield (f"small_m_gemm reduce_add w8 m{bm}", small_m_gemm._split_k_reduce_add_kernel, ptrs,
                   dict(**epi, BLOCK_M=bm, BLOCK_N=small_m_gemm.REDUCE_BLOCK_N), 4, True, 1, nospec)


def small_m_gemm_amax_cases():
    """The FP8 layers' per-token quantization from partial maxima: the gate-up GEMM with AMAX_OUT (e4m3 x and
    weight, SiLU*mul, bf16 h and its partial maxima; the 8B's proxy config 64 x 128 / 6 stages at M 1) and the
    quantizer that takes them (``_quantize_amax_kernel``: 448 partials, 1024-wide tiles), without and with PDL."""
    from tpfuse.kernels import quantize

    nospec = ("M", "n_kb", "split_k", "n_sq")
    bf, fp8, fp32 = "*bf16", "*fp8e4nv", "*fp32"
    ptrs = {"x_ptr": fp8, "w_ptr": fp8, "xs_ptr": fp32, "ws_ptr": fp32, "b_ptr": bf, "out_ptr": bf, "os_ptr": bf,
            "part_ptr": bf, "nw_ptr": bf, "sq_ptr": bf, "res_ptr": bf, "sqo_ptr": fp32, "xo_ptr": bf}
    const = dict(X_FP8=True, W_FP8=True, X_SCALE=2, W_SCALE=2, HAS_BIAS=False, SILU_MUL=True, OUT_FP8=False,
                 PARTIAL=False, EVEN_K=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, PF_LINES=0, NORM_IN=False,
                 ADD_RES=False, SQ_BLOCK=1, AMAX_OUT=True)
    qptrs = {"x_ptr": bf, "amax_ptr": fp32, "out_ptr": fp8, "scale_ptr": fp32}
    for pdl_on in (False, True):  # the model launches it inside pdl.launches()
        yield (f"small_m_gemm_norm amax_out silu m16 n64 k128{' pdl' if pdl_on else ''}",
               small_m_gemm._small_m_gemm_norm_kernel, ptrs, dict(const, PDL=pdl_on), 4, True, 6, nospec)
    yield ("quantize_from_amax p512", quantize._quantize_amax_kernel, qptrs,  # its PDL variant: cases()
           dict(BLOCK=quantize.AMAX_BLOCK, P_BLOCK=512), 4, True, None, ("n_rows", "n_parts"))


_DEBUG_LABEL = re.compile(r"^\$L__tmp\d+:$")


def ptx_hash(kernel) -> str:
    """sha256 (16 hex digits) of a compiled kernel's PTX instructions: without the debug information, which names
    source files and lines (``.file`` / ``.loc`` directives, the ``$L__tmp`` labels that only delimit inlined
    scopes for it, the DWARF sections). Two trees compare equal exactly when they generate the same instructions,
    whatever moved in the source (a helper extracted or moved to another file, a docstring grown)."""
    import hashlib

    ptx = kernel.asm["ptx"]
    cut = ptx.find("\t.section\t.debug")
    body = "\n".join(line for line in (ptx if cut < 0 else ptx[:cut]).splitlines()
                     if not line.lstrip().startswith((".file", ".loc")) and not _DEBUG_LABEL.match(line.strip()))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


PENDING = os.path.join(os.path.dirname(FINGERPRINTS), "sm90_ptx_pending.txt")
PENDING_NOTE = ("# sm_90 PTX fingerprints of kernels that compile but have NOT run on a GPU yet (new kernels; written "
                "by\n# python tests/sm90_compile_cases.py --write-pending: every case without a line in "
                "sm90_ptx_fingerprints.txt).\n# tests/test_sm90_compile.py checks them like the others; once the "
                "kernels' GPU tests passed, move\n# them with --write-fingerprints --promote-pending.\n")


def write_fingerprints(prints: dict, path: str = FINGERPRINTS) -> None:
    with open(path, "w") as f:
        f.write(f"# triton {triton.__version__}\n"
                "# sm_90 PTX fingerprints (instructions only: tests/sm90_compile_cases.py ptx_hash) of every compile "
                "case,\n# the PTX that ran on GPUs. tests/test_sm90_compile.py fails when one changes. Regenerate: "
                f"{REGENERATE}.\n")
        for name, fp in prints.items():
            f.write(f"{fp}  {name}\n")


def recorded_names(path: str = FINGERPRINTS) -> set:
    """Case names with a line in ``path``."""
    if not os.path.exists(path):
        return set()
    return {ln.rstrip("\n").split("  ", 1)[1] for ln in open(path) if ln.strip() and not ln.startswith("#")}


def write_pending(prints: dict) -> None:
    """:data:`PENDING` <- the cases of ``prints`` not recorded in :data:`FINGERPRINTS` (not yet run on a GPU)."""
    done = recorded_names()
    with open(PENDING, "w") as f:
        f.write(f"# triton {triton.__version__}\n" + PENDING_NOTE)
        for name, fp in prints.items():
            if name not in done:
                f.write(f"{fp}  {name}\n")


def byte_smem_loads(ptx: str) -> int:
    """Byte-wide shared-memory loads in ``ptx`` (``ld.shared.{u,s,b}8``): one per element where Triton moves an
    e4m3 tile into a transposed MMA operand layout (decode attention's ``FP8_WORDS`` avoids them)."""
    return len(re.findall(r"^\s*(?:@!?%p\d+\s+)?ld\.shared(?:\.v[248])?\.[usb]8\b", ptx, re.M))


def main() -> int:
    """``--ptx-hashes``: print each case's :func:`ptx_hash` too (diff two trees' outputs to compare PTX);
    ``--write-fingerprints``: record them in :data:`FINGERPRINTS` (after a GPU run of the changed kernels' tests),
    except the cases :data:`PENDING` holds, which stay there (refreshed) unless ``--promote-pending`` is given too
    (after a GPU run of *their* tests); ``--write-pending``: record the cases :data:`FINGERPRINTS` lacks in
    :data:`PENDING` (compiled, not yet run)."""
    write = "--write-fingerprints" in sys.argv[1:]
    promote = "--promote-pending" in sys.argv[1:]
    pending = "--write-pending" in sys.argv[1:]
    hashes = write or pending or "--ptx-hashes" in sys.argv[1:]
    failed, prints = 0, {}
    for name, fn, ptrs, const, *nw in cases():
        try:
            k = compile_kernel(fn, ptrs, const, *nw)
            if hashes:
                prints[name] = ptx_hash(k)
            print(f"ok   {name}" + (f"  ptx {prints[name]}" if hashes else ""), flush=True)
            if const.get("PDL"):
                # the lengths are read before the wait by the hoisting kernels and the folded o_proj (attn_o_gemm)
                may_load = const.get("PF_KEYS", 0) > 0 or bool(const.get("HOIST")) or fn is attn_o_gemm._attn_o_gemm_kernel
                problem = pdl_order_problem(k.asm["ptx"], may_load=may_load)
                print(f"pdl-order {'BAD ' + problem if problem else 'ok'}  {name}", flush=True)
            if " fusedcomb" in name or name.endswith(" serial"):
                problem = ticket_order_problem(k.asm["ptx"])
                print(f"ticket-order {'BAD ' + problem if problem else 'ok'}  {name}", flush=True)
            if name.startswith("decode_attention q=") and const.get("CACHE_FP8"):  # e4m3 cache
                print(f"byte-smem-loads {byte_smem_loads(k.asm['ptx'])}  {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every failing case
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()[-3000:]}", flush=True)
    print(f"{failed} failed" if failed else "all kernels compile for sm_90")
    if write and not failed:
        held = set() if promote else recorded_names(PENDING)
        write_fingerprints({n: fp for n, fp in prints.items() if n not in held})
        write_pending(prints)  # what FINGERPRINTS now lacks
        print(f"wrote {FINGERPRINTS} and {PENDING}")
    elif pending and not failed:
        write_pending(prints)
        print(f"wrote {PENDING}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
