"""The decode graph's PDL fallback (tpfuse/parallel/graphs.py): PDL is on by default, so a capture that fails with
it is captured again without it (one warning, later buckets skip the attempt); a capture that fails without PDL,
or with one of tpfuse's own errors, raises as before. CPU only: the capture itself is replaced."""

import types
import warnings

import pytest
import torch

from tpfuse.errors import TPFusePeerError
from tpfuse.kernels import pdl as pdl_launch
from tpfuse.parallel import graphs


def _storage():
    return types.SimpleNamespace(device=torch.device("cpu"), max_batch=4,
                                 block_tables=torch.zeros(5, 2, dtype=torch.int32))


def _fake_capture(fail_with_pdl=None, fail_always=None):
    calls = []

    def capture(self, pool):
        calls.append(pdl_launch._ON[0])
        if fail_always is not None:
            raise fail_always
        if pdl_launch._ON[0] and fail_with_pdl is not None:
            raise fail_with_pdl
        self.graph = "captured"

    return capture, calls


def test_a_capture_that_fails_with_pdl_is_captured_without_it(monkeypatch):
    capture, calls = _fake_capture(fail_with_pdl=RuntimeError("operation not permitted when stream is capturing"))
    monkeypatch.setattr(graphs._BucketGraph, "_capture", capture)
    dg = graphs.DecodeGraphs.__new__(graphs.DecodeGraphs)
    dg.storage, dg.buckets, dg.step, dg.pdl, dg.pool, dg.graphs = _storage(), [1, 2], None, True, None, {}
    monkeypatch.setattr(graphs._BucketGraph, "run", lambda self, ids, pos, rope: self.pdl)
    with pytest.warns(UserWarning, match="programmatic dependent launch failed"):
        assert dg.run(torch.zeros(1, dtype=torch.long), None, None) is False
    assert calls == [True, False] and dg.pdl is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next bucket does not try (nor warn) again
        assert dg.run(torch.zeros(2, dtype=torch.long), None, None) is False
    assert calls == [True, False, False]


@pytest.mark.parametrize("pdl, error", [(False, RuntimeError("capture failed")),
                                        (True, TPFusePeerError("rank 1 did not answer"))])
def test_other_capture_failures_raise(monkeypatch, pdl, error):
    capture, calls = _fake_capture(fail_always=error)
    monkeypatch.setattr(graphs._BucketGraph, "_capture", capture)
    with pytest.raises(type(error)):
        graphs._BucketGraph(1, False, _storage(), None, None, pdl)
    assert calls == [pdl]
