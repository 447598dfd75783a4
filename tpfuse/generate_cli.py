"""``tpfuse-generate``: text in, text out with a parallelized model, then its speed (ms per decode step, tokens/s).

    tpfuse-generate --model-dir ./my-llama --prompt "The capital of France is" --new-tokens 32
    tpfuse-generate --model-dir ./my-llama --chat --prompts-file prompts.txt    # one prompt per line, one batch
    torchrun --nproc-per-node=2 -m tpfuse.generate_cli --model-dir ./my-llama --prompt "..."
    tpfuse-generate --model 8B --layers 4 --batch 8 --new-tokens 256            # benchmark: random weights and ids

Text mode (``--prompt`` / ``--prompts-file``, needs ``--model-dir``): the prompts are tokenized with the checkpoint's
own tokenizer (transformers ``AutoTokenizer``, local files only: nothing is downloaded), left-padded into one batch,
``--chat`` wraps each in the tokenizer's chat template; generation stops at the end-of-sequence token. Rank 0
prints the new text as it is generated (one prompt) or each prompt's completion at the end (several), then the
speed. Streaming reads every step's tokens back to the host, so text-mode speeds include that read.

Benchmark mode (no prompt): ``--model`` builds a random-weight transformers model of a named shape (``tiny`` is
the demo's model, the others ``bench/bench_e2e.py``'s real layer shapes with ``--layers`` layers), or
``--model-dir`` loads a checkpoint; the prompts are random token ids (``--prompt-len`` tokens, every other row half
as long, left-padded).

``--model-dir`` loads with :func:`tpfuse.parallel.from_pretrained` (each rank reads only its shard). Without
torchrun it runs as one rank. Arguments are checked before any rank state is created; a bad one prints one line and
exits 2; a failure on a rank prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SHAPES = {  # name -> (architecture, config fields); the 8B/70B/Qwen3-32B rows are bench/e2e_models.py's
    "tiny": ("llama", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                           intermediate_size=512)),
    "8B": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=14336)),
    "70B": ("llama", dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                          intermediate_size=28672)),
    "Qwen3-32B": ("qwen3", dict(hidden_size=5120, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                                intermediate_size=25600)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DESCRIPTION = """\
Generate text with a tensor-parallel model and print the speed (ms per decode step, tokens/s).

Text mode: --model-dir DIR with --prompt TEXT or --prompts-file FILE (one prompt per line). The checkpoint's own
tokenizer is used (local files only, nothing is downloaded); --chat applies its chat template. Rank 0 prints the
new text as it is generated, then the speed.

Benchmark mode (no prompt): random token ids as prompts, on a random-weight model of shape --model or on the
checkpoint in --model-dir.

Under torchrun (or launch/run.sh -n N -m tpfuse.generate_cli ...) every rank holds 1/N of the model; without
torchrun it runs as one rank."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help, and the description's line breaks kept."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tpfuse-generate", description=DESCRIPTION, formatter_class=_HelpFormatter)
    ap.add_argument("--model-dir", metavar="DIR", help="a local Hugging Face checkpoint directory (config.json, "
                    "*.safetensors, tokenizer files for text mode)")
    ap.add_argument("--prompt", metavar="TEXT", help="text mode: one prompt")
    ap.add_argument("--prompts-file", metavar="FILE", help="text mode: a file of prompts, one per line (blank "
                    "lines skipped), generated as one batch")
    ap.add_argument("--chat", action="store_true", help="text mode: wrap each prompt in the tokenizer's chat "
                    "template as a user message")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="model dtype; auto = the "
                    "checkpoint's (config.json) for --model-dir, else bf16 on GPU and fp32 on CPU")
    ap.add_argument("--new-tokens", type=int, default=64, metavar="N", help="new tokens per prompt (at most: text "
                    "mode stops at the end-of-sequence token)")
    ap.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
    ap.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    bench = ap.add_argument_group("benchmark mode (no prompt)")
    bench.add_argument("--model", choices=sorted(SHAPES), default="tiny", help="random-weight model shape (when "
                       "no --model-dir is given)")
    bench.add_argument("--layers", type=int, default=2, metavar="N", help="decoder layers of a --model shape")
    bench.add_argument("--batch", type=int, default=4, metavar="N", help="prompts per batch (sequences)")
    bench.add_argument("--prompt-len", type=int, default=32, metavar="N", help="tokens per prompt (every other row "
                       "half as long)")
    return ap


def parse_args(argv=None):
    ap = _parser()
    args = ap.parse_args(argv)
    for name in ("layers", "batch", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        ap.error(f"--model-dir {args.model_dir}: not a directory")
    if args.prompt is not None and args.prompts_file is not None:
        ap.error("--prompt and --prompts-file: give one of them")
    args.prompts = _read_prompts(ap, args)
    if args.prompts is not None and args.model_dir is None:
        ap.error("text mode (--prompt / --prompts-file) needs --model-dir (its tokenizer)")
    if args.chat and args.prompts is None:
        ap.error("--chat needs --prompt or --prompts-file")
    return args


def _read_prompts(ap, args):
    if args.prompt is not None:
        return [args.prompt]
    if args.prompts_file is None:
        return None
    try:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [ln.rstrip("\n") for ln in f if ln.strip()]
    except OSError as e:
        ap.error(f"--prompts-file {args.prompts_file}: {e.strerror}")
    if not prompts:
        ap.error(f"--prompts-file {args.prompts_file}: no prompt in it")
    return prompts


def _config_json(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("text_config", cfg)


def _dtype(args, on_gpu: bool) -> torch.dtype:
    if args.dtype != "auto":
        return DTYPES[args.dtype]
    if args.model_dir:
        cfg = _config_json(args.model_dir)
        name = str(cfg.get("dtype") or cfg.get("torch_dtype"))
        by_name = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        if name in by_name:
            return by_name[name]
    return torch.bfloat16 if on_gpu else torch.float32


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


def _random_prompts(args, vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, : args.prompt_len // 2] = 0  # every other row half as long, left-padded
    return ids, mask


def _tokenize(args):
    """``(tokenizer, ids, mask)`` of the text prompts, left-padded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    tok.padding_side = "left"  # generation continues every row at its last column
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    texts = args.prompts
    if args.chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) for p in texts]
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=not args.chat)
    return tok, enc["input_ids"], enc["attention_mask"]


def _eos_id(model, tok):
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tok.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else eos


class _TextStream:
    """``on_token`` for :func:`tpfuse.parallel.generate`: prints row 0's new text as it grows (until its EOS)."""

    def __init__(self, tok, eos):
        self.tok, self.eos, self.ids, self.shown, self.done = tok, eos, [], "", False

    def __call__(self, new: torch.Tensor) -> None:
        t = int(new[0])
        if self.done or t == self.eos:
            self.done = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        print(text[len(self.shown):] if text.startswith(self.shown) else f"\n{text}", end="", flush=True)
        self.shown = text


def _completions(tok, seqs: torch.Tensor, width: int, eos) -> list:
    out = []
    for row in seqs[:, width:].tolist():
        row = row[: row.index(eos)] if eos in row else row
        out.append(tok.decode(row, skip_special_tokens=True))
    return out


def _load(args, dtype, cache, max_tokens):
    import tpfuse
    from tpfuse.parallel import from_pretrained

    if args.model_dir:  # each rank reads only its shard (tpfuse.parallel.from_pretrained)
        hidden = int(_config_json(args.model_dir)["hidden_size"])
        comm = tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=hidden, dtype=dtype)
        return from_pretrained(args.model_dir, comm, cache=cache), comm
    model = _build(args, dtype)
    comm = tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=model.config.hidden_size, dtype=dtype)
    return tpfuse.parallelize(model, comm, cache=cache), comm


def _generate(model, comm, args, ids, mask, text):
    """Warm-up, then the measured run (streamed in text mode). Returns its :class:`GenerateOutput`."""
    from tpfuse.parallel import generate

    tok, eos = text if text is not None else (None, None)
    sampling = dict(do_sample=args.sample, temperature=0.8, top_p=0.95)
    generate(model, ids, mask, max_new_tokens=min(4, args.new_tokens))  # warm-up: kernels compile, graphs capture
    stream = _TextStream(tok, eos) if text is not None and ids.shape[0] == 1 and comm.rank == 0 else None
    out = generate(model, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=eos,
                   pad_token_id=eos if eos is not None else 0, progress=text is None, on_token=stream, **sampling)
    if comm.rank == 0 and text is not None:
        if stream is not None:
            print(flush=True)
        else:
            for i, (p, c) in enumerate(zip(args.prompts, _completions(tok, out.sequences, ids.shape[1], eos))):
                print(f"[{i}] {p}\n    -> {c}", flush=True)
    return out


def run(args) -> None:
    import torch.distributed as dist

    from tpfuse.distributed import group_device
    from tpfuse.parallel import KVCacheConfig

    on_gpu = group_device(dist.get_backend()).type == "cuda"  # NCCL, or gloo in one-GPU mode
    dtype = _dtype(args, on_gpu)
    text = None
    if args.prompts is not None:
        tok, ids, mask = _tokenize(args)
    else:
        ids, mask = _random_prompts(args, _config_json(args.model_dir)["vocab_size"] if args.model_dir else
                                    (32000 if args.model != "tiny" else 512))
    cache = KVCacheConfig(max_batch=ids.shape[0], max_seq_len=ids.shape[1] + args.new_tokens,
                          cuda_graphs=not args.no_graphs)
    model, comm = _load(args, dtype, cache, max_tokens=max(int(mask.sum()), ids.shape[0]))
    if args.prompts is not None:
        text = (tok, _eos_id(model, tok))
    if comm.rank == 0:
        print(f"{args.model_dir or args.model}: {model.config.num_hidden_layers} layers, TP={comm.tp}, "
              f"{comm.device}, {str(dtype)[6:]}; batch {ids.shape[0]}, prompts of up to {ids.shape[1]} tokens; "
              f"{model._tpfuse.cache_storage().describe()}", flush=True)
    out = _generate(model, comm, args, ids, mask, text)
    if comm.rank == 0:
        first = ("" if text is not None else
                 f"; first row's new tokens: {out.sequences[0, ids.shape[1]:][:16].tolist()}")
        print(f"{out.new_tokens} new tokens per sequence: prefill {out.prefill_ms:.2f} ms; decode "
              f"{out.ms_per_step:.3f} ms/step over {out.new_tokens - 1} steps = {out.tokens_per_s:.0f} tokens/s "
              f"(batch {ids.shape[0]}){first}", flush=True)
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
