"""Plot an FP8-cache sweep of ``bench_decode_attention.py --sweep-cache fp8_both`` as the rule decision reads it:
per (shape, context) and batch, the time of the FP8 cache over the bf16 cache's (``tpfuse``) for the e4m3 and
word tile loads at the launcher's configs (``tpfuse_fp8`` / ``tpfuse_fp8_words``: the rule of the commit that ran),
at the configs :func:`tpfuse.kernels.decode_attention.pick_config` picks now, and the best swept config.

    python bench/tools/plot_fp8_rule.py bench/results/decode_attention_h100_fp8words_28139fe.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from common import plot_ratio_panels  # noqa: E402


def rule_rows(doc):
    """Rows of ``doc`` plus synthetic ones: ``rule now (e4m3)`` / ``rule now (words)`` (the swept config equal to
    today's pick_config, where it was swept) and ``best swept (e4m3)`` / ``best swept (words)``."""
    from tpfuse.kernels.decode_attention import pick_config

    commit = doc["header"]["commit"]
    names = {"tpfuse": "tpfuse", "tpfuse_fp8": f"rule at {commit} (e4m3)", "tpfuse_fp8_words": f"rule at {commit} (words)"}
    rows = [dict(r, provider=names[r["provider"]]) for r in doc["rows"] if r["provider"] in names]
    keys = {(r["shape"], r["ctx"], r["batch"]) for r in rows}
    for shape, ctx, batch in sorted(keys):
        sel = [r for r in doc["rows"] if (r["shape"], r["ctx"], r["batch"]) == (shape, ctx, batch)]
        hkv = int(shape.split("/")[1][3:])
        cfg = pick_config(batch, hkv, 128, 2, cache_fp8=True, sm_count=132)
        for load, prefix in (("e4m3", "tpfuse_fp8["), ("words", "tpfuse_fp8_words[")):
            swept = [r for r in sel if r["provider"].startswith(prefix)]
            if not swept:
                continue
            name = f"{prefix}s={cfg.num_splits},bn={cfg.block_n},nw={cfg.num_warps}]"
            base = dict(shape=shape, ctx=ctx, batch=batch)
            rows += [dict(base, provider=f"rule now ({load})", median_us=r["median_us"])
                     for r in swept if r["provider"] == name]
            rows.append(dict(base, provider=f"best swept ({load})", median_us=min(r["median_us"] for r in swept)))
    return [r for r in rows if r["batch"] in {k[2] for k in keys if any(
        x["provider"].startswith("tpfuse_fp8[") and (x["shape"], x["ctx"], x["batch"]) == k for x in doc["rows"])}]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--out", help="PNG path (default: the JSON's, _rule.png)")
    args = ap.parse_args(argv)
    doc = json.load(open(args.json))
    h = doc["header"]
    out = args.out or args.json[:-len(".json")] + "_rule.png"
    png = plot_ratio_panels(out, rule_rows(doc), panel=("shape", "ctx"), x="batch", y="median_us",
                            baseline="tpfuse", ylabel="time / bf16 cache's time (lower is better)",
                            title=f"FP8-cache decode attention: {h['device']}, commit {h['commit']}",
                            xlabel="batch", refs=(1.0, 0.5))
    print("wrote", png or "no plot (matplotlib missing)")


if __name__ == "__main__":
    main()
