"""The shared quant epilogue's building blocks (``kernels/quant_epilogue.py``), through small test kernels: the
e2m1 encoder against ``tpfuse.quant.e2m1_encode`` on every code's edges (ties, neighbours, subnormals, Inf, NaN of
both signs), and the older ``quant_store(vals, cols, mask, ...)`` form against the tile form and the reference
quantizer. Compiled on a GPU; through the Triton interpreter on CPU (the ``kernels`` fixture and
``kernel_env.jit``, tests/kernel_env.py)."""

import pytest
import torch
import triton
import triton.language as tl

import kernel_env
from kernel_env import DEVICE, jit
from local_cases import as_bytes, assert_bytes_equal, hard_input, ref_quantize
from tpfuse import ops
from tpfuse import quant as q

pytestmark = pytest.mark.usefixtures("kernels", "poisoned_outputs")

# the epilogue's @jit functions, bound when the test kernels below are defined (interpreted ones on CPU)
_epilogue = kernel_env.kernels().quant_epilogue
_e2m1_encode = _epilogue.e2m1_encode
_quant_store = _epilogue.quant_store
_quant_store_tile = _epilogue.quant_store_tile


def _e2m1_probe_values():
    """Every sign x a spread of exponents around the e2m1 range x mantissas incl. the tie points, the exact e2m1
    values and their fp32 neighbours, zeros, subnormals, Inf, NaN with both signs and several payloads."""
    bits = []
    for sign in (0, 0x80000000):
        for exp in list(range(0, 8)) + list(range(100, 140)) + list(range(248, 256)):
            for mant in (0, 1, 0x1FFFFF, 0x200000, 0x200001, 0x3FFFFF, 0x400000, 0x400001, 0x5FFFFF, 0x600000,
                         0x600001, 0x7FFFFF, 0x123456, 0x654321):
                bits.append(sign | (exp << 23) | mant)
    edges = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0, 448.0])
    e = edges.view(torch.int32)
    near = torch.cat([e - 1, e, e + 1]).to(torch.int64) & 0xFFFFFFFF
    allb = torch.tensor(bits, dtype=torch.int64)
    allb = torch.cat([allb, near, near | 0x80000000, torch.tensor([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF])])
    allb = torch.where(allb >= 2**31, allb - 2**32, allb).to(torch.int32)
    return allb.view(torch.float32)


@jit
def _e2m1_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(o_ptr + offs, _e2m1_encode(tl.load(x_ptr + offs, mask=m, other=0.0)), mask=m)


@jit
def _both_forms_kernel(x_ptr, o1, s1, o2, s2, gs_ptr, n_cols, out_stride, scale_stride, FMT: tl.constexpr,
                       BLOCK: tl.constexpr, GROUP: tl.constexpr):
    c0 = tl.program_id(0) * BLOCK
    cols = c0 + tl.arange(0, BLOCK)
    mask = cols < n_cols
    v = tl.load(x_ptr + cols, mask=mask, other=0.0)
    row = tl.program_id(0) * 0
    _quant_store(v, cols, mask, row, o1, out_stride, s1, scale_stride, gs_ptr, 0, FMT, BLOCK, GROUP)
    _quant_store_tile(v, c0, n_cols, row, o2, out_stride, s2, scale_stride, gs_ptr, 0, FMT, BLOCK, GROUP)


def test_e2m1_encode_matches_reference_on_edges():
    v = _e2m1_probe_values()
    x = v.to(DEVICE)
    out = torch.empty(v.numel(), dtype=torch.uint8, device=DEVICE)
    _e2m1_kernel[(triton.cdiv(v.numel(), 1024),)](x, out, v.numel(), BLOCK=1024)
    want = q.e2m1_encode(v)
    bad = (out.cpu() != want).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. {v[bad[:4]].tolist()} -> " \
                             f"{out.cpu()[bad[:4]].tolist()} != {want[bad[:4]].tolist()}"
    assert set(want.tolist()) == set(range(16)) and torch.isnan(v).sum() >= 4  # every code, NaN of both signs


def test_quant_store_cols_form_matches_tile_form(gen):
    """The older ``quant_store(vals, cols, mask, ...)`` (kept for outside callers) writes what the tile form writes,
    for a tile that does not start at column 0 and runs past the row's end."""

    h = 384  # tiles of 256: the second one is half outside the row
    x = hard_input(gen, 1, h)
    gs = torch.tensor(3.0, device=DEVICE)
    for fmt, group, spec in ((3, 128, q.FP8PerGroup(128)), (4, 16, q.NVFP4(gs, "linear"))):
        a_d, a_s = ops.alloc_outputs(1, h, fmt, group, DEVICE, torch.float32)
        b_d, b_s = ops.alloc_outputs(1, h, fmt, group, DEVICE, torch.float32)
        _both_forms_kernel[(2,)](x, a_d, a_s, b_d, b_s, gs, h, a_d.stride(0), a_s.stride(0), FMT=fmt, BLOCK=256,
                                 GROUP=group)
        assert torch.equal(as_bytes(a_d), as_bytes(b_d)) and torch.equal(as_bytes(a_s), as_bytes(b_s))
        ref_qa = ref_quantize(x, spec)
        assert_bytes_equal(b_d, ref_qa.data, f"fmt {fmt} data")
        assert_bytes_equal(b_s, ref_qa.scale, f"fmt {fmt} scale")
