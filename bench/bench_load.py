"""Loading benchmark: a ``save_pretrained`` checkpoint (random weights, nothing downloaded) into TP shards through
``tpfuse.parallel.from_pretrained`` (meta-device build, only this rank's slices read), measuring per rank the peak
host memory and device memory against the size of the shard it keeps.

    python bench/bench_load.py [--shape 8B] [--fp8] [--dir /tmp/ckpt_8b]           # one process, TP=1
    torchrun --standalone --nproc-per-node=N bench/bench_load.py [--shape 8B] ...   # N ranks
    python bench/bench_load.py --shape tiny --device cpu                           # CPU smoke (CI)

The checkpoint is written once (by a separate process, so the writer's memory does not count) to ``--dir`` unless
it already holds ``config.json``; ``--fp8`` writes the compressed-tensors FP8 checkpoint of the same model
(e4m3 weights, per-channel scales). Per rank: ``shard_bytes`` (its parameters and buffers after the load),
``host_peak_over_baseline_bytes`` (peak RSS, ``VmHWM``, during the load minus the RSS before it: CUDA context,
torch and transformers are in the baseline), ``device_peak_bytes`` (``torch.cuda.max_memory_allocated``), their
ratios to the shard (target <= 1.2), the load time, and a check of sampled tensors against ``safetensors``' own
reader. Writes ``load_tp{N}_{device}[_fp8].json`` to ``$OUT`` (or ``bench/results``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SHAPES = {
    "8B": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, intermediate_size=14336, rope_theta=500000.0),
    "tiny": dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32, intermediate_size=768),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8B", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dir", default=None, help="checkpoint directory (default /tmp/tpfuse_ckpt_<shape>[_fp8])")
    ap.add_argument("--fp8", action="store_true", help="write / load the compressed-tensors FP8 checkpoint")
    ap.add_argument("--write", action="store_true", help=argparse.SUPPRESS)  # the writer subprocess
    return ap.parse_args(argv)


def write_checkpoint(args) -> None:
    """Random-weight Llama of ``args.shape`` (bf16; FP8-converted with ``--fp8``) saved to ``args.dir``."""
    import transformers

    from tpfuse.parallel import quantize_fp8

    cfg = transformers.LlamaConfig(max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   **SHAPES[args.shape])
    dev = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    if args.fp8:
        quantize_fp8(model)
    model.save_pretrained(args.dir, max_shard_size="4GB")


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def shard_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


def check_against_safetensors(model, path: str, every: int) -> float:
    """Max |difference| between loaded tensors (every ``every``-th name) and ``safe_open``'s slices of them."""
    from safetensors import safe_open

    st, sd, worst = model._tpfuse, model.state_dict(), 0.0
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(f, framework="pt", device="cpu") as fh:
            for i, name in enumerate(sorted(fh.keys())):
                if i % every:
                    continue
                spec, sl = st.shards.get(name), fh.get_slice(name)
                ref = fh.get_tensor(name) if spec is None else torch.cat(
                    [sl[s:e] if spec.dim == 0 else sl[:, s:e] for s, e in spec.ranges], dim=spec.dim)
                got = sd[name].cpu()
                worst = max(worst, float((got.float() - ref.float().reshape(got.shape)).abs().max()))
    return worst


def measure(args, comm, dev) -> dict:
    import transformers

    from tpfuse.parallel import KVCacheConfig, from_pretrained

    # code the load imports lazily belongs to the baseline (the model class, its config)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
            num_hidden_layers=1, hidden_size=64, intermediate_size=64, num_attention_heads=1, vocab_size=64))
    base_rss = _rss("VmRSS")
    reset = _reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base_dev = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    model = from_pretrained(args.dir, comm, dtype=torch.bfloat16, cache=KVCacheConfig(max_batch=1, max_seq_len=256))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    peak = _rss("VmHWM")
    shard = shard_bytes(model)
    row = dict(shape=args.shape, fp8=args.fp8, rank=comm.rank, tp=comm.tp, load_s=round(secs, 3), shard_bytes=shard,
               host_baseline_rss_bytes=base_rss, host_peak_rss_bytes=peak, peak_reset=reset,
               host_peak_over_baseline_bytes=peak - base_rss,
               host_ratio=round((peak - base_rss) / shard, 4))
    if dev.type == "cuda":
        dpeak = torch.cuda.max_memory_allocated(dev) - base_dev
        row.update(device_peak_bytes=dpeak, device_ratio=round(dpeak / shard, 4))
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=dev)
    row["logits_finite"] = bool(torch.isfinite(model(ids, use_cache=False).logits.float()).all())
    row["max_abs_diff_vs_full_load"] = check_against_safetensors(model, args.dir, 1 if args.shape == "tiny" else 37)
    return row


def main(argv=None):
    args = parse_args(argv)
    args.dir = args.dir or f"/tmp/tpfuse_ckpt_{args.shape}{'_fp8' if args.fp8 else ''}"
    if args.write:
        return write_checkpoint(args)
    import tpfuse

    # torchrun's group, or without its environment a TP=1 group of this process
    with common.rank_context("nccl" if args.device == "cuda" else "gloo", single_process=True) as ranks:
        dev = ranks.device
        if ranks.rank == 0 and not os.path.exists(os.path.join(args.dir, "config.json")):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.abspath(__file__), "--write", "--shape", args.shape, "--device",
                            args.device, "--dir", args.dir] + (["--fp8"] if args.fp8 else []), check=True)
            print(f"wrote {args.dir} in {time.perf_counter() - t0:.0f} s", flush=True)
        dist.barrier()
        hidden = SHAPES[args.shape]["hidden_size"]
        comm = tpfuse.TPCommunicator(max_tokens=256, hidden_size=hidden, dtype=torch.bfloat16)
        row = measure(args, comm, dev)
        rows = [None] * ranks.world
        dist.all_gather_object(rows, row)
        if ranks.rank == 0:
            for r in rows:
                print(json.dumps(r), flush=True)
            hdr = common.header("load", tp=ranks.world, shape=args.shape, fp8=args.fp8,
                                target="host and device peak per rank <= 1.2x the shard")
            path = common.result_path("load", tp=ranks.world, tag="fp8" if args.fp8 else "",
                                      device=common.device_slug() if args.device == "cuda" else "cpu")
            common.write_json(path, hdr, rows)
            print("wrote", path, flush=True)
        comm.close()


if __name__ == "__main__":
    main()
