"""PNG of bench/results/fused_ar_tp2_h200_pipe.json (tpfuse's paths, incl. the pipelined one-shot) with FlashInfer's
curves from the earlier run in fused_ar_tp2_h200.json (the pipe run had no FlashInfer).

    python bench/tools/plot_fused_ar_pipe.py
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def main():
    new = json.load(open(os.path.join(RES, "fused_ar_tp2_h200_pipe.json")))
    old = json.load(open(os.path.join(RES, "fused_ar_tp2_h200.json")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("nccl+tpfuse", new, None), ("symm2shot+tpfuse", new, None), ("tpfuse_oneshot", new, None),
              ("tpfuse_twoshot", new, None), ("tpfuse_oneshot_pipe_p33", new, "tpfuse_oneshot_pipe (33 producers = default)"),
              ("fi_oneshot", old, "FlashInfer one-shot (earlier run)"), ("fi_twoshot", old, "FlashInfer two-shot (earlier run)")]
    for ax, h in zip(axes, (4096, 8192)):
        for prov, src, label in series:
            pts = sorted((r["tokens"], r["median_us"]) for r in src["rows"] if r["provider"] == prov
                         and r["hidden"] == h and r["out_format"] == "bf16")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label or prov,
                        ls="--" if src is old else "-")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="µs per call (median, CUDA graphs)",
               title=f"AR + add + RMSNorm, hidden {h}, bf16 out, TP=2 H200")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"fused_ar_tp2_h200_pipe.json (commit {new['header']['commit']}) + FlashInfer from "
                 f"fused_ar_tp2_h200.json (commit {old['header']['commit']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RES, "fused_ar_tp2_h200_pipe.png"), dpi=110)


if __name__ == "__main__":
    main()
