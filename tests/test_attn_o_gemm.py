"""The decode attention's split combine folded into o_proj (:mod:`tpfuse.attention_o`): the split kernel's
normalized partials and the o_proj kernel that combines them, vs the plain-torch references and an fp64 oracle.

Kernel cases (``test_case_*``, the ``kernels`` fixture): compiled on a GPU, through the Triton interpreter on a
CPU-only machine (small shapes, forced small partitions). Inputs are :func:`test_rope_decode_attention.make_step`'s:
NaN-poisoned cache slots and new-key slots, shared prefix blocks, q / k / v as views of one qkv row, lengths that put
the new key first, last and alone in a partition, an empty sequence and one of a single key. The partial buffers
start as NaN (``torch.empty`` poisoned), so a partial the GEMM reads that the split kernel did not write shows.

Checks: the caches as :func:`tpfuse.attention.rope_decode_attention` writes them; the partials (``m``, ``l``, ``p``
of the partitions that hold keys) against :func:`tpfuse.attention_o.partials_math` of the same roped q and cache;
their combination against the fp64 attention oracle; ``attn_o_gemm`` / ``attn_o_gemm_add`` against the fp64 product
of that combination (empty sequences exactly 0); which kernels ran (no combine kernel).
"""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, capture, gpu_only, record_launches
from test_rope_decode_attention import check_cache, make_step, qkv_views

from tpfuse import attention as A
from tpfuse import attention_o as AO
from tpfuse import rope as R
from tpfuse.errors import TPFuseInputError
from tpfuse.reference import rmsnorm_math, sumsq_partials
from tpfuse.tolerance import assert_close

kernel_case = pytest.mark.usefixtures("kernels")
EPS = 1e-6


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` as :mod:`tpfuse.attention_o` calls it gives NaN-filled floating tensors."""
    empty = torch.empty

    def nan_empty(*args, **kw):
        t = empty(*args, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(AO.torch, "empty", nan_empty)


def run_parts(gen, device, *, lens, hq, hkv, d, dtype=torch.bfloat16, qk_norm=False, block_size=16, **cfg):
    """The partials op on ``device``, checked (module docstring); returns ``(parts, oracle x [B, Hq * D] fp64)``."""
    x = make_step(gen, lens=lens, hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype, qk_norm=qk_norm)
    qkv, kc, vc, bt, sl, pos, cs = (x[n].to(device) for n in ("qkv", "kc", "vc", "bt", "sl", "pos", "cs"))
    qw, kw = (None if w is None else w.to(device) for w in (x["qw"], x["kw"]))
    q, k, v = qkv_views(qkv, hq, hkv, d)
    parts = AO.rope_decode_attention_partials(q, k, v, pos, cs, kc, vc, bt, sl, scale=x["scale"], q_norm_weight=qw,
                                              k_norm_weight=kw, qk_eps=EPS, **cfg)
    tag = f"lens={lens[:6]} hq={hq} hkv={hkv} d={d} {dtype} qk_norm={qk_norm} {cfg}"
    kc_got, vc_got = kc.cpu(), vc.cpu()
    check_cache(x, kc_got, vc_got, hq, d, EPS, False, dtype, tag)
    q0 = qkv_views(x["qkv"], hq, hkv, d)[0]
    q_ref = R.rope_math(rmsnorm_math(q0.float(), x["qw"], EPS) if qk_norm else q0.float(),
                        *R.cos_sin(x["cs"], x["pos"]), True).to(dtype)
    oracle = A.decode_attention_math(q_ref, kc_got, vc_got, x["bt"], x["sl"], scale=x["scale"], dtype=torch.float64)
    cpu = AO.AttentionPartials(parts.p.cpu(), parts.m.cpu(), parts.l.cpu(), parts.seq_lens.cpu(), parts.max_seq_len,
                               parts.num_splits, parts.min_partition, parts.block_n)
    ref_p, ref_m, ref_l = AO.partials_math(q_ref, kc_got, vc_got, x["bt"], x["sl"], scale=x["scale"],
                                           max_seq_len=parts.max_seq_len, num_splits=parts.num_splits,
                                           min_partition=parts.min_partition, block_n=parts.block_n,
                                           dtype=torch.float64)
    used = ref_l.view(len(lens), hq, -1)[:, 0] > 0  # [B, S]: the partitions that hold keys
    rows = used[:, None, :].expand(-1, hq, -1).reshape(-1)
    assert torch.allclose(cpu.m.double()[rows], ref_m[rows], rtol=1e-5, atol=1e-5), tag + ": m"
    assert torch.allclose(cpu.l.double()[rows], ref_l[rows], rtol=1e-5, atol=1e-5), tag + ": l"
    assert_close(cpu.p.double()[used], ref_p[used], dtype, tag + ": p")
    assert_close(AO.combine_math(cpu, torch.float64), oracle.reshape(len(lens), -1), dtype, tag + ": combined")
    return parts, oracle.reshape(len(lens), -1)


def check_gemm(parts, oracle_x, gen, n, dtype, tag, add=False):
    """``attn_o_gemm`` (``add``: ``attn_o_gemm_add``) against the fp64 product of the oracle's x; rows of empty
    sequences exactly 0 (plain form)."""
    dev = parts.p.device
    k = oracle_x.shape[1]
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    w[:, torch.randint(0, k, (3,), generator=gen)] *= 30.0  # outlier columns: one head's weights dominate
    w = w.to(dtype)
    y_ref = oracle_x @ w.double().T
    empty = parts.seq_lens.cpu().clamp(0, parts.max_seq_len) <= 0
    if not add:
        y = AO.attn_o_gemm(parts, w.to(dev)).cpu()
        assert y.shape == (oracle_x.shape[0], n) and y.dtype == dtype
        assert_close(y, y_ref, dtype, tag + ": attn_o_gemm")
        assert (y[empty] == 0).all(), tag + ": empty sequences"
        return y
    res = torch.randn(oracle_x.shape[0], n, generator=gen).to(dtype)
    nw = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    h, xn, sq = (t.cpu() for t in AO.attn_o_gemm_add(parts, w.to(dev), res.to(dev), nw.to(dev)))
    assert_close(h, y_ref + res.double(), dtype, tag + ": h")
    assert torch.equal(xn, (h.float() * nw.float()).to(dtype)), tag + ": x_next = round(h * norm_weight)"
    assert torch.allclose(sq, sumsq_partials(h.float(), 32), rtol=1e-5, atol=1e-6), tag + ": sumsq"
    return h


# --------------------------------------------------------------------------------------------------------------
# CPU: references, validation


def test_reference_path_matches_the_attention_reference(gen):
    """On CPU tensors (no interpreter) the ops are the references: the partials combine to
    :func:`tpfuse.attention.rope_decode_attention_ref`'s output, the GEMM is the product of that."""
    parts, oracle_x = run_parts(gen, "cpu", lens=[0, 1, 40, 300], hq=8, hkv=2, d=32, num_splits=4,
                                min_partition=16, block_n=16)
    check_gemm(parts, oracle_x, gen, 64, torch.bfloat16, "cpu reference")
    check_gemm(parts, oracle_x, gen, 64, torch.bfloat16, "cpu reference", add=True)


def test_partials_config_and_refusals(gen):
    q = torch.zeros(1, 8, 64, dtype=torch.bfloat16)
    kc = torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16)
    assert AO.partials_config(q, kc).num_splits == 16  # batch 1: 16 splits, 16 rows
    assert AO.partials_config(q, kc.to(torch.float8_e4m3fn)) is None  # FP8 cache
    assert AO.partials_config(q.float(), kc.float()) is None  # fp32
    assert AO.partials_config(torch.zeros(256, 8, 64, dtype=torch.bfloat16), kc) is None  # one split
    assert AO.partials_config(torch.zeros(8, 8, 64, dtype=torch.bfloat16), kc, num_splits=16) is None  # 128 rows
    assert AO.partials_config(q, kc, num_splits=1) is None
    wide = torch.zeros(3, 128, 64, dtype=torch.bfloat16)  # 128 heads x 4 x 16 rows: 8192 combine weights
    assert AO.partials_config(wide[:2], kc) is not None and AO.partials_config(wide, kc) is None
    x = make_step(gen, lens=[5], hq=8, hkv=2, d=64)
    q, k, v = qkv_views(x["qkv"], 8, 2, 64)
    args = (q, k, v, x["pos"], x["cs"], x["kc"], x["vc"], x["bt"], x["sl"])
    with pytest.raises(TPFuseInputError, match="no split partials"):
        AO.rope_decode_attention_partials(*args, scale=0.1, num_splits=1)
    parts = AO.rope_decode_attention_partials(*args, scale=0.1)
    for bad in (torch.zeros(64, 256, dtype=torch.bfloat16), torch.zeros(64, 512, dtype=torch.float16),
                torch.zeros(24, 512, dtype=torch.bfloat16), torch.zeros(512, 64, dtype=torch.bfloat16).T):
        with pytest.raises(TPFuseInputError, match="weight must be"):
            AO.attn_o_gemm(parts, bad)
    w = torch.zeros(64, 512, dtype=torch.bfloat16)
    for bad, match in ((dict(num_splits=8), "splits"), (dict(p=parts.p.transpose(1, 2)), "contiguous"),
                       (dict(m=parts.m[:-1]), "parts.m"), (dict(l=parts.l.double()), "parts.l"),
                       (dict(seq_lens=parts.seq_lens.float()), "seq_lens"), (dict(block_n=96), "multiple"),
                       (dict(p=torch.zeros(1, 16, 512, 64, dtype=torch.bfloat16), m=torch.zeros(1 << 13),
                             l=torch.zeros(1 << 13)), "combine weights")):
        with pytest.raises(TPFuseInputError, match=match):
            AO.attn_o_gemm(AO.AttentionPartials(**{**vars(parts), **bad}), w)
    w = torch.zeros(48, 512, dtype=torch.bfloat16)
    with pytest.raises(TPFuseInputError, match="multiple of 32"):
        AO.attn_o_gemm_add(parts, w, torch.zeros(1, 48, dtype=torch.bfloat16), torch.zeros(48, dtype=torch.bfloat16))
    w = torch.zeros(64, 512, dtype=torch.bfloat16)
    with pytest.raises(TPFuseInputError, match="residual must be"):
        AO.attn_o_gemm_add(parts, w, torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16))


def test_opcheck_fake_impls(gen):
    """The custom ops' fake impls agree with the real ones (shapes, dtypes, mutations)."""
    x = make_step(gen, lens=[5, 30], hq=8, hkv=2, d=32)
    q, k, v = qkv_views(x["qkv"], 8, 2, 32)
    parts = AO.rope_decode_attention_partials(q, k, v, x["pos"], x["cs"], x["kc"], x["vc"], x["bt"], x["sl"],
                                              scale=0.2, num_splits=4, min_partition=16, block_n=16)
    w = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    ints = (parts.max_seq_len, parts.num_splits, parts.min_partition, parts.block_n)
    torch.library.opcheck(torch.ops.tpfuse.attn_o_gemm, (parts.p, parts.m, parts.l, parts.seq_lens, w, *ints))
    torch.library.opcheck(torch.ops.tpfuse.attn_o_gemm_add,
                          (parts.p, parts.m, parts.l, parts.seq_lens, w, *ints, torch.zeros(2, 64, dtype=w.dtype),
                           torch.ones(64, dtype=w.dtype)))
    torch.library.opcheck(torch.ops.tpfuse.rope_decode_attention_parts_,
                          (q, k, v, x["pos"], x["cs"], x["kc"].clone(), x["vc"].clone(), x["bt"], x["sl"],
                           parts.p.clone(), parts.m.clone(), parts.l.clone(), 0.2, parts.max_seq_len, 4, 16, 16, None,
                           None, 0.0, False, -1))


# --------------------------------------------------------------------------------------------------------------
# kernel cases: Triton interpreter (CPU) or CUDA

HKV = 8 if ON_GPU else 2
EDGE_LENS = [0, 1, 15, 17, 33, 16]  # partitions of 16 keys: the new key first, last, alone; empty; one key


@kernel_case
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qknorm"])
@pytest.mark.parametrize("group", [1, 4], ids=["g1", "g4"])
def test_case_edge_lengths(gen, kernels, monkeypatch, group, qk_norm):
    """The partials and both GEMM forms at the edge lengths, 4 splits of 16-key partitions (6 sequences: 8 x 4
    rows); the split kernel ran with PARTS, no combine kernel."""
    mod = kernels.decode_attention
    split = record_launches(monkeypatch, mod, "_rope_split_kernel")
    comb = record_launches(monkeypatch, mod, "_combine_kernel")
    gemm = record_launches(monkeypatch, kernels.attn_o_gemm, "_attn_o_gemm_kernel")
    tag = f"g{group} qk_norm={qk_norm}"
    parts, ox = run_parts(gen, DEVICE, lens=EDGE_LENS, hq=group * HKV, hkv=HKV, d=32, qk_norm=qk_norm, num_splits=4,
                          min_partition=16, block_n=16)
    check_gemm(parts, ox, gen, 64, torch.bfloat16, tag)
    check_gemm(parts, ox, gen, 96, torch.bfloat16, tag, add=True)
    assert [kw.get("PARTS") for _, kw in split.launches] == [True] and not comb.launches
    assert [(kw["B_PAD"], kw["S_PAD"], kw["ADD_RES"]) for _, kw in gemm.launches] == [(8, 4, False), (8, 4, True)]


@kernel_case
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_case_full_rows_and_odd_splits(gen, dtype):
    """64 rows (4 sequences x 16 splits, several tiles a partition) and 3 splits (padded to 16 rows), fp16 too."""
    parts, ox = run_parts(gen, DEVICE, lens=[70, 129, 3, 48], hq=4, hkv=2, d=32, dtype=dtype, num_splits=16,
                          min_partition=16, block_n=16)
    check_gemm(parts, ox, gen, 32, dtype, "64 rows")
    parts, ox = run_parts(gen, DEVICE, lens=[100], hq=8, hkv=2, d=64, dtype=dtype, num_splits=3, min_partition=32,
                          block_n=16)
    check_gemm(parts, ox, gen, 64, dtype, "3 splits", add=True)


@kernel_case
def test_case_hoisted_kernel_same_partials(gen, kernels, monkeypatch):
    """The batch-1 launch that reads ahead of its PDL wait (``hoist`` 1) writes the same partials, bit for bit."""
    rec = record_launches(monkeypatch, kernels.decode_attention, "_rope_split_hoist_kernel")
    runs = []
    for hoist in (0, 1):
        parts, _ = run_parts(torch.Generator().manual_seed(3), DEVICE, lens=[77], hq=8, hkv=2, d=32, num_splits=8,
                             min_partition=16, block_n=16, hoist=hoist)
        used = torch.arange(8) < -(-77 // AO.partition_len(77, 8, 16, 16))  # the partitions that hold keys
        runs.append((parts.p.cpu()[:, used], parts.m.cpu().view(8, -1)[:, used], parts.l.cpu().view(8, -1)[:, used]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert [kw["PARTS"] for _, kw in rec.launches] == [True]


# --------------------------------------------------------------------------------------------------------------
# GPU only


@gpu_only
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("bsz", [1, 2, 4, 8])
def test_gpu_model_shapes(gen, bsz):
    """The 8B's heads at TP 1 / 2 / 8 (32 / 8, 16 / 4, 8 / 1 heads, D 128), 256-token blocks, contexts around 1k,
    the shipped launch rules."""
    lens = torch.randint(900, 1100, (bsz,), generator=gen).tolist()
    for hq, hkv in ((32, 8), (16, 4), (8, 1)):
        q = torch.zeros(bsz, hq, 128, dtype=torch.bfloat16, device="cuda")
        if AO.partials_config(q, torch.zeros(1, 256, hkv, 128, dtype=torch.bfloat16, device="cuda")) is None:
            continue
        parts, ox = run_parts(gen, DEVICE, lens=lens, hq=hq, hkv=hkv, d=128, block_size=256)
        check_gemm(parts, ox, gen, 4096, torch.bfloat16, f"B={bsz} {hq}/{hkv}")
        check_gemm(parts, ox, gen, 4096, torch.bfloat16, f"B={bsz} {hq}/{hkv}", add=True)


@gpu_only
def test_gpu_pdl_and_graph_replays_same_bits(gen):
    """Launched with PDL (the decode graphs' form, hoisted at batch 1) and replayed from a CUDA graph with new
    lengths: the same bits as eager launches without PDL."""
    from tpfuse.kernels import pdl

    x = make_step(gen, lens=[700], hq=32, hkv=8, d=128, block_size=256)
    qkv, kc, vc, bt, sl, pos, cs = (x[n].cuda() for n in ("qkv", "kc", "vc", "bt", "sl", "pos", "cs"))
    q, k, v = qkv_views(qkv, 32, 8, 128)
    w = (torch.randn(4096, 4096, generator=gen) / 64).to(torch.bfloat16).cuda()
    kc0, vc0 = kc.clone(), vc.clone()

    def step():
        parts = AO.rope_decode_attention_partials(q, k, v, pos, cs, kc, vc, bt, sl, scale=x["scale"])
        return AO.attn_o_gemm(parts, w)

    step()
    kc.copy_(kc0)
    vc.copy_(vc0)
    with pdl.launches(True):
        graph, out = capture(step)
    for n in (700, 701, 512, 64):  # within the sequence's 3 blocks (the 4th is a NaN-poisoned one)
        sl.fill_(n)
        pos.fill_(n - 1)
        kc.copy_(kc0)
        vc.copy_(vc0)
        eager = step()
        kc.copy_(kc0)
        vc.copy_(vc0)
        graph.replay()
        torch.cuda.synchronize()
        assert not torch.isnan(out).any() and torch.equal(out, eager), f"n={n}"
