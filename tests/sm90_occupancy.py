"""Programs an SM of the decode-attention launches the model's decode step makes, from ptxas's register and the
compiler's shared-memory counts (sm_90a, offline: Triton's bundled ptxas on the CPU). Run by
tests/test_decode_attention_occupancy.py in a clean process (the interpreter off); prints one JSON line per config:

    {"batch": 64, "fp8": false, "qk_norm": false, "config": [...], "split": [regs, spill_bytes, smem, programs],
     "rope": [...], "rope_prefetch": [...], "rope_cap": 128 | null}

``split`` is the plain split kernel (:func:`_split_kernel`), ``rope`` the rope-split kernel with the launcher's
register cap (:func:`tpfuse.kernels.decode_attention.rope_max_registers`), ``rope_prefetch`` the same with its K / V
prefetch before the PDL wait (``decode_attention.PREFETCH``). The configs are
:func:`~tpfuse.kernels.decode_attention.pick_config`'s for the 8B's heads (Hq 32, Hkv 8, D 128, bf16 q) on a
132-SM H100 / H200 at decode batches 1 / 8 / 64, bf16 and FP8 caches.
"""

import json
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

import sm90_compile_cases as cases  # noqa: E402
from tpfuse.kernels import decode_attention as da  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
REGS_PER_SM = 65536
SMEM_PER_SM = 233472  # sm_90: 228 KB an SM, of which 1 KB is reserved per resident block
WARPS_PER_SM = 64
SMS = 132


def usage(fn, ptrs, const, warps, stages, maxnreg, tmp):
    """``(registers a thread, spill store bytes, shared bytes, programs an SM)`` of one build."""
    k = cases.compile_kernel(fn, ptrs, const, warps, True, stages, ("n_rows",), maxnreg)
    ptx = os.path.join(tmp, "k.ptx")
    with open(ptx, "w") as f:
        f.write(k.asm["ptx"])
    err = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                         capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", err).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", err).group(1))
    smem = int(k.metadata.shared)
    alloc = -(-regs // 8) * 8  # registers are allocated per warp in units of 256 (8 a thread)
    programs = min(REGS_PER_SM // (alloc * 32 * warps), SMEM_PER_SM // (smem + 1024), WARPS_PER_SM // warps, 32)
    return [regs, spill, smem, programs]


def configs():
    for batch in (1, 8, 64):
        for fp8 in (False, True):
            for qk_norm in (False, True):
                yield batch, fp8, qk_norm, da.pick_config(batch, 8, 128, 2, cache_fp8=fp8, sm_count=SMS)


def main(tmp):
    for batch, fp8, qk_norm, cfg in configs():
        cache = "*fp8e4nv" if fp8 else "*bf16"
        ptrs = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "cs_ptr": "*fp32",
                "qw_ptr": "*bf16", "kw_ptr": "*bf16", "kc_ptr": cache, "vc_ptr": cache, "bt_ptr": "*i32",
                "sl_ptr": "*i64", "kvs_ptr": "*fp32", "out_ptr": "*bf16", "ws_o_ptr": "*fp32", "ws_m_ptr": "*fp32",
                "ws_l_ptr": "*fp32"}
        const = dict(D=128, GROUP_PAD=16, BLOCK_N=cfg.block_n, MIN_PARTITION=cfg.min_partition, BLOCK_SIZE=256,
                     NUM_SPLITS=cfg.num_splits, CACHE_FP8=fp8, PV_HILO=True, PREC="tf32", PDL=True)
        split_ptrs = {a: t for a, t in ptrs.items() if a in da._split_kernel.arg_names}
        cap = da.rope_max_registers(cfg, fp8)
        row = dict(batch=batch, fp8=fp8, qk_norm=qk_norm, config=list(cfg), rope_cap=cap,
                   split=usage(da._split_kernel, split_ptrs, const, cfg.num_warps, cfg.num_stages, None, tmp),
                   rope=usage(da._rope_split_kernel, ptrs, dict(const, QK_NORM=qk_norm, GEMMA=False),
                              cfg.num_warps, cfg.num_stages, cap, tmp),
                   rope_prefetch=usage(da._rope_split_kernel, ptrs,
                                       dict(const, QK_NORM=qk_norm, GEMMA=False, PF_KEYS=cfg.block_n),
                                       cfg.num_warps, cfg.num_stages, cap, tmp))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
