"""tpfuse demo: a tiny random-weight Hugging Face ``LlamaForCausalLM`` (``tpfuse[hf]``; nothing is downloaded)
wrapped by :func:`tpfuse.parallelize` and run with tensor parallelism through the communicator - for each token
count, a batch of two left-padded prompts (that many tokens and half as many) in one prefill, crossing the
all-reduce -> sequence-parallel threshold, then decode steps through the static KV cache - compared with the same
model unsharded in fp64 on one rank.

Run plainly it starts its own local ranks (``--nproc``, default 2; NCCL when there are enough GPUs, else gloo on
the CPU)::

    python -m tpfuse.demo                  # or: tpfuse-demo
    torchrun --standalone --nproc_per_node=2 -m tpfuse.demo    # uses the launcher's ranks

Each rank process ends through :func:`tpfuse.distributed.exit_rank` (``os._exit`` after flushing), so under
torchrun ``main()`` does not return to its caller.

Prints a table (tokens, mode and path per op, error vs the unsharded model, time per forward) and exits non-zero
when any token count's logits differ from the oracle by more than the tolerance of ``tpfuse.tolerance``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from . import collectives, tolerance
from .communicator import TPCommunicator
from .distributed import group_device
from .config import CommConfig
from .distributed import exit_rank, free_port, init_distributed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


DESCRIPTION = ("tpfuse demo: a tiny random-weight transformers LlamaForCausalLM wrapped by tpfuse.parallelize, run with "
               "tensor parallelism (batched prefill + decode through the KV cache) and compared with the same model "
               "unsharded in fp64. Starts --nproc local ranks itself, or uses torchrun's.")
MAX_NPROC = 64


def _token_list(text: str):
    try:
        tokens = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from None
    if not tokens or any(t < 1 for t in tokens):
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return text


def _bounded_int(lo: int, hi: int = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {'in [%d, %d]' % (lo, hi) if hi is not None else '>= %d' % lo},"
                                             f" got {v}")
        return v
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default also prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    """Parse and validate the command line (before any rank starts: a bad value exits 2 with one line)."""
    ap = _Parser(prog="tpfuse-demo", description=DESCRIPTION)
    ap.add_argument("--tokens", type=_token_list, default="1,16,256,2048",
                    help="comma-separated prefill token counts (default %(default)s)")
    ap.add_argument("--nproc", type=_bounded_int(1, MAX_NPROC), default=2,
                    help="local ranks to start when not under torchrun (default %(default)s)")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                    help="activation dtype: auto = bf16 on GPU, fp32 on CPU")
    ap.add_argument("--layers", type=_bounded_int(1), default=2, help="decoder layers (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-steps", type=_bounded_int(0), default=2,
                    help="decode steps after each prefill (default %(default)s)")
    ap.add_argument("--sp-min-tokens", type=_bounded_int(1), default=None,
                    help="switch to the sequence-parallel form from this many tokens (default: the thresholds "
                         "table's sp_min_bytes for this arch / TP / dtype)")
    args = ap.parse_args(argv)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    tp = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.nproc
    if tp & (tp - 1):  # the demo model: kv heads max(4, TP), q heads 2 x kv, head_dim 256 / q heads
        ap.error(f"{'WORLD_SIZE' if under_torchrun else '--nproc'} {tp}: the demo model shards over a power-of-two "
                 f"TP only (1, 2, 4, 8, ...)")
    return args


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _verdict(rank, device, dtype, logits, ref_fn):
    """(rel err, ok) of rank 0's comparison with the fp64 oracle, the same on every rank."""
    verdict = torch.zeros(2, dtype=torch.float64, device=device)
    if rank == 0:
        err = tolerance.rel_err(logits.float().cpu(), ref_fn())
        verdict[0], verdict[1] = err, float(err <= tolerance.REL_ERR_LOGITS[dtype])
    collectives.broadcast_(verdict, 0, None)
    return verdict[0].item(), bool(verdict[1].item())


def _prompts(t: int, vocab: int, steps: int, g):
    """Two prompts (``t`` and ``ceil(t / 2)`` tokens), left-padded, plus ``steps`` decode tokens per row."""
    lens = [t, (t + 1) // 2]
    ids = torch.zeros(2, t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        ids[b, t - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, t - n:] = 1
    return lens, ids, mask, torch.randint(0, vocab, (2, steps), generator=g)


def _one_count(tp_model, comm, t, steps, g, oracle, rank, device, dtype):
    """Prefill of the two prompts, ``steps`` decode steps; returns (mode, paths, rel err, prefill ms, ok)."""
    lens, ids, mask, extra = _prompts(t, tp_model.config.vocab_size, steps, g)
    tp_model(ids, attention_mask=mask, use_cache=False)  # warm-up (and lazy kernel compilation on GPU)
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    comm.last_path.clear()
    out = tp_model(ids, attention_mask=mask)
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    paths, mode = dict(comm.last_path), tp_model._tpfuse.last_mode
    rows = [[out.logits[b, t - n:]] for b, n in enumerate(lens)]
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    comm.last_path.clear()
    for i in range(steps):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        out = tp_model(extra[:, i:i + 1], attention_mask=mask, cache=cache)
        for b in range(2):
            rows[b].append(out.logits[b])
    if steps:
        paths["decode"] = f"{tp_model._tpfuse.last_mode}: " + "/".join(sorted(set(comm.last_path.values())) or ["-"])
    got = torch.cat([torch.cat(r) for r in rows])

    def ref():
        from .models import hf_tiny

        return torch.cat([hf_tiny.oracle_logits(oracle, torch.cat([ids[b, t - n:], extra[b]]))
                          for b, n in enumerate(lens)])

    err, ok = _verdict(rank, device, dtype, got, ref)
    return mode, paths, err, ms, ok


def run(args) -> bool:
    """The demo body on one rank of an initialised process group. Returns True when every check passed."""
    from .models import hf_tiny
    from .parallel import KVCacheConfig, parallelize

    backend = dist.get_backend()
    device = group_device(backend)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rank, tp = dist.get_rank(), dist.get_world_size()
    tokens = [int(t) for t in args.tokens.split(",")]
    steps = args.decode_steps
    g = torch.Generator().manual_seed(args.seed + 1)
    longest = max(tokens) + steps + 8
    model = hf_tiny.build(tp=tp, layers=args.layers, max_positions=longest, seed=args.seed)
    oracle = hf_tiny.build(tp=tp, layers=args.layers, max_positions=longest, seed=args.seed) if rank == 0 else None
    cfg = model.config
    rows, ok_all = [], True
    config = CommConfig(sp_min_tokens=args.sp_min_tokens)
    with TPCommunicator(max_tokens=2 * max(tokens), hidden_size=cfg.hidden_size, dtype=dtype, config=config) as comm:
        if rank == 0:
            print(f"tpfuse demo: TP={tp} backend={backend} device={device.type} dtype={str(dtype)[6:]} "
                  f"arch={comm.arch}\nmodel: transformers LlamaForCausalLM (random weights), {cfg.num_hidden_layers} "
                  f"layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} kv), "
                  f"mlp {cfg.intermediate_size}; per token count: a batch of 2 left-padded prompts (T and T/2 "
                  f"tokens), then {steps} decode steps through the KV cache", flush=True)
        tp_model = parallelize(model.to(dtype), comm, cache=KVCacheConfig(max_batch=2, max_seq_len=longest))
        for t in tokens:
            mode, paths, err, ms, ok = _one_count(tp_model, comm, t, steps, g, oracle, rank, device, dtype)
            ok_all &= ok
            rows.append((t, mode, paths, err, ms, ok))
    if rank == 0:
        print(f"{'tokens':>7}  {'mode':<17}  {'paths (op=path)':<84}  {'rel err':>9}  {'ms':>8}  check"
              "   (ms: the prefill; rel err: prefill and decode logits)")
        for t, mode, paths, err, ms, ok in rows:
            p = ", ".join(f"{k}={v}" for k, v in paths.items())
            print(f"{t:>7}  {mode:<17}  {p:<84}  {err:9.2e}  {ms:8.2f}  {'ok' if ok else 'MISMATCH'}")
        if tp_model._tpfuse.head_range is not None:
            print("(all_reduce: the vocabulary-parallel lm_head's logits, each rank's rows gathered; the layers' "
                  "all-reduces are the fused_add_rmsnorm / reduce-scatter ops)")
        print("all token counts match the unsharded model" if ok_all else "MISMATCH against the unsharded model")
    return ok_all


def _run_rank(args) -> None:
    """One rank's whole life: init, the demo, teardown, then :func:`~tpfuse.distributed.exit_rank` (never returns:
    0 when every check passed, 1 on a mismatch or an exception, whose traceback is printed first)."""
    code = 1
    init_distributed()
    try:
        code = 0 if run(args) else 1
    except BaseException:  # noqa: BLE001 - print it here: exit_rank skips the interpreter's own report
        traceback.print_exc()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown after a failure must not mask the exit status
            traceback.print_exc()
    exit_rank(code)


def _spawned(rank: int, world: int, port: int, argv) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _run_rank(parse_args(argv))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun or launch/run.sh
        _run_rank(args)
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_spawned, args=(r, args.nproc, port, argv)) for r in range(args.nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if bad:
        why = ", ".join(f"rank {r} exited {c}" + (f" (signal {-c})" if c < 0 else "") for r, c in bad.items())
        print(f"tpfuse demo: failed: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
