"""The async-TP all-gather buffer layout (``tpfuse.backends.async_tp.ag_layout`` / ``ag_bytes``), checked on the CPU:
every call's slots fit the buffer allocated for ``max_tokens``, never overlap, and start (data and row-wise scales)
at 16-byte boundaries, as ``torch._scaled_mm`` / cuBLASLt need; the dense layout is the ``[TP * S, H]`` rows."""

import pytest

from tpfuse.backends.async_tp import ag_bytes, ag_layout, slot_rows
from tpfuse.sharding import shard_rows


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("hidden", [16, 48, 1024])
@pytest.mark.parametrize("max_tokens", [1, 7, 65, 301])
def test_ag_layout_fits_and_aligns(tp, hidden, max_tokens):
    cap = ag_bytes(max_tokens, tp, hidden, 2)
    for t in range(max_tokens + 1):
        slots = slot_rows(t, tp)
        dense = ag_layout(t, tp, hidden, 2, None)
        s = shard_rows(t, tp)
        assert dense == [(q * s * hidden * 2, n * hidden * 2, 0) for q, (_, n) in enumerate(slots)]
        assert all(off + db <= cap for off, db, _ in dense)
        for kind in ("tensor", "row"):
            lay = ag_layout(t, tp, hidden, 2, kind)
            end = 0
            for (off, db, sb), (_, n) in zip(lay, slots):
                assert off % 16 == 0 and (off + db) % 16 == 0, (t, kind, off, db)
                assert off >= end, "slots overlap"
                assert db == n * hidden and sb == (4 * n if kind == "row" else 0)
                end = off + db + sb
            assert end <= cap, (t, kind, end, cap)
