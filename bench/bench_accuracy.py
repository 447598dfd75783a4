"""Decode accuracy against an fp32 oracle (issue #22's target "nothing lost in accuracy: logits vs an fp32 copy of
the weights no worse than HF bf16's on the full 8B"): the logits of the same random-weight bf16 model run three
ways, each compared with the logits of an fp32 copy of its weights, teacher-forced on the same tokens.

    torchrun --standalone --nproc-per-node=1 bench/bench_accuracy.py [--model 8B] [--layers full|N] [--vocab real|N]
        [--batch 4] [--prompt 256] [--steps 32] [--seed 0] [--no-fp8] [--tag TAG]
    python3 bench/bench_accuracy.py --plot ACCURACY_JSON [...]        (redraws the PNGs, no GPU)

The full run, one H100: ``python3 -m torch.distributed.run --standalone --nproc-per-node=1 bench/bench_accuracy.py
--model 8B --layers full`` (``bash bench/gpu_run.sh accuracy``); TP = 1 only. On CPU a tiny configuration runs in
seconds: ``python3 bench/bench_accuracy.py --model 8B/tp8 --layers 2 --vocab 512 --batch 2 --prompt 8 --steps 4``
(``--model``, ``--layers``, ``--vocab`` as in ``bench_e2e.py``; a shard name ``<model>/tp<N>`` is a smaller model
of the same hidden size).

**Tokens** (shapes): seeded random ids ``[B, P + S]`` (``--batch`` B = 4, ``--prompt`` P = 256, ``--steps`` S = 32,
``--seed``; drawn on the CPU, so every device gets the same ids). Teacher forcing: token ``P + i`` is fed at decode
step ``i`` whatever was predicted, so the providers see the same contexts. Compared: the logits at positions
``P - 1 .. P + S - 1``, i.e. ``[B, S + 1, vocab]`` (the prefill's last token, then every decode step), kept in fp32
on the CPU.

**Providers**, in this order (each row one provider):

* ``fp32 oracle`` (not a row, the reference): ``copy.deepcopy(model).float()`` - the bf16 weights upcast exactly
  (the rotary ``inv_freq`` buffer too, so all three runs share the model's RoPE frequencies) - one HF forward over
  the ``P + S`` tokens, TF32 off (``torch.backends.*.allow_tf32 = False``, matmul precision ``highest``);
* ``hf_bf16``: the bf16 HF model itself, one forward over the ``P + S`` tokens (what a user of transformers runs);
* ``tpfuse``: ``tpfuse.parallelize(model, comm, cache=KVCacheConfig(max_batch=B, max_seq_len=P + S + 8))`` with the
  product's defaults (fold_norms, PDL, fused RoPE: ``KVCacheConfig()``'s fields are in the header): a prefill of the
  P prompt tokens (``logits_to_keep=1``), then S one-token decode steps on the returned cache - on a GPU the
  CUDA-graph decode step (header ``decode_mode``: ``decode_graph``), on the CPU the plain-torch path;
* ``tpfuse_fp8`` (``--no-fp8`` skips it): the same model converted in place by ``tpfuse.parallel.quantize_fp8``
  (per-channel e4m3 weights, per-token activations: ``bench_e2e.py``'s ``tpfuse_fp8``), which drops the decode
  graphs; its prefill starts a new batch in the KV cache (the bf16 run's handle goes stale) and the graphs are
  captured again, as ``bench_e2e.py`` does after its conversion.

**Memory plan** (full 8B: 16 GB of bf16 weights, vocab 128256): the bf16 model, then its fp32 copy (32 GB; the
deepcopy's bf16 intermediate is freed tensor by tensor as ``.float()`` converts it): ~48 GB of weights at the
oracle's peak, its activations for ``B * (P + S)`` = 1152 tokens well under 1 GB (only the kept ``S + 1`` positions
reach the lm_head); the copy is deleted and the allocator's cache emptied before anything else is built. Then
``hf_bf16`` (16 GB + activations), ``parallelize`` in place (the KV cache: B x (P + S + 8) tokens, ~0.2 GB), and
``quantize_fp8`` in place (its e4m3 weights replace the bf16 ones layer by layer). Each phase's seconds and peak
GPU memory are in the header (``phases``).

**Metrics** (:func:`logit_metrics`), per provider over all ``B x (S + 1)`` logits rows vs the oracle's:
``rel_err`` = ``||L - L32||_F / ||L32||_F``, ``max_abs_err``, ``argmax_agreement`` (the fraction of rows whose
argmax is the oracle's), ``rel_err_by_step`` (the same ratio per position: S + 1 values, index 0 = the prefill's
last token), ``finite``. :func:`judge` adds, for every provider but ``hf_bf16``: ``rel_err_vs_hf_bf16`` (ratio),
``rel_err_within_hf_bf16`` (rel_err <= hf_bf16's), ``argmax_within_hf_bf16`` (agreement >= hf_bf16's) and
``within_target`` (both). The target of #22 is the ``tpfuse`` row's; the ``tpfuse_fp8`` row's comparison is
informational (e4m3 weights are expected to lose to bf16). Nothing is asserted: a summary line per provider is
printed.

**Output**: ``accuracy_tp1_<device>_<model>_<layers>L[_v<vocab>][_b<B>_p<P>_s<S>][_seed<N>][_<tag>].json`` in
``$OUT`` (else ``bench/results``; ``/`` of a shard name becomes ``-``; the vocab / shape / seed parts only where they
differ from the defaults), ``{"header": ..., "rows": [one per provider]}``, and next to it a PNG of the same stem:
``rel_err_by_step`` per provider, device and commit in the title.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import e2e_models as em  # noqa: E402

BASELINE = "hf_bf16"
"""The provider the others are judged against (#22: no worse than HF bf16)."""
DEFAULTS = dict(batch=4, prompt=256, steps=32, seed=0)
"""The shape of the full run; other shapes are named in the file's tag."""
TARGET = ("#22: tpfuse's logits vs an fp32 copy of the weights no worse than HF bf16's (rel_err <=, argmax "
          "agreement >=) on the full 8B; the tpfuse_fp8 row is compared the same way for information")


def _layers_arg(text: str):
    if text == "full":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--layers: a positive int or full, got {text!r}")
    return int(text)


def parse_args(argv=None):
    """The command line; ``--layers`` resolved to a count and ``--vocab`` to a size (the real vocab for ``--layers
    full``, resolved before the layers become a count, as ``profile_decode.py`` does)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="8B", help=f"one of {sorted(em.SHAPES)}, or a shard <model>/tp<N>")
    ap.add_argument("--layers", type=_layers_arg, default="full", help="an int or full (the model's real count)")
    ap.add_argument("--vocab", default=None, help="real or an int (default: real for --layers full, else 32000)")
    ap.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="sequences (B)")
    ap.add_argument("--prompt", type=int, default=DEFAULTS["prompt"], help="prompt tokens prefilled (P)")
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="decode steps (S), teacher-forced")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the token ids")
    ap.add_argument("--no-fp8", action="store_true", help="skip the tpfuse_fp8 provider")
    ap.add_argument("--tag", default="", help="appended to the file name")
    ap.add_argument("--plot", nargs="+", metavar="ACCURACY_JSON", default=None,
                    help="no run: draw each file's PNG next to it (no GPU)")
    args = ap.parse_args(argv)
    if args.plot:
        return args
    if min(args.batch, args.prompt, args.steps) < 1:
        ap.error("--batch, --prompt and --steps must be >= 1")
    em.parse_name(args.model)  # an unknown model fails here, before a process group
    args.vocab = em.resolve_vocab(args.vocab, args.layers, args.model)
    args.layers = em.resolve_layers(args.layers, args.model)
    return args


def file_tag(args) -> str:
    """``<model>_<layers>L`` plus what differs from the full run's defaults (see the module docstring)."""
    tag = f"{args.model.replace('/', '-')}_{args.layers}L"
    if args.vocab != em.REAL[em.parse_name(args.model)[0]][1]:
        tag += f"_v{args.vocab}"
    if (args.batch, args.prompt, args.steps) != (DEFAULTS["batch"], DEFAULTS["prompt"], DEFAULTS["steps"]):
        tag += f"_b{args.batch}_p{args.prompt}_s{args.steps}"
    tag += f"_seed{args.seed}" if args.seed != DEFAULTS["seed"] else ""
    return tag + (f"_{args.tag.lstrip('_')}" if args.tag else "")


def _say(text: str) -> None:
    print(f"[accuracy] {text}", flush=True)  # one process (TP = 1): no rank filter


# --------------------------------------------------------------------------------------------------------------
# metrics (pure: CPU tensors in, numbers out)


def logit_metrics(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """``logits`` vs the oracle's ``ref``, both ``[B, S + 1, vocab]``: ``rel_err`` (Frobenius, fp64),
    ``max_abs_err``, ``argmax_agreement`` (fraction of the ``B x (S + 1)`` rows), ``rel_err_by_step`` (per
    position), ``finite`` (no NaN / inf in ``logits``), ``logit_rows``."""
    if logits.shape != ref.shape:
        raise ValueError(f"logits {tuple(logits.shape)} vs oracle {tuple(ref.shape)}")
    out, r = logits.double(), ref.double()
    diff = out - r
    by_step = diff.norm(dim=(0, 2)) / r.norm(dim=(0, 2))
    return dict(rel_err=float(diff.norm() / r.norm()), max_abs_err=float(diff.abs().max()),
                argmax_agreement=float((out.argmax(-1) == r.argmax(-1)).double().mean()),
                rel_err_by_step=[float(x) for x in by_step], finite=bool(torch.isfinite(logits).all()),
                logit_rows=int(ref.shape[0] * ref.shape[1]))


def judge(rows: list, baseline: str = BASELINE) -> list:
    """Add to every row but ``baseline``'s its standing against it (``rel_err_vs_hf_bf16``,
    ``rel_err_within_hf_bf16``, ``argmax_within_hf_bf16``, ``within_target``); returns ``rows``. A NaN rel_err is
    never within (comparisons with NaN are False)."""
    base = next(r for r in rows if r["provider"] == baseline)
    for r in rows:
        if r is base:
            continue
        if base["rel_err"] > 0:
            r[f"rel_err_vs_{baseline}"] = r["rel_err"] / base["rel_err"]  # NaN stays NaN
        else:  # the baseline is exact: any error is infinitely worse
            r[f"rel_err_vs_{baseline}"] = 1.0 if r["rel_err"] == 0 else float("inf")
        r[f"rel_err_within_{baseline}"] = bool(r["rel_err"] <= base["rel_err"])
        r[f"argmax_within_{baseline}"] = bool(r["argmax_agreement"] >= base["argmax_agreement"])
        r["within_target"] = r[f"rel_err_within_{baseline}"] and r[f"argmax_within_{baseline}"] and r["finite"]
    return rows


def summary_line(row: dict, base: dict) -> str:
    """One line per provider: its errors, and against the baseline where it is not the baseline."""
    line = (f"{row['provider']:<11} rel_err {row['rel_err']:.3e}  max_abs_err {row['max_abs_err']:.3e}  "
            f"argmax_agreement {row['argmax_agreement']:.4f}")
    if row is base:
        return line + "  (the baseline)"
    verdict = "WITHIN" if row.get("within_target") else "NOT within"
    note = "" if row["provider"] == "tpfuse" else " (for information: #22's target is the tpfuse row's)"
    return (line + f"  | vs {base['provider']}: rel_err {row[f'rel_err_vs_{BASELINE}']:.3f}x, agreement "
            f"{row['argmax_agreement']:.4f} vs {base['argmax_agreement']:.4f}: {verdict} the target{note}")


# --------------------------------------------------------------------------------------------------------------
# the runs


@contextlib.contextmanager
def _phase(name: str, dev, phases: dict):
    """Print the phase's start and end; record its seconds and (CUDA) peak GiB in ``phases[name]``."""
    _say(f"{name} ...")
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(dev)
    rec = dict(seconds=round(time.perf_counter() - t0, 2))
    if cuda:
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
    phases[name] = rec
    _say(f"{name}: {rec['seconds']} s" + (f", peak {rec['peak_gib']} GiB allocated" if cuda else ""))


def _free(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the fp32 copy's 32 GB back before the next phase allocates


@contextlib.contextmanager
def _exact_fp32():
    """fp32 matmuls and convolutions without TF32 for the oracle (restored afterwards)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])


def hf_logits(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """One HF forward over ``ids`` (no cache), the last ``keep`` positions' logits as fp32 on the CPU."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
    return out.logits[:, -keep:].float().cpu()


def oracle_logits(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """The fp32 copy's logits (see :func:`hf_logits`); the copy is gone when this returns."""
    ref = copy.deepcopy(model).float()  # exact upcast of the same bf16 weights
    try:
        with _exact_fp32():
            return hf_logits(ref, ids, keep)
    finally:
        del ref
        _free(ids.device)


def tpfuse_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ``ids[:, :prompt]`` on a new cache batch, then one decode step per remaining token (teacher
    forcing); ``[B, steps + 1, vocab]`` fp32 on the CPU: the prefill's last logits, then each step's."""
    out = model(ids[:, :prompt], logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    rows = [out.logits[:, -1].float().cpu()]
    for i in range(prompt, ids.shape[1]):
        tok = ids[:, i:i + 1].contiguous()  # the reference token, not the model's pick
        rows.append(model(tok, cache=cache).logits[:, -1].float().cpu())  # copied: a graph's output is reused
    return torch.stack(rows, dim=1)


def cache_defaults() -> dict:
    """The product defaults of ``KVCacheConfig()`` that shape the decode step (recorded in the header)."""
    from tpfuse.parallel import KVCacheConfig

    cfg = KVCacheConfig()
    names = ("fold_norms", "pdl", "fuse_rope", "prefetch_o_proj", "cuda_graphs", "block_size")
    return {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}


def reference_ids(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed)  # CPU generator: the same ids on every device
    return torch.randint(0, args.vocab, (args.batch, args.prompt + args.steps), generator=g)


def measure(args, dev) -> tuple:
    """Build, run the oracle and the providers (module docstring order); ``(header fields, rows)``."""
    import tpfuse
    from tpfuse.parallel import KVCacheConfig

    phases, info, got = {}, {}, {}
    keep = args.steps + 1
    ids = reference_ids(args).to(dev)
    with _phase("build bf16 model", dev, phases):
        model = em.build_model(args.model, args.layers, dev, args.vocab)
    info["hf_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    with _phase("fp32 oracle", dev, phases):
        ref = oracle_logits(model, ids, keep)
    with _phase(BASELINE, dev, phases):
        got[BASELINE] = hf_logits(model, ids, keep)
    with _phase("tpfuse", dev, phases):
        comm = tpfuse.TPCommunicator(max_tokens=args.batch * args.prompt, hidden_size=model.config.hidden_size,
                                     dtype=torch.bfloat16)
        model = tpfuse.parallelize(model, comm, cache=KVCacheConfig(max_batch=args.batch,
                                                                    max_seq_len=args.prompt + args.steps + 8))
        got["tpfuse"] = tpfuse_logits(model, ids, args.prompt)
    info["decode_mode"] = model._tpfuse.last_mode  # decode_graph: the CUDA-graph step ran
    if not args.no_fp8:
        with _phase("tpfuse_fp8", dev, phases):
            from tpfuse.parallel import quantize_fp8

            quantize_fp8(model)  # in place; drops the bf16 decode graphs (recaptured by the steps below)
            got["tpfuse_fp8"] = tpfuse_logits(model, ids, args.prompt)
        info["decode_mode_fp8"] = model._tpfuse.last_mode
    comm.close()
    del model
    _free(dev)
    rows = judge([dict(provider=name, **logit_metrics(logits, ref)) for name, logits in got.items()])
    info.update(phases=phases, oracle_abs_max=float(ref.abs().max()), oracle_rms=float(ref.pow(2).mean().sqrt()))
    return info, rows


def _pdl_active(dev) -> bool:
    """Whether the decode graphs could use PDL here (the config's default and the stack / device)."""
    if dev.type != "cuda":
        return False
    from tpfuse.kernels import pdl

    return bool(cache_defaults().get("pdl")) and pdl.available(dev)


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        for path in args.plot:
            with open(path) as fh:
                data = json.load(fh)
            print("wrote", plot_errors(data["header"], data["rows"], path[:-len(".json")] + ".png"))
        return None
    with common.rank_context(single_process=True) as ranks:
        if ranks.world != 1:
            raise SystemExit(f"bench_accuracy.py runs at TP = 1 (one process), got {ranks.world} ranks")
        _say(f"{args.model}, {args.layers} layers, vocab {args.vocab}: batch {args.batch}, prompt {args.prompt}, "
             f"{args.steps} decode steps, on {common.device_name()}")
        info, rows = measure(args, ranks.device)
        pdl_active = _pdl_active(ranks.device)
    hdr = common.header("accuracy", model=args.model, layers=args.layers, vocab=args.vocab, batch=args.batch,
                        prompt=args.prompt, steps=args.steps, seed=args.seed,
                        positions=f"{args.prompt - 1}..{args.prompt + args.steps - 1}",
                        oracle="fp32 copy of the bf16 weights (exact upcast), one HF forward, TF32 off",
                        kv_cache_defaults=cache_defaults(), pdl_active=pdl_active,
                        fp8="quantize_fp8 defaults: per-channel e4m3 weights, per-token activations",
                        baseline=BASELINE, target=TARGET, **info)
    base = next(r for r in rows if r["provider"] == BASELINE)
    for r in rows:
        _say(summary_line(r, base))
    path = common.write_json(common.result_path("accuracy", tp=1, tag=file_tag(args)), hdr, rows)
    _say(f"wrote {path}")
    _say(f"wrote {plot_errors(hdr, rows, path[:-len('.json')] + '.png')}")
    return path


# --------------------------------------------------------------------------------------------------------------
# plot


def plot_errors(hdr: dict, rows, path: str):
    """``rel_err_by_step`` per provider (log y) over the positions (0 = the prefill's last token, then the decode
    steps); the legend carries each provider's overall rel_err and argmax agreement. Returns the path, or None
    without matplotlib."""
    plt = common.pyplot()
    if plt is None:
        return None
    colors = {"hf_bf16": "#636363", "tpfuse": "#08519c", "tpfuse_fp8": "#e6550d"}
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for r in rows:
        steps = list(range(len(r["rel_err_by_step"])))
        ax.plot(steps, r["rel_err_by_step"], marker="o", ms=3, lw=1.2, color=colors.get(r["provider"]),
                label=f"{r['provider']}: rel_err {r['rel_err']:.2e}, argmax agreement {r['argmax_agreement']:.3f}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel(f"position - (prompt - 1): 0 = the prefill's last token, 1..{hdr.get('steps')} = decode steps")
    ax.set_ylabel("||L - L_fp32|| / ||L_fp32|| (over the batch)")
    ax.set_title(f"{hdr.get('model')}, {hdr.get('layers')} layers, vocab {hdr.get('vocab')}: logits vs the fp32 "
                 f"oracle, batch {hdr.get('batch')}, prompt {hdr.get('prompt')}\n{hdr.get('device')}, "
                 f"{hdr.get('commit')}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)
