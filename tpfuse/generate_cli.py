"""``tpfuse-generate``: generate with a parallelized model and print the speed (ms per decode step, tokens/s), with a
progress bar on long runs.

    tpfuse-generate --model tiny --batch 4 --new-tokens 64                      # CPU: 1 rank, gloo
    torchrun --nproc-per-node=2 -m tpfuse.generate_cli --model 8B --layers 4 --batch 8 --new-tokens 512
    tpfuse-generate --model-dir ./my-llama --prompt-len 1024 --new-tokens 256   # a local HF checkpoint directory

``--model`` builds a random-weight transformers model of a named shape (nothing is downloaded; ``tiny`` is the
demo's model, the others are ``bench/bench_e2e.py``'s real layer shapes with ``--layers`` layers); ``--model-dir``
loads a local checkpoint with :func:`tpfuse.parallel.from_pretrained` (each rank reads only its shard). Prompts are random token ids (``--prompt-len`` tokens, every
other row half as long, left-padded). Without torchrun it runs as one rank. Arguments are checked before any rank
state is created; a bad one prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

SHAPES = {  # name -> (architecture, config fields); the 8B/70B/Qwen3-32B rows are bench/bench_e2e.py's
    "tiny": ("llama", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                           intermediate_size=512)),
    "8B": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=14336)),
    "70B": ("llama", dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                          intermediate_size=28672)),
    "Qwen3-32B": ("qwen3", dict(hidden_size=5120, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                                intermediate_size=25600)),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="tpfuse-generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="tiny", help="random-weight model shape")
    ap.add_argument("--model-dir", help="a local Hugging Face checkpoint directory (instead of --model)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of a --model shape")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
    ap.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    args = ap.parse_args(argv)
    for name in ("layers", "batch", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        ap.error(f"--model-dir {args.model_dir}: not a directory")
    return args


def _build(args, dtype):
    import transformers

    arch, shape = SHAPES[args.model]
    cls, cfg_cls = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                    else (transformers.Qwen3ForCausalLM, transformers.Qwen3Config))
    cfg = cfg_cls(vocab_size=32000 if args.model != "tiny" else 512, num_hidden_layers=args.layers,
                  max_position_embeddings=32768, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    with torch.device(dev or "cpu"):
        return cls(cfg).to(dtype).eval()


def _hidden_size(model_dir: str) -> int:
    import json

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return int(cfg.get("text_config", cfg)["hidden_size"])


def _prompts(args, vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, : args.prompt_len // 2] = 0  # every other row half as long, left-padded
    return ids, mask


def run(args) -> None:
    import torch.distributed as dist

    import tpfuse
    from tpfuse.parallel import KVCacheConfig, from_pretrained, generate

    on_gpu = tpfuse.distributed.group_device(dist.get_backend()).type == "cuda"  # one-GPU mode too
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cache = KVCacheConfig(max_batch=args.batch, max_seq_len=args.prompt_len + args.new_tokens,
                          cuda_graphs=not args.no_graphs)
    if args.model_dir:  # each rank reads only its shard (tpfuse.parallel.from_pretrained)
        hidden = _hidden_size(args.model_dir)
        comm = tpfuse.TPCommunicator(max_tokens=args.batch * args.prompt_len, hidden_size=hidden, dtype=dtype)
        model = from_pretrained(args.model_dir, comm, dtype=dtype, cache=cache)
    else:
        model = _build(args, dtype)
        comm = tpfuse.TPCommunicator(max_tokens=args.batch * args.prompt_len, hidden_size=model.config.hidden_size,
                                     dtype=dtype)
        model = tpfuse.parallelize(model, comm, cache=cache)
    cfg = model.config
    ids, mask = _prompts(args, cfg.vocab_size)
    if comm.rank == 0:
        print(f"{args.model_dir or args.model}: {cfg.num_hidden_layers} layers, TP={comm.tp}, {comm.device}, "
              f"{str(dtype)[6:]}; batch {args.batch}, prompts of {args.prompt_len} tokens; "
              f"{model._tpfuse.cache_storage().describe()}", flush=True)
    generate(model, ids, mask, max_new_tokens=min(4, args.new_tokens))  # warm-up: kernels compile, graphs capture
    out = generate(model, ids, mask, max_new_tokens=args.new_tokens, do_sample=args.sample, temperature=0.8,
                   top_p=0.95, progress=True)
    if comm.rank == 0:
        print(f"prefill {out.prefill_ms:.2f} ms; decode {out.ms_per_step:.3f} ms/step over {out.new_tokens - 1} "
              f"steps = {out.tokens_per_s:.0f} tokens/s (batch {args.batch}); "
              f"first row's new tokens: {out.sequences[0, args.prompt_len:][:16].tolist()}", flush=True)
    comm.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    from tpfuse.distributed import exit_rank, free_port, init_distributed

    if "RANK" not in os.environ:  # one rank of our own
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    init_distributed()
    code = 1
    try:
        run(args)
        code = 0
    except Exception as e:  # noqa: BLE001 - one line per failure, then the exit status
        print(f"tpfuse-generate: {type(e).__name__}: {e}", file=sys.stderr)
    exit_rank(code)


if __name__ == "__main__":
    main()
