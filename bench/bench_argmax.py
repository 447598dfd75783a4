"""Benchmark: the greedy pick of a decode step, ``torch.argmax`` over ``[B, vocab]`` bf16 logits vs
:func:`tpfuse.parallel.generate.greedy_tokens`' two reductions at several chunk lengths (one GPU).

    python bench/bench_argmax.py [--vocabs 128256,32000] [--batches 1,8,64]

Each call is captured 20 times back to back in a CUDA graph; the graph is replayed 10 times and the time per call
is the elapsed CUDA-event time / 200 (what the call adds to a decode step). Every variant's tokens are checked equal
to ``torch.argmax``'s first (ties across chunks included). Chunk lengths: the divisors of the vocabulary among
160 / 250 / 334 / 384 / 501 / 668 / 768, and the one ``greedy_tokens`` picks (``pick``). Writes
``argmax_<device>.json`` (rows ``{vocab, batch, impl, us}``) to ``$OUT`` or ``bench/results``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tpfuse.parallel.generate import _argmax_chunk, greedy_tokens  # noqa: E402

CHUNKS = (160, 250, 334, 384, 501, 668, 768)


def two_stage(x: torch.Tensor, chunk: int) -> torch.Tensor:
    b, v = x.shape
    top, where = x.view(b, v // chunk, chunk).max(-1)
    first = top.argmax(-1)
    return where.gather(1, first[:, None]).squeeze(1) + first * chunk


def per_call_us(fn) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 200 * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = (lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--vocabs", type=ints, default=[128256, 32000])
    ap.add_argument("--batches", type=ints, default=[1, 8, 64])
    args = ap.parse_args()
    rows = []
    for vocab in args.vocabs:
        for batch in args.batches:
            x = torch.randn(batch, vocab, device="cuda", dtype=torch.bfloat16)
            x[:, vocab // 3] = x[:, vocab // 2] = 9.0  # a tie across chunks: the first index wins
            impls = {"argmax": lambda: x.argmax(-1), "pick": lambda: greedy_tokens(x)}
            impls.update({f"two{c}": (lambda c=c: two_stage(x, c)) for c in CHUNKS if vocab % c == 0})
            for name, fn in impls.items():
                assert torch.equal(fn(), x.argmax(-1)), name
                us = per_call_us(fn)
                rows.append(dict(vocab=vocab, batch=batch, impl=name, us=round(us, 2),
                                 chunk=_argmax_chunk(vocab, batch) if name == "pick" else None))
                print(f"vocab {vocab:6d} batch {batch:3d} {name:8s} {us:7.2f} us", flush=True)
    print("wrote", common.write_json(common.result_path("argmax"), common.header("argmax"), rows))


if __name__ == "__main__":
    main()
