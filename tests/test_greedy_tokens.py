"""``tpfuse.parallel.generate.greedy_tokens``: the two-reduction argmax of greedy decoding equals ``torch.argmax``
(first index of the maximum, NaN as the maximum) on real vocabulary sizes, ties across and within chunks, rows that
are all equal or all -inf, and sizes with no chunk (``torch.argmax`` itself)."""

import pytest
import torch

from tpfuse.parallel.generate import _argmax_chunk, greedy_tokens

VOCABS = [128256, 32000, 151936, 65537, 102400, 256000, 131]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_tokens_equal_argmax(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    rows = 8 if vocab != 151936 else 24  # more than 16 rows: the longer chunks
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    chunk = _argmax_chunk(vocab, rows) or vocab // 4
    x[1, 3] = x[1, vocab - 1] = 40.0  # a tie across chunks: the first index wins
    x[2, chunk + 5] = x[2, chunk + 6] = 40.0  # a tie inside one chunk (not the first)
    x[3] = 0.0  # every entry equal
    x[4] = float("-inf")
    x[5, vocab // 2] = float("nan")  # NaN counts as the maximum
    x[5, vocab - 2] = float("nan")
    x[6, vocab - 1] = 1e4  # the maximum in the last chunk
    want = x.argmax(-1)
    assert torch.equal(greedy_tokens(x), want)
    assert int(want[1]) == 3 and int(want[6]) == vocab - 1


def test_greedy_tokens_of_a_strided_view_and_chunk_choice():
    logits = torch.randn(3, 4, 128256)  # [B, L, V]: the step's last position is a row-strided view
    last = logits[:, -1]
    assert last.stride() == (4 * 128256, 1)
    assert torch.equal(greedy_tokens(last), last.argmax(-1))
    assert _argmax_chunk(128256) == 334 and _argmax_chunk(128256, 64) == 668  # nearest sqrt(V) (x2: many rows)
    assert _argmax_chunk(32000) is None  # a small vocabulary: torch.argmax
    assert _argmax_chunk(65537) is None  # a prime: torch.argmax
    assert torch.equal(greedy_tokens(last[:, ::2]), last[:, ::2].argmax(-1))  # not unit stride: torch.argmax
