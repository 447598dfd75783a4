"""Decode attention with the step's RoPE and KV-cache write folded in (:func:`tpfuse.attention.rope_decode_attention`):
Triton kernels vs the plain-torch reference vs an fp64 oracle.

Where the kernel cases run (``test_case_*``, the ``kernels`` fixture of tests/conftest.py): compiled on a GPU;
through the Triton interpreter on a CPU-only machine (small shapes, forced small partitions so the multi-split
paths run). GPU machines add big shapes, CUDA-graph capture + replay with new lengths, positions and projections,
and ``torch.compile(fullgraph=True)``.

Adversarial inputs (on top of :func:`test_decode_attention.make_inputs`' NaN-poisoned cache, shuffled and shared
blocks and strided, poisoned ``out``): the slot of each sequence's new key holds NaN before the call, so a tile that
reads it instead of taking the key from registers (or reads it before it is written) makes NaN; q, k and v are
views of one qkv row; lengths put the new key first, last and alone in a partition, in a sequence of one key, and
past ``max_seq_len`` (clamped: the key goes to ``max_seq_len - 1``); an empty sequence writes nothing. Two sequences
share a block, as prefix caching does, but never the block a new key goes to (the op's precondition:
:func:`make_step` asserts it).

Checks: ``out`` elementwise against the fp64 attention of the reference's rounded roped q over the kernel's cache
(within one final rounding), and against the reference; the new k in the cache within 2 units in the last place
of the fp64 roped (QK-normed) k plus the fp32 rotation's own error (bf16 / fp16 / fp32 cache) or one e4m3 step of
it (FP8), the new v byte for byte the reference's; every other cache byte unchanged; q, k and v unchanged.
"""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, capture, gpu_only, poisoned, record_launches
from test_decode_attention import (assert_elementwise, assert_fused_combine_ran, assert_fused_where_split,
                                   assert_within_one_step, fuse_combine, make_inputs)
from test_rope import make_cos_sin_cache

from tpfuse import attention as A
from tpfuse import rope as R
from tpfuse.errors import TPFuseInputError
from tpfuse.reference import rmsnorm_math
from tpfuse.tolerance import assert_close

FP8 = torch.float8_e4m3fn
kernel_case = pytest.mark.usefixtures("kernels")


# --------------------------------------------------------------------------------------------------------------
# helpers


def make_step(gen, *, lens, hq, hkv, d, block_size=16, dtype=torch.bfloat16, fp8=False, qk_norm=False,
              max_seq_len=None):
    """:func:`make_inputs` plus this step's k / v columns, positions, a RoPE table and QK-norm weights; the new
    key's slot of every sequence is poisoned (NaN). No new key may go to a block another sequence reads (the op's
    precondition: a shared prefix block is full): asserted here."""
    x = make_inputs(gen, lens=lens, hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype, fp8=fp8, q_std=1.0)
    bsz = len(lens)
    x["qkv"][:, hq * d: (hq + 2 * hkv) * d] = (torch.randn(bsz, 2 * hkv * d, generator=gen) * 2.0).to(dtype)
    cap = x["bt"].shape[1] * block_size if max_seq_len is None else max_seq_len
    slots = A.new_key_slots(x["bt"], x["sl"], block_size, cap)
    n = x["sl"].clamp(0, cap)
    for b in range(bsz):
        for o in range(bsz):
            read = x["bt"][o, : -(-max(int(n[o]) - 1, 0) // block_size)].tolist()  # the blocks o's keys < n-1 use
            assert o == b or slots[b] < 0 or int(slots[b]) // block_size not in read, "a new key in a shared block"
    for c in (x["kc"], x["vc"]):
        flat = c.view(-1, hkv, d)
        flat[slots[slots >= 0]] = poisoned((int((slots >= 0).sum()), hkv, d), c.dtype)
    x["pos"] = torch.randint(0, 4096, (bsz,), generator=gen)
    x["cs"] = make_cos_sin_cache(4096, d)
    x["qw"] = x["kw"] = None
    if qk_norm:
        x["qw"] = (torch.rand(d, generator=gen) + 0.5).to(dtype)
        x["kw"] = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    x["slots"], x["cap"], x["hkv"] = slots, cap, hkv
    return x


def qkv_views(qkv, hq, hkv, d):
    t = qkv.shape[0]
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d: (hq + 2 * hkv) * d].view(t, hkv, d)
    return q, k, v


def roped(x, w, pos, cs, eps, gemma=False):
    """``(y, mag)`` fp64 ``[B, H, D]``: the (QK-normed) roped heads ``x``, the oracle of the kernel's q / new k
    before rounding, and ``|y1| |c| + |y2| |s|`` per element, the scale of the rotation's own rounding error."""
    y = x.double()
    if w is not None:
        y = rmsnorm_math(y, w, eps, gemma)
    c, s = R.cos_sin(cs, pos, torch.float64)
    y1, y2 = y.abs().chunk(2, dim=-1)
    c, s = c.abs()[:, None, :], s.abs()[:, None, :]
    mag = torch.cat((y1 * c + y2 * s, y2 * c + y1 * s), dim=-1)
    return R.rope_math(y, *R.cos_sin(cs, pos, torch.float64), True), mag


def run_step(gen, device, *, lens, hq, hkv, d, block_size=16, dtype=torch.bfloat16, fp8=False, qk_norm=False,
             max_seq_len=None, gemma=False, **forced):
    """Run the op on ``device`` (the public op, or the launcher with ``forced`` config overrides) and check it
    (module docstring); returns ``(out, key_cache, value_cache)`` on the CPU."""
    x = make_step(gen, lens=lens, hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype, fp8=fp8, qk_norm=qk_norm,
                  max_seq_len=max_seq_len)
    bsz, eps = len(lens), 1e-6
    qkv, kc, vc, bt, sl, pos, cs = (x[n].to(device) for n in ("qkv", "kc", "vc", "bt", "sl", "pos", "cs"))
    kvs = None if x["kv_scale"] is None else x["kv_scale"].to(device)
    qw, kw = (None if w is None else w.to(device) for w in (x["qw"], x["kw"]))
    q, k, v = qkv_views(qkv, hq, hkv, d)
    out_base = poisoned((bsz, hq * d + 24), dtype, device)
    out = out_base[:, : hq * d].view(bsz, hq, d)
    norm = dict(q_norm_weight=qw, k_norm_weight=kw, qk_eps=eps, gemma=gemma)
    if not forced:
        got = A.rope_decode_attention(q, k, v, pos, cs, kc, vc, bt, sl, scale=x["scale"], kv_scale=kvs, out=out,
                                      max_seq_len=max_seq_len, **norm)
        assert got is out
    else:
        from tpfuse.kernels.decode_attention import launch_rope_decode_attention

        launch_rope_decode_attention(q, k, v, pos, cs, kc, vc, bt, sl, out, x["scale"], kvs, max_seq_len=x["cap"],
                                     **norm, **forced)
    tag = f"lens={lens[:6]} hq={hq} hkv={hkv} d={d} {dtype} fp8={fp8} qk_norm={qk_norm} gemma={gemma} {forced}"
    res, kc_got, vc_got = out.cpu(), kc.cpu(), vc.cpu()
    check_cache(x, kc_got, vc_got, hq, d, eps, gemma, dtype, tag)
    # reference: the unfused sequence on the CPU, from the same inputs
    kc_ref, vc_ref = x["kc"].clone(), x["vc"].clone()
    q0, k0, v0 = qkv_views(x["qkv"], hq, hkv, d)
    ref = A.rope_decode_attention_ref(q0, k0, v0, x["pos"], x["cs"], kc_ref, vc_ref, x["bt"], x["sl"],
                                      scale=x["scale"], kv_scale=x["kv_scale"], max_seq_len=max_seq_len,
                                      q_norm_weight=x["qw"], k_norm_weight=x["kw"], qk_eps=eps, gemma=gemma)
    q_ref = R.rope_math(rmsnorm_math(q0.float(), x["qw"], eps, gemma) if qk_norm else q0.float(),
                        *R.cos_sin(x["cs"], x["pos"]), True).to(dtype)
    oracle = A.decode_attention_math(q_ref, kc_got, vc_got, x["bt"], x["sl"], scale=x["scale"],
                                     kv_scale=x["kv_scale"], max_seq_len=max_seq_len, dtype=torch.float64)
    assert_elementwise(res, oracle, dtype, tag)
    assert_close(res, ref.float(), dtype, tag + " vs reference")
    n = x["sl"].clamp(0, x["cap"])
    assert (res[n <= 0] == 0).all(), tag + ": empty sequences must give exactly 0"
    pad = out_base[:, hq * d:].cpu()
    assert torch.equal(pad.view(torch.uint8), poisoned(pad.shape, dtype).view(torch.uint8)), tag + ": padding written"
    assert torch.equal(qkv.cpu().view(torch.uint8), x["qkv"].view(torch.uint8)), tag + ": q / k / v changed"
    return res, kc_got, vc_got


def check_cache(x, kc_got, vc_got, hq, d, eps, gemma, dtype, tag):
    """The new k / v at each sequence's new-key slot (module docstring), every other byte unchanged."""
    hkv, slots = x["hkv"], x["slots"]
    valid = slots >= 0
    s = slots[valid]
    q0, k0, v0 = qkv_views(x["qkv"], hq, hkv, d)
    k_or, mag = roped(k0[valid], x["kw"], x["pos"][valid], x["cs"], eps, gemma)
    kflat, vflat = kc_got.view(-1, hkv, d), vc_got.view(-1, hkv, d)
    if x["kv_scale"] is not None:
        from tpfuse.tolerance import fp8_step

        kvs = x["kv_scale"].double()
        deq = kflat[s].double() * kvs
        assert ((deq - k_or).abs() <= fp8_step(k_or / kvs) * kvs * 1.01).all(), tag + ": new k off the oracle"
        assert torch.equal(vflat[s].view(torch.uint8), R.cache_quant(v0[valid], x["kv_scale"]).view(torch.uint8)), \
            tag + ": new v"
    else:
        # 2 units in the last place of the result, plus the fp32 norm and rotation's error, which a cancelling
        # rotation makes large next to the result (bound: a few fp32 roundings of |y1 c| + |y2 s|)
        ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -23}[dtype]
        err = (kflat[s].double() - k_or).abs()
        assert (err <= 2 * ulp * k_or.abs() + 2.0 ** -20 * mag).all(), tag + ": new k off the oracle"
        assert torch.equal(vflat[s].view(torch.uint8), v0[valid].contiguous().view(torch.uint8)), tag + ": new v"
    for name, got, before in (("key_cache", kflat, x["kc"]), ("value_cache", vflat, x["vc"])):
        keep = torch.ones(got.shape[0], dtype=torch.bool)
        keep[s] = False
        assert torch.equal(got[keep].view(torch.uint8), before.view(-1, hkv, d)[keep].view(torch.uint8)), \
            f"{tag}: {name} changed outside the new keys' slots"


# --------------------------------------------------------------------------------------------------------------
# reference path (CPU, plain torch) and the public function's checks: always run here


def test_reference_is_the_unfused_sequence(gen):
    """The reference equals rope_kv_cache_write's reference (at :func:`new_key_slots`) then decode attention's,
    bit for bit, and with QK-norm qk_norm_rope's reference then the cache write."""
    for qk_norm in (False, True):
        x = make_step(gen, lens=[0, 1, 17, 33], hq=8, hkv=2, d=32, qk_norm=qk_norm)
        q0, k0, v0 = qkv_views(x["qkv"], 8, 2, 32)
        kc1, vc1, kc2, vc2 = x["kc"].clone(), x["vc"].clone(), x["kc"].clone(), x["vc"].clone()
        out = A.rope_decode_attention_ref(q0, k0, v0, x["pos"], x["cs"], kc1, vc1, x["bt"], x["sl"],
                                          scale=x["scale"], q_norm_weight=x["qw"], k_norm_weight=x["kw"],
                                          qk_eps=1e-6)
        if qk_norm:
            qkv = x["qkv"][:, : 12 * 32].clone()
            qr, kr = R.qk_norm_rope_ref(qkv, x["qw"], x["kw"], x["cs"], x["pos"], num_heads=8, num_kv_heads=2,
                                        head_dim=32, eps=1e-6, is_neox=True)
            qr, kr = qr.view(-1, 8, 32), kr.view(-1, 2, 32)
            R.kv_cache_write_ref(kr, v0, kc2, vc2, x["slots"])
        else:
            qr, _ = R.rope_kv_cache_write_ref(q0, k0, v0, x["pos"], x["cs"], kc2, vc2, x["slots"], is_neox=True)
        expect = A.decode_attention_ref(qr, kc2, vc2, x["bt"], x["sl"], scale=x["scale"])
        assert torch.equal(out.view(torch.int16), expect.view(torch.int16))
        assert torch.equal(kc1.view(torch.int16), kc2.view(torch.int16))
        assert torch.equal(vc1.view(torch.int16), vc2.view(torch.int16))
        assert not torch.isnan(out[1:].float()).any()  # the poisoned new-key slots were written before the read


def test_new_key_slots():
    bt = torch.tensor([[5, 2, 9], [7, 1, 3]], dtype=torch.int32)
    sl = torch.tensor([17, 0], dtype=torch.int32)
    assert A.new_key_slots(bt, sl, 16).tolist() == [2 * 16 + 0, -1]
    assert A.new_key_slots(bt, torch.tensor([16, 48]), 16).tolist() == [5 * 16 + 15, 3 * 16 + 15]
    assert A.new_key_slots(bt, torch.tensor([40, 1]), 16, max_seq_len=20).tolist() == [2 * 16 + 3, 7 * 16]


def test_public_op_cpu_reference_path(gen, monkeypatch):
    monkeypatch.delenv("TPFUSE_TRITON_CPU", raising=False)
    run_step(gen, "cpu", lens=[0, 1, 17, 33], hq=8, hkv=2, d=64)
    run_step(gen, "cpu", lens=[5, 16], hq=4, hkv=4, d=32, fp8=True, qk_norm=True)


def test_opcheck_fake_impl(gen, monkeypatch):
    monkeypatch.delenv("TPFUSE_TRITON_CPU", raising=False)
    x = make_step(gen, lens=[3, 20], hq=4, hkv=2, d=32, qk_norm=True)
    qkv = torch.nan_to_num(x["qkv"].float()).bfloat16()  # opcheck sums the inputs
    q, k, v = (t.clone() for t in qkv_views(qkv, 4, 2, 32))
    kc, vc = (torch.nan_to_num(c.float()).bfloat16() for c in (x["kc"], x["vc"]))
    out = torch.zeros(2, 4, 32, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.tpfuse.rope_decode_attention_.default,
                          (q, k, v, x["pos"], x["cs"], kc, vc, x["bt"], x["sl"], out, x["scale"], 32, None, x["qw"],
                           x["kw"], 1e-6, False))


def test_input_validation():
    q = torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 2, 64, dtype=torch.bfloat16)
    kc = torch.zeros(3, 16, 2, 64, dtype=torch.bfloat16)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    sl = torch.ones(2, dtype=torch.int32)
    pos = torch.zeros(2, dtype=torch.int64)
    cs = torch.zeros(8, 64)
    w = torch.ones(64, dtype=torch.bfloat16)

    def call(**kw):
        a = dict(q=q, k=k, v=k, positions=pos, cos_sin_cache=cs, key_cache=kc, value_cache=kc, block_tables=bt,
                 seq_lens=sl, scale=0.1)
        a.update(kw)
        return A.rope_decode_attention(**a)

    assert call().shape == q.shape
    assert call(q_norm_weight=w, k_norm_weight=w).shape == q.shape
    bad = [dict(k=k[:, :1]), dict(v=k.float()), dict(k=torch.zeros(2, 2, 32, dtype=torch.bfloat16)),
           dict(k=torch.zeros(2, 2, 64, 2, dtype=torch.bfloat16)[..., 0]),  # non-unit last stride
           dict(k=torch.zeros(2, 1, 64, dtype=torch.bfloat16), v=torch.zeros(2, 1, 64, dtype=torch.bfloat16)),
           dict(positions=pos[:1]), dict(positions=pos.float()), dict(positions=torch.zeros(4, dtype=torch.int64)[::2]),
           dict(seq_lens=torch.ones(4, dtype=torch.int32)[::2]), dict(cos_sin_cache=cs[:, :32]),
           dict(cos_sin_cache=cs.long()), dict(q_norm_weight=w), dict(q_norm_weight=w[:32], k_norm_weight=w[:32]),
           dict(key_cache=kc.to(FP8), value_cache=kc.to(FP8)), dict(seq_lens=sl[:1]), dict(max_seq_len=33),
           dict(q=q.float())]
    for kw in bad:
        with pytest.raises(TPFuseInputError):
            call(**kw)


def test_public_op_launches_the_fused_kernel(gen, kernels, monkeypatch):
    """Under the ``kernels`` fixture the public op runs the fused split kernel (and the combine), never the RoPE
    kernel nor the plain split kernel."""
    launches = []
    for mod, name in ((kernels.decode_attention, "_rope_split_kernel"), (kernels.decode_attention, "_split_kernel"),
                      (kernels.decode_attention, "_combine_kernel"), (kernels.rope, "_rope_kv_cache_kernel")):
        record_launches(monkeypatch, mod, name, launches)
    run_step(gen, DEVICE, lens=[17, 3], hq=4, hkv=2, d=64)
    names = [kw.get("QK_NORM", "other") for _, kw in launches]
    assert len(launches) in (1, 2) and names[0] is False, names  # _rope_split_kernel (QK_NORM=False), combine


# --------------------------------------------------------------------------------------------------------------
# kernel cases: Triton interpreter (CPU) or CUDA

HKV = 8 if ON_GPU else 2
GROUPS = [(HKV, HKV), (4 * HKV, HKV), (8 * HKV, HKV)]
# partition 16: the new key last / first and alone in a partition; make_inputs shares the first block of the first
# two sequences of >= 16 keys (17 and 33: their new keys lie past it)
EDGE_LENS = [0, 1, 15, 17, 33, 16]


@kernel_case
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
@pytest.mark.parametrize("hq,hkv", GROUPS, ids=["g1", "g4", "g8"])
def test_case_gqa_edge_lengths(gen, hq, hkv, qk_norm):
    run_step(gen, DEVICE, lens=EDGE_LENS, hq=hq, hkv=hkv, d=64, qk_norm=qk_norm, num_splits=4, min_partition=16,
             block_n=16)


@kernel_case
@pytest.mark.parametrize("single", [False, True], ids=["split", "single"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
def test_case_fp8_cache(gen, single, qk_norm):
    cfg = dict(num_splits=1, min_partition=64, block_n=32) if single else dict(num_splits=4, min_partition=16,
                                                                                block_n=16)
    run_step(gen, DEVICE, lens=EDGE_LENS, hq=4 * HKV, hkv=HKV, d=128, fp8=True, qk_norm=qk_norm, **cfg)


@kernel_case
@pytest.mark.parametrize("single", [False, True], ids=["split", "single"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
def test_case_fp8_cache_f16_loop(gen, kernels, monkeypatch, single, qk_norm):
    """``decode_attention.FP8_F16``: the rope kernel's tile loop in fp16 over an e4m3 cache keeps the oracle's
    bounds and writes the same cache bytes; the launches asked for it."""
    from tpfuse.kernels import decode_attention as dak

    monkeypatch.setattr(dak, "FP8_F16", True)
    rec = record_launches(monkeypatch, dak, "_rope_split_kernel")
    cfg = dict(num_splits=1, min_partition=64, block_n=32) if single else dict(num_splits=4, min_partition=16,
                                                                                block_n=16)
    run_step(gen, DEVICE, lens=EDGE_LENS + [77], hq=4 * HKV, hkv=HKV, d=128, fp8=True, qk_norm=qk_norm, **cfg)
    run_step(gen, DEVICE, lens=[100, 37, 0, 64, 3, 129], hq=8, hkv=2, d=64, block_size=32, fp8=True)
    assert [kw["F16_MMA"] for _, kw in rec.launches] == [True, True]


@kernel_case
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_case_public_op_heuristic(gen, fp8):
    # the launcher's own config; lengths that end mid-tile and mid-block, one empty sequence
    run_step(gen, DEVICE, lens=[100, 37, 0, 64, 3, 129], hq=8, hkv=2, d=64, block_size=32, fp8=fp8)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_case_q_dtypes(gen, dtype):
    run_step(gen, DEVICE, lens=[1, 20, 47], hq=8, hkv=2, d=64, dtype=dtype, num_splits=2, min_partition=32,
             block_n=16)


@kernel_case
def test_case_qk_norm_gemma_and_fp32(gen):
    # Gemma's (1 + weight) norm; an fp32 q / cache with QK-norm (fp32 arithmetic checked at fp32 precision)
    run_step(gen, DEVICE, lens=[1, 20, 47], hq=8, hkv=2, d=64, qk_norm=True, gemma=True, num_splits=2,
             min_partition=32, block_n=16)
    run_step(gen, DEVICE, lens=[1, 20, 47], hq=8, hkv=2, d=64, dtype=torch.float32, qk_norm=True, num_splits=2,
             min_partition=32, block_n=16)


FUSED_ROPE_KERNELS = ("_rope_split_kernel", "_rope_split_combine_kernel", "_combine_kernel", "_split_kernel")


@kernel_case
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
def test_case_fused_combine(gen, kernels, monkeypatch, qk_norm, fp8):
    """The combine in the rope-split kernel's last programs (``decode_attention.FUSE_COMBINE``): the edge lengths
    (the new key first, last and alone in a partition; one partition: written directly; none: zeros), then the
    launcher's own config; only the fused kernel runs and the ticket counters are zero after each launch."""
    mod = kernels.decode_attention
    recs = fuse_combine(monkeypatch, mod, FUSED_ROPE_KERNELS)
    run_step(gen, DEVICE, lens=EDGE_LENS, hq=4 * HKV, hkv=HKV, d=64, fp8=fp8, qk_norm=qk_norm, num_splits=3,
             min_partition=16, block_n=16)  # 3 x 16 keys hold the longest (33); a split count not a power of two
    run_step(gen, DEVICE, lens=[100, 37, 0, 64, 3, 129], hq=8, hkv=2, d=64, block_size=32, fp8=fp8,
             qk_norm=qk_norm)
    assert_fused_combine_ran(mod, recs, f"rope fused combine qk_norm={qk_norm} fp8={fp8}",
                             fused="_rope_split_combine_kernel")


@kernel_case
def test_case_clamped_to_max_seq_len(gen):
    # seq_lens past max_seq_len: the new key is key max_seq_len - 1 (and only keys before it are attended)
    run_step(gen, DEVICE, lens=[40, 5, 33], hq=8, hkv=2, d=64, max_seq_len=33, num_splits=3, min_partition=16,
             block_n=16)


@kernel_case
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
@pytest.mark.parametrize("hoist", [1, 2])
def test_case_hoisted_loads(gen, kernels, monkeypatch, hoist, qk_norm):
    """``hoist`` 1 / 2 (``decode_attention.HOIST_MAX_BATCH``): the kernel that reads its lengths, cos / sin, block ids
    (and first K / V tile) before its PDL wait keeps the oracle's bounds and gives the default kernel's bits and cache bytes, with
    one tile a partition (the new key first, last and alone in one), several tiles a partition and one split; the
    hoisted kernel and its combine ran, and an FP8 cache stays on the default kernel."""
    mod = kernels.decode_attention
    rec = record_launches(monkeypatch, mod, "_rope_split_hoist_kernel")
    comb = record_launches(monkeypatch, mod, "_combine_kernel")
    configs = [(EDGE_LENS + [40], dict(num_splits=4, min_partition=16, block_n=16)),
               ([47, 1, 33, 0, 64], dict(num_splits=2, min_partition=48, block_n=16)),
               ([47, 1, 30, 0], dict(num_splits=1, min_partition=16, block_n=16))]
    for lens, cfg in configs:
        runs = []
        for level in (0, hoist):
            g = torch.Generator().manual_seed(11)
            runs.append(run_step(g, DEVICE, lens=lens, hq=4 * HKV, hkv=HKV, d=64, qk_norm=qk_norm, hoist=level,
                                 **cfg))
        assert_same_bits(*runs)
    assert [kw["HOIST"] for _, kw in rec.launches] == [hoist] * 3
    assert [kw.get("HOIST", False) for _, kw in comb.launches] == [False, True, False, True]  # no combine: 1 split
    run_step(gen, DEVICE, lens=[5, 20], hq=4, hkv=2, d=64, fp8=True, hoist=hoist, num_splits=2, min_partition=16,
             block_n=16)
    assert len(rec.launches) == 3
    with pytest.raises(ValueError, match="hoist must be"):
        mod.hoist_level(3, False)


def test_hoist_rule():
    """``HOIST_MAX_BATCH``: level 1 for PDL launches of batch 1 with a 16-bit cache and no prefetch asked, else 0;
    ``HOIST_LOADS`` and an explicit level override it (an FP8 cache never hoists)."""
    from tpfuse.kernels import decode_attention as dak

    assert dak.HOIST_LOADS is None and dak.HOIST_MAX_BATCH == 1
    assert dak.hoist_level(None, False, 1) == 1 and dak.hoist_level(None, False, 2) == 0
    assert dak.hoist_level(None, False, 1, pdl_on=False) == 0 and dak.hoist_level(None, False, 1, prefetch=True) == 0
    assert dak.hoist_level(None, True, 1) == 0 and dak.hoist_level(2, True, 1) == 0
    assert dak.hoist_level(2, False, 64, prefetch=True, pdl_on=False) == 2 and dak.hoist_level(0, False, 1) == 0


# --------------------------------------------------------------------------------------------------------------
# GPU only


@gpu_only
@pytest.mark.parametrize("combine", ["kernel", "fused"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
@pytest.mark.parametrize("bsz", [1, 8, 64])
def test_gpu_model_shapes(gen, monkeypatch, bsz, qk_norm, fp8, combine):
    from tpfuse.kernels import decode_attention as dak

    monkeypatch.setattr(dak, "FUSE_COMBINE", combine == "fused")
    recs = {name: record_launches(monkeypatch, dak, name) for name in FUSED_ROPE_KERNELS}
    # the 8B's heads (32 / 8, D 128) at decode batches, 256-token blocks, contexts around 1k, the shipped configs
    lens = torch.randint(900, 1100, (bsz,), generator=gen).tolist()
    run_step(gen, DEVICE, lens=lens, hq=32, hkv=8, d=128, block_size=256, fp8=fp8, qk_norm=qk_norm)
    if combine == "fused":  # bf16 at B=64: one split, nothing to combine
        assert recs["_rope_split_combine_kernel"].launches or (bsz == 64 and not fp8)
        assert_fused_where_split(recs, f"model shapes B={bsz} fp8={fp8}", plain="_rope_split_kernel")


@gpu_only
@pytest.mark.parametrize("combine", ["kernel", "fused"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
@pytest.mark.parametrize("bsz", [3, 8, 16, 32])
def test_gpu_split_candidate_model_shapes(gen, monkeypatch, bsz, qk_norm, combine):
    """The bf16 split rule's candidate (``decode_attention.SPLIT_WAVES`` 4 / ``MULTI_SPLIT_TILE`` 64: 8 splits of
    64-key tiles at B 8) at the 8B's heads, contexts just past multiples of 128 keys: the builds it launches are
    checked as the shipped ones are, before it can be the default."""
    from tpfuse.kernels import decode_attention as dak

    monkeypatch.setattr(dak, "SPLIT_WAVES", 4)
    monkeypatch.setattr(dak, "MULTI_SPLIT_TILE", 64)
    monkeypatch.setattr(dak, "FUSE_COMBINE", combine == "fused")
    recs = {name: record_launches(monkeypatch, dak, name) for name in FUSED_ROPE_KERNELS}
    lens = torch.randint(1025, 1100, (bsz,), generator=gen).tolist()
    run_step(gen, DEVICE, lens=lens, hq=32, hkv=8, d=128, block_size=256, qk_norm=qk_norm)
    tiles = [kw["BLOCK_N"] for r in recs.values() for _, kw in r.launches if "BLOCK_N" in kw]  # the split kernels
    assert tiles and set(tiles) == {64}, tiles


@gpu_only
@pytest.mark.parametrize("combine", ["kernel", "fused"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_gpu_cuda_graph_capture_replay(gen, monkeypatch, fp8, combine):
    """Captured once (the capture's warm-up call writes each sequence's poisoned new-key slot), replayed over
    several steps with new lengths, positions and projections written into the captured tensors: each replay is
    NaN-free and equals an eager call on a copy of the caches, bit for bit, and the caches match too."""
    from tpfuse.kernels import decode_attention as dak

    monkeypatch.setattr(dak, "FUSE_COMBINE", combine == "fused")
    x = make_step(gen, lens=[300, 17, 1, 64], hq=8, hkv=2, d=128, fp8=fp8, qk_norm=True)
    qkv, kc, vc, bt, sl, pos, cs = (x[n].cuda() for n in ("qkv", "kc", "vc", "bt", "sl", "pos", "cs"))
    kvs = None if x["kv_scale"] is None else x["kv_scale"].cuda()
    qw, kw = x["qw"].cuda(), x["kw"].cuda()
    q, k, v = qkv_views(qkv, 8, 2, 128)

    def step():
        return A.rope_decode_attention(q, k, v, pos, cs, kc, vc, bt, sl, scale=x["scale"], kv_scale=kvs,
                                       q_norm_weight=qw, k_norm_weight=kw, qk_eps=1e-6)

    recs = {name: record_launches(monkeypatch, dak, name) for name in FUSED_ROPE_KERNELS}
    graph, out = capture(step)
    if combine == "fused":  # B=4 x 2 kv heads: 16 / 32 splits, fused in the warm-up and the capture
        assert len(recs["_rope_split_combine_kernel"].launches) == 2
        assert_fused_where_split(recs, f"graph fp8={fp8}", plain="_rope_split_kernel")
    for it in range(4):
        sl += 1
        pos.copy_(torch.randint(0, 4096, pos.shape, generator=gen))
        qkv[:, : 12 * 128].copy_(torch.randn(4, 12 * 128, generator=gen).to(qkv.dtype))
        kc2, vc2 = kc.clone(), vc.clone()
        eager = A.rope_decode_attention(q, k, v, pos, cs, kc2, vc2, bt, sl, scale=x["scale"], kv_scale=kvs,
                                        q_norm_weight=qw, k_norm_weight=kw, qk_eps=1e-6)
        graph.replay()
        torch.cuda.synchronize()
        assert not torch.isnan(out).any(), f"replay {it}: NaN (a key read before it was written)"
        assert torch.equal(out.view(torch.int16), eager.view(torch.int16)), f"replay {it}"
        assert torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8)), f"replay {it}: key cache"
        assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8)), f"replay {it}: value cache"


@gpu_only
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
@pytest.mark.parametrize("bsz", [1, 8, 64])
def test_gpu_fp8_f16_loop_model_shapes(gen, monkeypatch, bsz, qk_norm):
    """``decode_attention.FP8_F16`` at the 8B's heads and the shipped configs (B 1 / 8 / 64, 256-token blocks,
    contexts around 1k, e4m3 cache): within the oracle's bounds (run_step), and the cache bytes it writes equal the
    bf16 loop's."""
    from tpfuse.kernels import decode_attention as dak

    lens = torch.randint(900, 1100, (bsz,), generator=gen).tolist()
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    runs = []
    for f16 in (False, True):
        monkeypatch.setattr(dak, "FP8_F16", f16)
        rec = record_launches(monkeypatch, dak, "_rope_split_kernel")
        runs.append(run_step(torch.Generator().manual_seed(seed), DEVICE, lens=lens, hq=32, hkv=8, d=128,
                             block_size=256, fp8=True, qk_norm=qk_norm))
        assert [kw["F16_MMA"] for _, kw in rec.launches] == [f16]
    (o0, k0, v0), (o1, k1, v1) = runs
    assert torch.equal(k0.view(torch.uint8), k1.view(torch.uint8)) and torch.equal(v0.view(torch.uint8),
                                                                                  v1.view(torch.uint8))
    assert_within_one_step(o0, o1, f"f16 loop vs bf16 loop, B={bsz} qk_norm={qk_norm}")


def assert_same_bits(a, b):
    """Two launches' ``(out, key_cache, value_cache)`` equal bit for bit (and no NaN in the output)."""
    (o0, k0, v0), (o1, k1, v1) = a, b
    assert not torch.isnan(o1).any()
    assert torch.equal(o0.view(torch.int16), o1.view(torch.int16))
    assert torch.equal(k0.view(torch.uint8), k1.view(torch.uint8)) and torch.equal(v0.view(torch.uint8),
                                                                                  v1.view(torch.uint8))


@gpu_only
@pytest.mark.parametrize("bsz", [1, 8, 64])
def test_gpu_fp8_f16_loop_under_pdl(gen, monkeypatch, bsz):
    """``decode_attention.FP8_F16`` in the PDL builds the model's decode graphs launch: the rope kernel's output and
    caches under ``pdl.launches`` equal, bit for bit, the same fp16-loop launch without PDL (which
    test_gpu_fp8_f16_loop_model_shapes checks against the oracle): 8B heads, e4m3 cache, model configs."""
    from tpfuse.kernels import decode_attention as dak
    from tpfuse.kernels import pdl

    if not pdl.available(torch.device("cuda")):
        pytest.skip("no PDL on this GPU / stack")
    monkeypatch.setattr(dak, "FP8_F16", True)
    lens = torch.randint(900, 1100, (bsz,), generator=gen).tolist()
    x = make_step(gen, lens=lens, hq=32, hkv=8, d=128, block_size=256, fp8=True)
    qkv, kc, vc, bt, sl, pos, cs = (x[n].cuda() for n in ("qkv", "kc", "vc", "bt", "sl", "pos", "cs"))
    q, k, v = qkv_views(qkv, 32, 8, 128)
    results = []
    for on in (False, True):
        rec = record_launches(monkeypatch, dak, "_rope_split_kernel")
        kc2, vc2 = kc.clone(), vc.clone()
        with pdl.launches(on):
            out = A.rope_decode_attention(q, k, v, pos, cs, kc2, vc2, bt, sl, scale=x["scale"],
                                          kv_scale=x["kv_scale"].cuda())
        torch.cuda.synchronize()
        assert [(kw["F16_MMA"], kw["PDL"]) for _, kw in rec.launches] == [(True, on)]
        results.append((out, kc2, vc2))
    assert_same_bits(*results)


def _rope_prefetch_same_bits(monkeypatch, gen, bsz, fp8, const, runs):
    """The rope kernel under PDL at 8B heads (model configs, contexts around 1k), once per ``(PREFETCH, next weight
    or None)`` of ``runs``: its constexpr ``const`` is > 0 in every launch exactly where that run asks for the
    prefetch it stands for, and every run's output and caches equal the first's bit for bit."""
    from tpfuse.kernels import decode_attention as dak
    from tpfuse.kernels import pdl

    if not pdl.available(torch.device("cuda")):
        pytest.skip("no PDL on this GPU / stack")
    lens = torch.randint(900, 1100, (bsz,), generator=gen).tolist()
    x = make_step(gen, lens=lens, hq=32, hkv=8, d=128, block_size=256, fp8=fp8)
    qkv, kc, vc, bt, sl, pos, cs = (x[n].cuda() for n in ("qkv", "kc", "vc", "bt", "sl", "pos", "cs"))
    kvs = None if x["kv_scale"] is None else x["kv_scale"].cuda()
    q, k, v = qkv_views(qkv, 32, 8, 128)
    results = []
    monkeypatch.setattr(dak, "HOIST_LOADS", 0)  # the prefetching builds against the default kernel's
    for kv_prefetch, weight in runs:
        monkeypatch.setattr(dak, "PREFETCH", kv_prefetch)
        rec = record_launches(monkeypatch, dak, "_rope_split_kernel")
        kc2, vc2 = kc.clone(), vc.clone()
        with pdl.launches(True):
            out = A.rope_decode_attention(q, k, v, pos, cs, kc2, vc2, bt, sl, scale=x["scale"], kv_scale=kvs,
                                          prefetch=weight)
        torch.cuda.synchronize()
        want = kv_prefetch if const == "PF_KEYS" else weight is not None
        got = [kw.get(const, 0) for _, kw in rec.launches]
        assert got and all((g > 0) == want for g in got), (const, want, got)
        results.append((out, kc2, vc2))
    assert_same_bits(*results)


@gpu_only
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
@pytest.mark.parametrize("bsz", [1, 8, 64])
def test_gpu_kv_prefetch_under_pdl(gen, monkeypatch, bsz, fp8):
    """``decode_attention.PREFETCH`` under PDL: the rope kernel prefetches its partition's first K / V tile before
    the wait (``PF_KEYS``), and its output and caches equal, bit for bit, the same launch without the prefetch
    (the prefetch touches the new key's slot, written after the wait)."""
    _rope_prefetch_same_bits(monkeypatch, gen, bsz, fp8, "PF_KEYS", [(False, None), (True, None)])


@gpu_only
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
@pytest.mark.parametrize("heads", [(32, 8), (8, 1)], ids=["8B", "70Btp8"])
@pytest.mark.parametrize("bsz", [1, 8, 64])
def test_gpu_hoisted_loads_under_pdl(gen, monkeypatch, bsz, heads, qk_norm):
    """``decode_attention.HOIST_LOADS`` 0 / 1 / 2 in the PDL builds the model's decode graphs launch (the 8B's heads and
    a 70B TP 8 rank's, model configs, contexts around 1k): output and caches equal, bit for bit, the default
    kernel's under PDL (which the tests above check against the oracle); the hoisted kernel and its combine ran
    where asked."""
    from tpfuse.kernels import decode_attention as dak
    from tpfuse.kernels import pdl

    if not pdl.available(torch.device("cuda")):
        pytest.skip("no PDL on this GPU / stack")
    hq, hkv = heads
    lens = torch.randint(900, 1100, (bsz,), generator=gen).tolist()
    x = make_step(gen, lens=lens, hq=hq, hkv=hkv, d=128, block_size=256, qk_norm=qk_norm)
    qkv, kc, vc, bt, sl, pos, cs = (x[n].cuda() for n in ("qkv", "kc", "vc", "bt", "sl", "pos", "cs"))
    qw, kw = (None, None) if not qk_norm else (x["qw"].cuda(), x["kw"].cuda())
    q, k, v = qkv_views(qkv, hq, hkv, 128)
    results = []
    for level in (0, 1, 2):
        monkeypatch.setattr(dak, "HOIST_LOADS", level)
        rec = record_launches(monkeypatch, dak, "_rope_split_hoist_kernel")
        kc2, vc2 = kc.clone(), vc.clone()
        with pdl.launches(True):
            out = A.rope_decode_attention(q, k, v, pos, cs, kc2, vc2, bt, sl, scale=x["scale"], q_norm_weight=qw,
                                          k_norm_weight=kw, qk_eps=1e-6)
        torch.cuda.synchronize()
        assert [(kw_["HOIST"], kw_["PDL"]) for _, kw_ in rec.launches] == ([(level, True)] if level else [])
        results.append((out, kc2, vc2))
    assert_same_bits(results[0], results[1])
    assert_same_bits(results[0], results[2])


def test_next_prefetch_lines_stay_inside_the_range():
    """``PF_NEXT``: a power of two, every program's lines inside the tensor (a short tail is left out), capped;
    nothing off CUDA (the interpreter has no prefetch instruction) or below one line a program."""
    from tpfuse.kernels import decode_attention as dak

    assert dak.next_prefetch_lines(4096 * 4096 * 2, 128) == 2048  # the 8B's bf16 o_proj at batch 1: all of it
    assert dak.next_prefetch_lines(4096 * 4096, 128) == 1024  # its e4m3 o_proj
    assert dak.next_prefetch_lines(1 << 34, 1) == dak.NEXT_PF_MAX_LINES
    assert dak.next_prefetch_lines(127, 1) == 0 and dak.next_prefetch_lines(128 * 5, 8) == 0
    for nbytes, programs in ((100 * 128, 7), (3 * 1024 * 1024 + 5, 96), (128 * 2048 * 64, 64)):
        lines = dak.next_prefetch_lines(nbytes, programs)
        assert lines & (lines - 1) == 0 and programs * lines * 128 <= nbytes and nbytes // 128 // programs < 2 * lines
    assert dak.next_prefetch(torch.zeros(1 << 20), 4) == {} and dak.next_prefetch(None, 4) == {}


def test_prefetch_is_dropped_where_it_cannot_run_and_must_share_the_device(gen, kernels, monkeypatch):
    """``prefetch=`` is a hint: where the kernel cannot issue it (the Triton interpreter on CPU: inline PTX) the
    fused kernel launches without ``PF_NEXT`` / ``pf_ptr`` and gives the same bits; on a GPU the launch takes it and
    still gives the same bits (both launches recorded). A tensor on another device is refused before any launch."""
    from tpfuse.kernels import decode_attention as dak

    x = make_step(gen, lens=[3, 20], hq=4, hkv=2, d=32)
    dev = torch.device(DEVICE)
    q, k, v = (t.to(dev) for t in qkv_views(x["qkv"], 4, 2, 32))
    pos, cs, bt, sl = (x[n].to(dev) for n in ("pos", "cs", "bt", "sl"))
    rec = record_launches(monkeypatch, dak, "_rope_split_kernel")
    outs = []
    for prefetch in (None, torch.ones(256, 256, device=dev)):
        kc, vc = x["kc"].to(dev).clone(), x["vc"].to(dev).clone()  # each run writes its new key into its own
        out = A.rope_decode_attention(q, k, v, pos, cs, kc, vc, bt, sl, scale=x["scale"], prefetch=prefetch)
        outs.append((out, kc, vc))
    pf = [kw.get("PF_NEXT", 0) for _, kw in rec.launches]
    assert len(pf) == 2 and pf[0] == 0 and (pf[1] > 0) == ON_GPU, pf
    assert_same_bits(*outs)
    with pytest.raises(TPFuseInputError, match="prefetch must be on"):
        A.rope_decode_attention(q, k, v, pos, cs, x["kc"].to(dev), x["vc"].to(dev), bt, sl, scale=x["scale"],
                                prefetch=torch.empty(4, device="meta"))


@gpu_only
@pytest.mark.parametrize("bsz", [1, 8])
def test_gpu_next_weight_prefetch_under_pdl(gen, monkeypatch, bsz):
    """``prefetch=`` (``KVCacheConfig.prefetch_o_proj``) under PDL: every program of the rope kernel prefetches its
    share of a 32 MiB weight before its wait (``PF_NEXT``), and the output and caches equal, bit for bit, the same
    launch without it."""
    weight = torch.randn(4096, 4096, device="cuda").bfloat16()
    _rope_prefetch_same_bits(monkeypatch, gen, bsz, False, "PF_NEXT", [(False, None), (False, weight)])


@gpu_only
def test_gpu_torch_compile_fullgraph(gen):
    x = make_step(gen, lens=[300, 0, 17], hq=8, hkv=2, d=128)
    qkv, kc, vc, bt, sl, pos, cs = (x[n].cuda() for n in ("qkv", "kc", "vc", "bt", "sl", "pos", "cs"))
    q, k, v = qkv_views(qkv, 8, 2, 128)

    def f(q, k, v, kc, vc):  # elementwise ops around the op only: eager and compiled round identically
        return A.rope_decode_attention(q * 1.0, k, v, pos, cs, kc, vc, bt, sl, scale=x["scale"]) + 1.0

    kc2, vc2 = kc.clone(), vc.clone()
    eager = f(q, k, v, kc, vc)
    comp = torch.compile(f, fullgraph=True)(q, k, v, kc2, vc2)
    torch.cuda.synchronize()
    assert torch.equal(eager, comp)
    assert torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8))
