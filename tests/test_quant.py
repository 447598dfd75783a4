"""Reference quantizers: exact format checks (NVFP4 nibble order, e2m1 rounding, 128x4 swizzle, scale rule) against
independent scalar formulas, round-trip errors, NaN/Inf behaviour, spec validation."""

import math

import pytest
import torch

from tpfuse import quant as q
from tpfuse.errors import TPFuseInputError
from tpfuse.tolerance import REL_ERR_FP8, REL_ERR_NVFP4, assert_quant_close, rel_err


def test_e2m1_codes_roundtrip_and_ties():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = q.e2m1_decode(codes)
    assert vals.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]
    assert torch.equal(q.e2m1_encode(vals), codes)
    # ties round to the even code; beyond 6 saturates
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, 0.26, -0.74, -5.01])
    want = [0, 2, 2, 4, 4, 6, 6, 7, 7, 1, 8 | 1, 8 | 7]
    assert q.e2m1_encode(x).tolist() == want


def test_nvfp4_pack_low_nibble_is_even_element():
    codes = torch.tensor([[1, 2, 3, 4, 0xF, 0]], dtype=torch.uint8)
    packed = q.nvfp4_pack(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(q.nvfp4_unpack(packed), codes)


def _swizzled_offset_scalar(m, k, padded_cols):
    # written from the layout's definition: tiles [m_tiles, k_tiles, 32, 4, 4]
    m_tile, k_tile = m // 128, k // 4
    outer_m, inner_m, inner_k = m % 32, (m % 128) // 32, k % 4
    return ((m_tile * (padded_cols // 4) + k_tile) * 32 + outer_m) * 16 + inner_m * 4 + inner_k


@pytest.mark.parametrize("tokens,hidden", [(1, 16), (5, 48), (130, 256), (257, 80)])
def test_swizzle_128x4_positions(tokens, hidden):
    kc = hidden // 16
    ids = (torch.arange(tokens * kc) % 200 + 1).to(torch.uint8).reshape(tokens, kc)
    sf = ids.view(torch.float8_e4m3fn)
    sw = q.swizzle_128x4(sf)
    rows, cols = q.nvfp4_swizzled_shape(tokens, hidden)
    assert tuple(sw.shape) == (rows, cols) == (q.round_up(tokens, 128), q.round_up(kc, 4))
    flat = sw.view(torch.uint8).flatten()
    seen = torch.zeros_like(flat, dtype=torch.bool)
    for m in range(tokens):
        for k in range(kc):
            off = _swizzled_offset_scalar(m, k, cols)
            assert flat[off] == ids[m, k], (m, k)
            assert q.swizzled_offset(torch.tensor(m), torch.tensor(k), cols) == off
            seen[off] = True
    assert (flat[~seen] == 0).all(), "padding of the swizzled scales must be zero"
    assert torch.equal(q.unswizzle_128x4(sw, tokens, hidden).view(torch.uint8), ids)


def _nvfp4_block_scalar(block, gs):
    """One 16-element block quantized with python floats (only the e4m3 rounding borrows torch)."""
    amax = max(abs(v) for v in block)
    sf = torch.tensor(min(gs * (amax * (1 / 6)), 448.0), dtype=torch.float32).to(torch.float8_e4m3fn)
    sf_f = float(sf.float())
    out_scale = 1 / (sf_f * (1 / gs)) if sf_f != 0 else 0.0
    grid = [0, .5, 1, 1.5, 2, 3, 4, 6]
    codes = []
    for v in block:
        a = min(abs(torch.tensor(v, dtype=torch.float32).item() * out_scale), 6.0)
        best = min(range(8), key=lambda i: (abs(grid[i] - a), i % 2))  # nearest, ties to even code
        codes.append(best | (8 if v < 0 else 0))
    return sf, codes


def test_nvfp4_matches_scalar_definition(gen):
    x = torch.randn(3, 64, generator=gen) * 3
    x[1, 5] = 40.0  # outlier: its block's scale grows, neighbours go to 0
    gs = q.nvfp4_global_scale(x.abs().amax())
    qa = q.quantize(x, q.NVFP4(gs, layout="linear"))
    codes = q.nvfp4_unpack(qa.data)
    for t in range(3):
        for b in range(4):
            blk = x[t, b * 16:(b + 1) * 16].tolist()
            sf, want = _nvfp4_block_scalar(blk, float(gs))
            assert qa.scale[t, b].view(torch.uint8) == sf.view(torch.uint8), (t, b)
            assert codes[t, b * 16:(b + 1) * 16].tolist() == want, (t, b)
    assert rel_err(qa.dequantize(torch.float32), x) < REL_ERR_NVFP4


def test_nvfp4_layouts_hold_the_same_scales(gen):
    x = torch.randn(200, 96, generator=gen).to(torch.bfloat16)
    gs = q.nvfp4_global_scale(x.float().abs().amax())
    lin = q.quantize(x, q.NVFP4(gs, layout="linear"))
    sw = q.quantize(x, q.NVFP4(gs))
    assert torch.equal(lin.data, sw.data)
    assert tuple(sw.scale.shape) == (256, 8) and sw.scale.dtype == torch.float8_e4m3fn
    assert torch.equal(q.unswizzle_128x4(sw.scale, 200, 96).view(torch.uint8), lin.scale.view(torch.uint8))
    assert torch.equal(sw.dequantize(), lin.dequantize()) and sw.dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("spec", [q.FP8Static(0.06), q.FP8PerToken(), q.FP8PerGroup(128), q.FP8PerGroup(64)],
                         ids=["static", "per_token", "group128", "group64"])
def test_fp8_roundtrip(spec, gen):
    x = torch.randn(7, 256, generator=gen)
    x[3, 17] = 25.0  # outlier
    qa = q.quantize(x, spec)
    assert qa.data.dtype == torch.float8_e4m3fn and qa.data.shape == x.shape
    assert rel_err(qa.dequantize(torch.float32), x) < REL_ERR_FP8
    assert_quant_close(qa, x, "roundtrip")
    if isinstance(spec, q.FP8PerToken):
        assert qa.scale.shape == (7, 1)
        assert torch.allclose(qa.scale, x.abs().amax(-1, keepdim=True) / 448)
    if isinstance(spec, q.FP8PerGroup):
        assert qa.scale.shape == (7, 256 // spec.group_size)
        # the largest element of every group maps to +-448 exactly
        g = qa.data.float().reshape(7, -1, spec.group_size).abs().amax(-1)
        assert torch.equal(g, torch.full_like(g, 448.0))


def test_fp8_static_saturates_and_propagates_nan():
    x = torch.tensor([[1.0, -1e6, float("inf"), float("nan")]])
    d = q.quantize(x, q.FP8Static(1.0)).data.float()
    assert d[0, 0] == 1 and d[0, 1] == -448 and d[0, 2] == 448 and torch.isnan(d[0, 3])


def test_fp8_dynamic_zero_row_and_nan_row():
    x = torch.zeros(2, 32)
    x[1, 3] = float("nan")
    qa = q.quantize(x, q.FP8PerToken())
    assert qa.scale[0, 0] == pytest.approx(q.FP8_MIN_SCALE) and (qa.data[0].float() == 0).all()
    assert torch.isnan(qa.scale[1, 0]) and torch.isnan(qa.dequantize(torch.float32)[1]).all()


def test_nvfp4_nan_poisons_its_block_only():
    x = torch.ones(1, 32)
    x[0, 20] = float("nan")
    deq = q.quantize(x, q.NVFP4(1.0, layout="linear")).dequantize(torch.float32)
    assert torch.isnan(deq[0, 16:]).all() and not torch.isnan(deq[0, :16]).any()


def test_assert_quant_close_catches_a_wrong_element(gen):
    x = torch.randn(4, 64, generator=gen)
    for spec in (q.FP8PerToken(), q.NVFP4(q.nvfp4_global_scale(x.abs().amax()), layout="linear")):
        qa = q.quantize(x, spec)
        assert_quant_close(qa, x, "clean")
        if isinstance(spec, q.NVFP4):
            lo = int(qa.data[2, 3]) & 0x7
            qa.data[2, 3] = (int(qa.data[2, 3]) & 0xF8) | (0 if lo >= 4 else 7)  # move one code >= 3 grid steps
        else:
            qa.data.view(torch.uint8)[2, 3] ^= 0x40  # flip an exponent bit
        # FP8: the message points at the corrupted element (row 2, column 3 of 64)
        with pytest.raises(AssertionError, match=None if isinstance(spec, q.NVFP4) else "worst at flat index 131:"):
            assert_quant_close(qa, x, "corrupted")


@pytest.mark.parametrize("bad,match", [
    (lambda: q.check_spec(q.FP8Static(torch.tensor([1.0, 2.0])), 64, torch.device("cpu")), "scalar"),
    (lambda: q.check_spec(q.FP8Static(torch.tensor(1.0, dtype=torch.float64)), 64, torch.device("cpu")), "float32"),
    (lambda: q.check_spec(q.FP8Static(torch.tensor(1.0, device="meta")), 64, torch.device("cpu")), "is on meta"),
    (lambda: q.check_spec(q.FP8PerGroup(128), 192, torch.device("cpu")), "hidden % 128"),
    (lambda: q.check_spec(q.NVFP4(1.0), 40, torch.device("cpu")), "hidden % 16"),
    (lambda: q.NVFP4(1.0, layout="swizzled"), "layout"),
    (lambda: q.FP8PerGroup(100), "multiple of 16"),
    (lambda: q.FP8Static("1.0"), "float or an fp32"),
    (lambda: q.check_spec("fp8", 64, torch.device("cpu")), "quant must be"),
])
def test_spec_errors(bad, match):
    with pytest.raises(TPFuseInputError, match=match):
        bad()


def test_empty_like_quantized_shapes():
    for spec, dshape, sshape in [(q.FP8PerToken(), (5, 64), (5, 1)), (q.FP8PerGroup(32), (5, 64), (5, 2)),
                                 (q.NVFP4(1.0), (5, 32), (128, 4)), (q.NVFP4(1.0, "linear"), (5, 32), (5, 4))]:
        qa = q.empty_like_quantized((5, 64), spec, "cpu", torch.bfloat16)
        assert tuple(qa.data.shape) == dshape and tuple(qa.scale.shape) == sshape
        ref = q.quantize(torch.randn(5, 64), spec)
        assert qa.data.dtype == ref.data.dtype and qa.scale.dtype == ref.scale.dtype
        assert qa.scale.shape == ref.scale.shape
    assert math.isclose(q.FP8_MIN_SCALE * 448 * 512, 1.0)


def test_number_scale_follows_the_op_to_its_device():
    """A spec built from a Python number works on any device (its scale is made there once and kept); a tensor
    scale stays where the caller put it, and a wrong device raises."""
    spec = q.FP8Static(0.05)
    on_cpu = spec.scale
    q.check_spec(spec, 64, torch.device("meta"))
    on_meta = spec.scale
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float32 and on_meta.dim() == 0
    q.check_spec(spec, 64, torch.device("cpu"))
    assert spec.scale is on_cpu and spec.scale.item() == pytest.approx(0.05)
    q.check_spec(spec, 64, torch.device("meta"))
    assert spec.scale is on_meta  # made once per device, then kept
    nv = q.NVFP4(100.0, layout="linear")
    q.check_spec(nv, 64, torch.device("meta"))
    assert nv.global_scale.device.type == "meta"
    with pytest.raises(TPFuseInputError, match="FP8Static.scale is on cpu"):
        q.check_spec(q.FP8Static(torch.tensor(0.05)), 64, torch.device("meta"))
    with pytest.raises(TPFuseInputError, match="NVFP4.global_scale is on cpu"):
        q.check_spec(q.NVFP4(torch.tensor(1.0)), 64, torch.device("meta"))


def test_number_scale_is_never_first_placed_inside_a_graph_capture(monkeypatch):
    # a fill recorded in a capture would leave the kept scale unwritten until the first replay: a clear error instead
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(TPFuseInputError, match="inside a CUDA-graph capture: use it once before capturing"):
        q.check_spec(q.FP8Static(0.05), 64, torch.device("cuda", 0))
