"""``tpfuse.generate``: the fast generation loop of a parallelized model.

One prefill of the (padded) prompts, then one decode step per new token through the model's own forward, which on
CUDA replays the CUDA graph of the batch's bucket. Sampling runs on the device and nothing is read back per step
(the end-of-sequence check reads one flag every ``check_every`` steps), so the host stays ahead of the GPU. Under
TP every rank runs the loop; the chosen tokens are broadcast from the TP group's first rank, so ranks never diverge
(their logits may differ in the last bit where a reduction order differs).
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import collectives
from ..errors import TPFuseInputError
from .hf_generate import check_room


@dataclass
class GenerateOutput:
    """What :func:`generate` returns; times are measured on the host after a device sync."""

    sequences: torch.Tensor
    """``[B, L + new]``: the prompts as given, then the new tokens (``pad_token_id`` after a row's EOS)."""
    new_tokens: int
    """Decode steps run (+1 for the token the prefill produced)."""
    prefill_ms: float
    decode_ms: float
    """Wall time of all decode steps."""

    @property
    def ms_per_step(self) -> float:
        return self.decode_ms / max(1, self.new_tokens - 1)

    @property
    def tokens_per_s(self) -> float:
        """New tokens of the whole batch per second of decode."""
        return self.sequences.shape[0] * max(0, self.new_tokens - 1) / max(self.decode_ms, 1e-9) * 1e3


TWO_STAGE_VOCAB = 65536
"""Vocabularies from this size on take :func:`greedy_tokens`' two reductions; smaller ones ``torch.argmax`` (one H100,
``bench/results/argmax_h100_9799eb6.json``: a 128256 vocabulary took 26 / 27 / 27 us in ``torch.argmax`` at batch
1 / 8 / 64 and 11 / 13 us in two reductions of 334-long chunks at batch 1 / 8, 21 / 23 us of 768 / 501-long ones at
64; a 32000 vocabulary 8.7 us in one, 11 in two)."""


@functools.lru_cache(maxsize=None)  # asked every decode step: the divisor search stays off the step's host path
def _argmax_chunk(vocab: int, rows: int = 1) -> Optional[int]:
    """The chunk length :func:`greedy_tokens` splits a row into: the divisor of ``vocab`` in [64, 4096] nearest
    ``sqrt(vocab)`` (twice that for more than 16 rows, where the chunks' count matters less than their length);
    ``None`` where the vocabulary is below :data:`TWO_STAGE_VOCAB` or has no such divisor."""
    if vocab < TWO_STAGE_VOCAB:
        return None
    want = (2.0 if rows > 16 else 1.0) * vocab ** 0.5
    divisors = [c for c in range(64, min(4096, vocab // 2) + 1) if vocab % c == 0]
    return min(divisors, key=lambda c: abs(c - want)) if divisors else None


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of ``[B, vocab]`` logits (the first index of each row's maximum; a NaN counts as the
    maximum), for large vocabularies in two reductions: the maximum of each chunk of the row, then the first chunk
    holding the row's maximum. ``torch.argmax`` reduces a row in one thread block (26 us a step for one row of a
    128k vocabulary on an H100); chunks spread it over the GPU. See :data:`TWO_STAGE_VOCAB`."""
    ok = logits.dim() == 2 and logits.stride(-1) == 1
    chunk = _argmax_chunk(logits.shape[-1], logits.shape[0]) if ok else None
    if chunk is None:
        return logits.argmax(-1)
    b, v = logits.shape
    top, where = logits.view(b, v // chunk, chunk).max(-1)  # per chunk: its maximum and that maximum's first index
    first = top.argmax(-1)  # the first chunk holding the row's maximum
    return where.gather(1, first[:, None]).squeeze(1) + first * chunk


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, gen):
    """Next token ``[B]`` from last-position logits ``[B, vocab]`` (on the device, no host sync)."""
    if not do_sample:
        return greedy_tokens(logits)
    x = logits.float() / temperature
    if top_k > 0:
        kth = x.topk(min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = x.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(x.softmax(-1), 1, generator=gen).squeeze(1)


def _check_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p) -> None:
    if getattr(model, "_tpfuse", None) is None:
        raise TPFuseInputError("generate needs a model wrapped by tpfuse.parallelize")
    if input_ids.dim() != 2:
        raise TPFuseInputError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise TPFuseInputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not (temperature > 0 and top_k >= 0 and 0 < top_p <= 1):
        raise TPFuseInputError(f"need temperature > 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, "
                               f"{top_p}")
    check_room(model._tpfuse, input_ids, attention_mask, max_new_tokens, "generate")


class _Progress:
    """A one-line progress bar on stderr (rank 0 only) counting new tokens (the prefill makes the first, each decode
    step one more), redrawn every ~5% after a device sync, so the rate it shows is the GPU's, not the host's
    queueing rate."""

    def __init__(self, total: int, enabled: bool, device):
        self.total, self.enabled, self.device = total, enabled and total > 1, device
        self.every = max(1, total // 20) if sys.stderr.isatty() else total  # a log file gets the last line only
        self.t0 = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled or (done % self.every and done != self.total):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        bar = "#" * (30 * done // self.total)
        print(f"\r[{bar:<30}] {done}/{self.total} new tokens, {dt / max(done - 1, 1) * 1e3:.2f} ms/step", end="",
              file=sys.stderr, flush=True)
        if done == self.total:
            print(file=sys.stderr, flush=True)


def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: Optional[int] = None, pad_token_id: int = 0, seed: int = 0, check_every: int = 16,
             progress: bool = False, on_token: Optional[Callable[[torch.Tensor], None]] = None) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens for each row of ``input_ids [B, L]`` (left-padded prompts with
    ``attention_mask``, or unpadded ones). Greedy, or sampling (``temperature``, ``top_k``, ``top_p``; ``seed``
    seeds the device generator, identically on every rank). Stops early when every row produced ``eos_token_id``.
    ``on_token``: called with each step's new tokens ``[B]`` (on the device) as soon as they are chosen, e.g. to
    stream text; reading them syncs the host with the device every step, so leave it out when timing.
    Collective: call on every rank with the same arguments."""
    _check_args(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    comm = model._tpfuse.comm
    dev = comm.device
    gen = torch.Generator(device=dev).manual_seed(seed) if do_sample else None
    src = dist.get_global_rank(comm.group, 0) if comm.tp > 1 else None  # looked up once, not per step
    pick = (lambda lg: _share(_pick(lg, do_sample, temperature, top_k, top_p, gen), comm, src))
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids.to(dev), attention_mask=None if attention_mask is None else attention_mask.to(dev),
                logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    tok = pick(out.logits[:, -1])
    if on_token is not None:
        on_token(tok)
    _sync(dev)
    t1 = time.perf_counter()
    done = torch.zeros_like(tok, dtype=torch.bool)
    toks = [tok]
    bar = _Progress(max_new_tokens, progress and comm.rank == 0, dev)
    for i in range(1, max_new_tokens):
        if eos_token_id is not None:
            done |= tok == eos_token_id
            if i % check_every == 0 and bool(done.all()):
                break
        tok = pick(model(tok[:, None], cache=cache).logits[:, -1])
        if eos_token_id is not None:
            tok = tok.masked_fill(done, pad_token_id)
        toks.append(tok)
        if on_token is not None:
            on_token(tok)
        bar.update(i + 1)
    _sync(dev)
    t2 = time.perf_counter()
    new = torch.stack(toks, dim=1)
    return GenerateOutput(sequences=torch.cat([input_ids.to(dev), new], dim=1), new_tokens=len(toks),
                          prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3)


def _share(tok: torch.Tensor, comm, src: Optional[int]) -> torch.Tensor:
    """Rank ``src``'s tokens on every rank (``None``: TP=1, nothing to share)."""
    return tok if src is None else collectives.broadcast_(tok, src, comm.group, backend=comm.backend)


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
