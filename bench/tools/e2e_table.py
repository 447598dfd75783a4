"""The README's model table from ``bench_e2e.py`` JSON files: per model and decode batch, tpfuse's ms per step,
the memory floor, their ratio, HF compiled and tpfuse / HF compiled where the run has it, FP8 / bf16 where it has
FP8 rows; a caption line per file (device, commit, TP, context, copy bandwidth); then, where the run has
``tpfuse_capacity`` rows, a table of the step time per KV-cache capacity with its spread at each batch; where it
has variant rows (``<provider>_ropesep`` / ``_fusedcomb`` / ``_smallm`` / ``_nopdl`` / ``_prefetch`` / ``_smallall`` / ...:
``--rope-ab``, ``--small-m-table``, ``--pdl-ab``, ``--small-m-everywhere``; :data:`VARIANTS`), each
variant's step over the step without it.

    python bench/tools/e2e_table.py bench/results/e2e_tp1_h100_full.json [more.json ...] [--out table.md]

Columns absent from every row of a file are left out; a missing cell is ``—``. Times are ms per decode step (the
JSON's ``us`` / 1000, host wall time per step; 3 decimals below 1 ms, else 2), ratios plain numbers; shard rows
(``70B/tp8 shard``) are models of their own. Capacity points the run skipped are listed under the tables.
"""

from __future__ import annotations

import argparse
import json
import sys

RATIOS = (("tpfuse_fp8", "FP8 / bf16"), ("tpfuse_fp8_static", "FP8 static / bf16"),
          ("tpfuse_kv8", "FP8 cache / bf16"), ("tpfuse_fp8_kv8", "FP8 + FP8 cache / bf16"))
"""FP8 providers (weights; ``_kv8``: an e4m3 KV cache, ``bench_e2e.py --kv-fp8``) and their column heads (their
step over tpfuse's with the bf16 cache)."""


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def _ms(us) -> str:
    if not _ok(us):
        return "—"
    return f"{us / 1000:.3f}" if us < 1000 else f"{us / 1000:.2f}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if _ok(a) and _ok(b) and b else "—"


VARIANTS = (("_fusedrope", "RoPE in the attention"), ("_ropesep", "RoPE kernel apart"),
            ("_fusedcomb", "combine in the split kernel"), ("_combkern", "combine kernel apart"),
            ("_foldnorm", "RMSNorm in the GEMMs"), ("_normkern", "RMSNorm kernel apart"),
            ("_opf", "o_proj weight prefetched in attention"), ("_noopf", "no o_proj prefetch"),
            ("_tile32", "32-key attention tiles at one split"),
            ("_tile128", "128-key attention tiles at every one-split launch"),
            ("_split4x64", "attention splits at SPLIT_WAVES 4, 64-key tiles"),
            ("_gpf1m", "GEMM L2 prefetch 1 MiB"), ("_gpf4m", "GEMM L2 prefetch 4 MiB"),
            ("_hoist0", "no rope-split read before the PDL wait (HOIST_LOADS 0)"),
            ("_hoist1", "rope-split reads before the PDL wait (HOIST_LOADS 1)"),
            ("_hoist2", "and its first K / V tile (HOIST_LOADS 2)"),
            ("_earlypf", "PDL trigger after the wait + L2 prefetches"), ("_early", "PDL trigger after the wait"),
            ("_w8", "FP8 weight-only (bf16 activations)"), ("_actq", "FP8 activations quantized"),
            ("_headrep", "whole lm_head (replicated) in the shard"),
            ("_fma", "weight-only GEMMs on the CUDA cores (FMA_MAX_M 4)"),
            ("_carve100", "every kernel at the largest shared-memory carveout"),
            ("_noamax", "SiLU*mul + quantize kernel apart"), ("_amaxall", "gate-up partial maxima + quantize_from_amax"),
            ("_smallm", "small-M table"), ("_smallm_notma", "small-M table, its TMA tiles on pointer loads"),
            ("_nopdl", "no PDL"),
            ("_prefetch", "PDL + L2 prefetch"),
            ("_smallall", "kernel everywhere"), ("_smallall_nopdl", "kernel everywhere, no PDL"),
            # the variants of runs before PDL was the default (their base rows ran without it)
            ("_pdl", "PDL"), ("_smallm_pdl", "small-M table + PDL"), ("_smallall_pdl", "kernel everywhere + PDL"),
            ("_smallall_pdl_nopf", "kernel everywhere + PDL, no L2 prefetch"))
"""Suffixes of the decode-row variants (``--rope-ab``, ``--combine-ab``, ``--fold-ab``, ``--small-m-table``, ``--pdl-ab``, ``--small-m-everywhere``;
the last four: ``--pdl`` of earlier runs) and their column heads."""
HEADS = {"tpfuse": "bf16", "tpfuse_fp8": "FP8", "tpfuse_fp8_static": "FP8 static"}
"""Providers the variants repeat and how the variant table names them."""


def _variant(provider) -> tuple:
    """``(base provider, suffix)`` of a variant row's provider; ``(provider, "")`` for any other row."""
    for suffix, _ in sorted(VARIANTS, key=lambda v: -len(v[0])):
        if str(provider).endswith(suffix) and str(provider)[: -len(suffix)] in HEADS:
            return str(provider)[: -len(suffix)], suffix
    return provider, ""


def _decode_cells(rows) -> tuple:
    """``({(model, batch): {provider: us}}, {model: layers})`` of the decode rows (capacity and small-M table rows
    apart), in the rows' order."""
    cells, layers = {}, {}
    for r in rows:
        if r.get("mode") == "decode" and r.get("provider") != "tpfuse_capacity" and not _variant(r["provider"])[1]:
            cells.setdefault((r["model"], r["tokens"]), {})[r["provider"]] = r.get("us")
            layers.setdefault(r["model"], r.get("layers"))
    return cells, layers


def caption(header: dict, path: str) -> str:
    bits = [f"device: {header.get('device', '?')}", f"commit {str(header.get('commit', '?'))[:10]}",
            f"TP={header.get('tp', '?')}", f"context {header.get('context', '?')}"]
    if header.get("copy_bandwidth_tb_s"):
        ways = header.get("copy_bandwidth_ways_tb_s") or {}
        by_way = f" (the faster of {', '.join(f'{k} {v}' for k, v in ways.items())})" if len(ways) > 1 else ""
        bits.append(f"floor at the measured copy bandwidth {header['copy_bandwidth_tb_s']} TB/s{by_way}")
    return f"*{path}: " + ", ".join(bits) + "; ms per decode step (host wall time).*"


def decode_table(rows) -> list:
    """Markdown lines of the model table (see the module docstring)."""
    cells, layers = _decode_cells(rows)
    have = {p for c in cells.values() for p in c}
    cols = ["model", "layers", "batch", "tpfuse ms", "floor ms", "tpfuse / floor"]
    if "hf_compiled" in have:
        cols += ["HF compiled ms", "tpfuse / HF compiled"]
    cols += [head for prov, head in RATIOS if prov in have]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for model in dict.fromkeys(m for m, _ in cells):
        for batch in sorted(b for m, b in cells if m == model):
            c = cells[(model, batch)]
            t, floor = c.get("tpfuse"), c.get("memory_floor")
            row = [model, str(layers.get(model, "—")), str(batch), _ms(t), _ms(floor), _ratio(t, floor)]
            if "hf_compiled" in have:
                row += [_ms(c.get("hf_compiled")), _ratio(t, c.get("hf_compiled"))]
            row += [_ratio(c.get(prov), t) for prov, _ in RATIOS if prov in have]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def capacity_table(rows) -> list:
    """Markdown lines: per model and batch, the step at the run's own cache and at each capacity point, and the
    spread (slowest / fastest - 1) over all of them; ``[]`` without capacity rows."""
    caps = [r for r in rows if r.get("provider") == "tpfuse_capacity" and r.get("mode") == "decode"]
    if not caps:
        return []
    points = list(dict.fromkeys((r["max_batch"], r["max_seq_len"]) for r in caps))
    own = {(r["model"], r["tokens"]): r for r in rows if r.get("provider") == "tpfuse" and r.get("mode") == "decode"}
    at = {(r["model"], r["tokens"], r["max_batch"], r["max_seq_len"]): r["us"] for r in caps}
    cols = ["model", "batch", "run's cache ms"] + [f"{b}x{s} ms" for b, s in points] + ["spread"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for model, batch in dict.fromkeys((r["model"], r["tokens"]) for r in caps):
        base = own.get((model, batch), {})
        name = f"{base['max_batch']}x{base['max_seq_len']}: " if "max_batch" in base else ""
        times = [at.get((model, batch, b, s)) for b, s in points]
        seen = [x for x in [base.get("us")] + times if _ok(x)]
        spread = f"{(max(seen) / min(seen) - 1) * 100:.1f}%" if len(seen) > 1 else "—"
        lines.append("| " + " | ".join([model, str(batch), name + _ms(base.get("us"))] + [_ms(x) for x in times]
                                       + [spread]) + " |")
    return lines


def variant_table(rows) -> list:
    """Markdown lines: per model, batch and provider, its step under each variant the run has
    (:data:`VARIANTS`: small-M routing table, PDL or not, ...) over its step without (below 1: the variant is faster), and the GEMM calls the table routed
    in each variant that has the table; ``[]`` without variant rows."""
    var = [r for r in rows if r.get("mode") == "decode" and _variant(r["provider"])[1]]
    if not var:
        return []
    us = {(r["model"], r["tokens"], r["provider"]): r.get("us") for r in rows if r.get("mode") == "decode"}
    have = [(sfx, head) for sfx, head in VARIANTS if any(_variant(r["provider"])[1] == sfx for r in var)]
    routed_in = [head for sfx, head in have if "small" in sfx]
    cols = (["model", "batch", "provider"] + [f"{head}: with / without" for _, head in have]
            + [f"GEMM calls routed ({' / '.join(routed_in)})" if routed_in else "GEMM calls routed"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for model, batch, prov in dict.fromkeys((r["model"], r["tokens"], _variant(r["provider"])[0]) for r in var):
        cells = [_ratio(us.get((model, batch, prov + sfx)), us.get((model, batch, prov))) for sfx, _ in have]
        routed = [str(r["routed"]) for r in var if (r["model"], r["tokens"]) == (model, batch)
                  and _variant(r["provider"])[0] == prov and "routed" in r and "_small" in r["provider"]]
        lines.append("| " + " | ".join([model, str(batch), HEADS[prov]] + cells + [" / ".join(routed) or "—"])
                     + " |")
    return lines


def render(paths) -> str:
    out = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows = data.get("rows", [])
        out += [caption(data.get("header", {}), path), ""] + decode_table(rows) + [""]
        cap = capacity_table(rows)
        if cap:
            out += ["Step time per KV-cache capacity (max_batch x max_seq_len; same batch and context):", ""]
            out += cap + [""]
        ab = variant_table(rows)
        if ab:
            tables = sorted({str(r.get("table")) for r in rows if "_small" in str(r.get("provider"))})
            what = f" (small-M table: {', '.join(tables)})" if tables else ""
            out += [f"Decode step under each variant over the same step without it{what}:", ""]
            out += ab + [""]
        for s in data.get("skipped", []):
            out.append(f"- skipped: {s.get('model')} {s.get('max_batch')}x{s.get('max_seq_len')}: {s.get('reason')}")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="e2e JSON files (bench_e2e.py's)")
    ap.add_argument("--out", help="write the markdown here (default: stdout)")
    args = ap.parse_args(argv)
    text = render(args.paths)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
