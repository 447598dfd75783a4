"""Paged-KV-cache decode attention (:mod:`tpfuse.attention`): Triton kernels vs the plain-torch reference vs an fp64
oracle.

Where the kernel cases run (``test_case_*``, the ``kernels`` fixture of tests/conftest.py): compiled on a GPU;
through the Triton interpreter on a CPU-only machine (``TPFUSE_TRITON_CPU=1`` makes the public op take the Triton
path on CPU tensors; small shapes, forced small partitions so that multi-split paths run). GPU machines (marker
``gpu``) add big shapes (B=64, 32/8 heads, D=128, up to 8192 keys), CUDA-graph capture + replay with new lengths /
block tables / q, and ``torch.compile(fullgraph=True)``.

Adversarial inputs: every cache slot not covered by some sequence's ``[0, seq_len)`` holds NaN, and so do the
unused block-table entries' blocks (they point at all-NaN blocks) and the k/v columns beside a q that is a view of a
wider qkv row, so any read outside the valid keys or outside q makes NaN in the output; block tables are shuffled
(blocks in random order, one block shared by two sequences); ``out`` (itself a view of a wider, poisoned buffer) is
NaN before the call, so an element the kernel forgot to write fails, and the poisoned padding must keep its bytes;
lengths 0, 1, block_size - 1, block_size, block_size + 1, different across the batch, spanning several partitions;
GQA groups 1, 4, 8; bf16 / fp16 / fp32 q; bf16 and FP8 e4m3 caches (kv_scale != 1); scores large enough that the
running max changes across tiles and partitions.

Checks: every output element against the fp64 oracle (within one final rounding, plus a small floor for
elements that cancel to ~0), the relative norm error against the shared tolerance, the fp32 reference too.

Capacity independence (the launch never depends on ``max_seq_len``; each sequence is partitioned on the device from
its own length): the grids, constexprs and workspace size are the same at max_seq_len 300 .. 32768 and the fp32
outputs bit-identical; lengths at every partition edge (0, 1, part - 1, part, part + 1, a partition grown past
MIN_PARTITION, n == max_seq_len, a long sequence beside a short one) for bf16 / FP8 caches, GQA groups 1 / 4 / 8, D
64 / 128, with the split workspace NaN-poisoned (a partial read but never written shows); and a graph-replay-style
sequence (the same launch, new lengths written into the same ``seq_lens`` tensor).
"""

import pytest
import torch

from kernel_env import DEVICE, ON_GPU, capture, gpu_only, poisoned, record_launches

from tpfuse import attention as A
from tpfuse.errors import TPFuseInputError
from tpfuse.tolerance import assert_close

FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------------------------------------------
# helpers


def make_inputs(gen, *, lens, hq, hkv, d, block_size=16, dtype=torch.bfloat16, fp8=False, kv_scale=0.037,
                share=True, extra_cols=1, q_std=3.0):
    """CPU inputs: ``dict(qkv, q, kc, vc, bt, sl, kv_scale, scale)``; see the module docstring for the poison."""
    bsz = len(lens)
    bs = block_size
    need = [(n + bs - 1) // bs for n in lens]
    max_blocks = max(need + [1]) + extra_cols
    n_poison = 2
    num_blocks = sum(need) + n_poison
    perm = torch.randperm(num_blocks, generator=gen)
    poison_ids, ids = perm[:n_poison], perm[n_poison:].tolist()
    bt = poison_ids[torch.randint(0, n_poison, (bsz, max_blocks), generator=gen)].to(torch.int32)
    for b, nb in enumerate(need):
        bt[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)], dtype=torch.int32)
    if share:  # two sequences share a (fully used) first block, as prefix caching does
        full = [b for b, n in enumerate(lens) if n >= bs]
        if len(full) >= 2:
            bt[full[1], 0] = bt[full[0], 0]
    covered = torch.zeros(num_blocks * bs, dtype=torch.bool)
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        covered[bt[b, pos // bs].long() * bs + pos % bs] = True
    cdt = FP8 if fp8 else dtype
    scale_t = torch.tensor([kv_scale], dtype=torch.float32) if fp8 else None
    caches = []
    for _ in range(2):
        vals = torch.randn(num_blocks * bs, hkv, d, generator=gen)
        vals = (vals * (1.5 / kv_scale)).clamp(-448, 448).to(FP8) if fp8 else vals.to(dtype)
        c = poisoned((num_blocks * bs, hkv, d), cdt)
        c[covered] = vals[covered]
        caches.append(c.view(num_blocks, bs, hkv, d))
    width = (hq + 2 * hkv) * d
    qkv = poisoned((bsz, width + 8), dtype)  # k/v columns and padding stay NaN: q must be read as a view
    qkv[:, : hq * d] = (torch.randn(bsz, hq * d, generator=gen) * q_std).to(dtype)
    return dict(qkv=qkv, kc=caches[0], vc=caches[1], bt=bt, sl=torch.tensor(lens, dtype=torch.int32),
                kv_scale=scale_t, scale=d ** -0.5, hq=hq, d=d)


def q_of(qkv, hq, d):
    return qkv[:, : hq * d].view(qkv.shape[0], hq, d)


def assert_elementwise(out, oracle, dtype, what):
    """Every element within one final rounding of the fp64 oracle (relative), plus a floor of 1/16 of that at the
    tensor's largest magnitude for elements that cancel to ~0; fp32 gets 2^-16 for its exp2 / score rounding."""
    o, r = out.double().cpu(), oracle.double().cpu()
    assert not torch.isnan(o).any(), f"{what}: NaN in the output ({int(torch.isnan(o).sum())} elements)"
    eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -16}[dtype]
    amax = r.abs().max() if r.numel() else torch.tensor(0.0, dtype=r.dtype)
    tol = eps * 1.01 * r.abs() + eps * amax / 16
    bad = (o - r).abs() > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {r.numel()} elements off the oracle, first at "
                           f"{bad.nonzero()[0].tolist()}: {o[bad][0].item()} vs {r[bad][0].item()}")
    assert_close(o, r, dtype, what)


def forced_config(partition, num_splits, min_partition, cap):
    """Launcher overrides: a fixed ``partition`` P is ``cdiv(cap, P)`` splits of at least P keys (every length up
    to ``cap`` then gets partitions of exactly P: ``round_up(cdiv(n, splits), block_n) <= P``)."""
    if partition is not None:
        return dict(num_splits=-(-cap // partition), min_partition=partition)
    return dict(num_splits=num_splits, min_partition=min_partition)


def run_case(gen, device, *, lens, hq, hkv, d, block_size=16, dtype=torch.bfloat16, fp8=False, partition=None,
             block_n=None, max_seq_len=None, extra_cols=1, num_splits=None, min_partition=None):
    """Build the inputs, run the op on ``device`` (the public op, or the launcher with a forced tile /
    ``partition`` / ``num_splits`` / ``min_partition``), check against the oracle and the reference; returns the
    output (CPU)."""
    x = make_inputs(gen, lens=lens, hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype, fp8=fp8,
                    extra_cols=extra_cols)
    bsz = len(lens)
    dev = [t.to(device) for t in (x["qkv"], x["kc"], x["vc"], x["bt"], x["sl"])]
    kvs = None if x["kv_scale"] is None else x["kv_scale"].to(device)
    # oracle and reference on the device too (the GPU's fp64 is fast at the big shapes)
    args = dict(scale=x["scale"], kv_scale=kvs, max_seq_len=max_seq_len)
    oracle = A.decode_attention_math(q_of(dev[0], hq, d), *dev[1:], dtype=torch.float64, **args).cpu()
    ref = A.decode_attention_ref(q_of(dev[0], hq, d), *dev[1:], **args).cpu()
    out_base = poisoned((bsz, hq * d + 24), dtype, device)  # out is a strided view; the padding keeps its poison
    out = out_base[:, : hq * d].view(bsz, hq, d)
    q = q_of(dev[0], hq, d)
    if partition is None and block_n is None and num_splits is None and min_partition is None:
        got = A.decode_attention(q, *dev[1:], scale=x["scale"], kv_scale=kvs, out=out, max_seq_len=max_seq_len)
        assert got is out
    else:
        from tpfuse.kernels.decode_attention import launch_decode_attention

        cap = max_seq_len or x["bt"].shape[1] * block_size
        launch_decode_attention(q, *dev[1:], out, x["scale"], kvs, max_seq_len=cap, block_n=block_n,
                                **forced_config(partition, num_splits, min_partition, cap))
    tag = (f"lens={lens[:6]}{'...' if bsz > 6 else ''} hq={hq} hkv={hkv} d={d} {dtype} fp8={fp8} p={partition} "
           f"splits={num_splits} min_part={min_partition}")
    res = out.cpu()
    assert_elementwise(res, oracle, dtype, tag)
    assert_close(res, ref.float(), dtype, tag + " vs reference")
    assert (res[torch.tensor(lens) <= 0] == 0).all(), tag + ": empty sequences must give exactly 0"
    pad = out_base[:, hq * d:].cpu()
    assert torch.equal(pad.view(torch.uint8), poisoned(pad.shape, dtype).view(torch.uint8)), tag + ": padding written"
    assert torch.equal(dev[0].cpu().view(torch.uint8), x["qkv"].view(torch.uint8)), tag + ": q changed"
    return res


# --------------------------------------------------------------------------------------------------------------
# reference path (CPU, plain torch): always runs here


def test_reference_matches_dense_sdpa(gen):
    """Independent oracle: the reference on a shuffled paged cache == SDPA on the contiguous keys (GQA expanded)."""
    lens = [0, 1, 15, 16, 17, 40]
    x = make_inputs(gen, lens=lens, hq=8, hkv=2, d=32, dtype=torch.float32, share=False)
    q = q_of(x["qkv"], 8, 32)
    out = A.decode_attention_math(q, x["kc"], x["vc"], x["bt"], x["sl"], scale=x["scale"], dtype=torch.float64)
    for b, n in enumerate(lens):
        if n == 0:
            assert (out[b] == 0).all()
            continue
        k = A.gather_kv(x["kc"], x["bt"][b], n, torch.float64).transpose(0, 1)  # [Hkv, n, D]
        v = A.gather_kv(x["vc"], x["bt"][b], n, torch.float64).transpose(0, 1)
        sd = torch.nn.functional.scaled_dot_product_attention(q[b].double()[:, None], k.repeat_interleave(4, 0),
                                                              v.repeat_interleave(4, 0), scale=x["scale"])
        assert torch.allclose(out[b], sd[:, 0], rtol=1e-10, atol=1e-12)
    # keys past max_seq_len are ignored
    cut = A.decode_attention_math(q, x["kc"], x["vc"], x["bt"], x["sl"], scale=x["scale"], max_seq_len=16)
    assert torch.allclose(cut[5], A.decode_attention_math(q[5:], x["kc"], x["vc"], x["bt"][5:],
                                                          torch.tensor([16], dtype=torch.int32), scale=x["scale"])[0])


def test_public_op_cpu_reference_path(gen, monkeypatch):
    monkeypatch.delenv("TPFUSE_TRITON_CPU", raising=False)
    run_case(gen, "cpu", lens=[0, 1, 17, 33], hq=8, hkv=2, d=64)
    run_case(gen, "cpu", lens=[5, 16], hq=4, hkv=4, d=32, fp8=True)


def test_opcheck_fake_impl(gen, monkeypatch):
    monkeypatch.delenv("TPFUSE_TRITON_CPU", raising=False)
    x = make_inputs(gen, lens=[3, 20], hq=4, hkv=2, d=32, share=False)
    q = q_of(x["qkv"], 4, 32).clone()
    kc, vc = (torch.nan_to_num(c.float()).bfloat16() for c in (x["kc"], x["vc"]))  # opcheck sums the inputs
    out = torch.zeros(2, 4, 32, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.tpfuse.decode_attention_.default,
                          (q, kc, vc, x["bt"], x["sl"], out, x["scale"], 32, None))


def test_input_validation():
    q = torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    kc = torch.zeros(3, 16, 2, 64, dtype=torch.bfloat16)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    sl = torch.zeros(2, dtype=torch.int32)

    def call(**kw):
        a = dict(q=q, key_cache=kc, value_cache=kc, block_tables=bt, seq_lens=sl, scale=0.1)
        a.update(kw)
        return A.decode_attention(**a)

    assert call().shape == q.shape
    bad = [dict(q=q[..., :48]), dict(q=torch.zeros(2, 3, 64, dtype=torch.bfloat16)),  # d, Hq % Hkv
           dict(q=q.float()), dict(key_cache=torch.zeros(3, 8, 2, 64, dtype=torch.bfloat16)),  # dtype, block_size
           dict(key_cache=kc.to(FP8), value_cache=kc.to(FP8)),  # FP8 cache without kv_scale
           dict(key_cache=kc.to(FP8), value_cache=kc.to(FP8), kv_scale=torch.ones(1, dtype=torch.bfloat16)),
           dict(value_cache=kc[:2]), dict(block_tables=bt.float()), dict(block_tables=bt[:1]),
           dict(seq_lens=sl[:1]), dict(max_seq_len=33), dict(max_seq_len=0),
           dict(out=torch.zeros(2, 4, 64)), dict(out=torch.zeros(2, 64, 4, dtype=torch.bfloat16).transpose(1, 2)),
           dict(q=torch.zeros(2, 4, 8, dtype=torch.bfloat16), key_cache=kc[..., :8], value_cache=kc[..., :8]),
           dict(q=torch.zeros(2, 4, 64, 2, dtype=torch.bfloat16)[..., 0])]  # non-unit last stride
    for kw in bad:
        with pytest.raises(TPFuseInputError):
            call(**kw)


def test_public_op_launches_the_triton_kernels(gen, kernels, monkeypatch):
    """Under the ``kernels`` fixture (every ``test_case_*`` below) the public op runs the Triton kernels, not the
    torch reference: interpreted on CPU (the fixture checks that), compiled on CUDA."""
    split = record_launches(monkeypatch, kernels.decode_attention, "_split_kernel")
    run_case(gen, DEVICE, lens=[17, 3], hq=4, hkv=2, d=64)
    assert len(split.launches) == 1


# --------------------------------------------------------------------------------------------------------------
# kernel cases: Triton interpreter (CPU) or CUDA


kernel_case = pytest.mark.usefixtures("kernels")  # compiled on CUDA, interpreted on CPU
EDGE_LENS = [0, 1, 15, 16, 17]  # block_size 16: empty, one key, bs - 1, bs, bs + 1


# GQA groups 1 / 4 / 8: the model shapes (8/8, 32/8, 64/8 heads) on the GPU, 2 kv heads in the interpreter (its
# cost is per program, and the group, not the number of kv heads, is what the kernel's head mapping depends on)
HKV = 8 if ON_GPU else 2
GROUPS = [(HKV, HKV), (4 * HKV, HKV), (8 * HKV, HKV)]


@kernel_case
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GROUPS, ids=["g1", "g4", "g8"])
def test_case_gqa_edge_lengths(gen, hq, hkv, d):
    # partition 16 = one block: the 17-key sequence spans two partitions (split + combine path)
    run_case(gen, DEVICE, lens=EDGE_LENS, hq=hq, hkv=hkv, d=d, partition=16, block_n=16)


@kernel_case
@pytest.mark.parametrize("partition,block_n,block_size,fp8", [
    (32, 16, 16, False), (64, 64, 16, True), (64, 16, 32, False), (32, 32, 64, True), (None, None, 16, False),
    (None, None, 32, True)])
def test_case_multi_partition(gen, fp8, partition, block_n, block_size):
    # tiles smaller / larger than a cache block, several partitions per sequence, one empty sequence, lengths
    # that end mid-tile and mid-block; None: the public op with the launcher's own heuristic
    run_case(gen, DEVICE, lens=[100, 37, 0, 64, 3, 129], hq=8, hkv=2, d=64, block_size=block_size, fp8=fp8,
             partition=partition, block_n=block_n)


@kernel_case
@pytest.mark.parametrize("single", [False, True], ids=["split", "single"])
@pytest.mark.parametrize("hq,hkv", GROUPS[:2], ids=["g1", "g4"])
def test_case_fp8_cache(gen, hq, hkv, single):
    run_case(gen, DEVICE, lens=EDGE_LENS, hq=hq, hkv=hkv, d=128, fp8=True, partition=64 if single else 16,
             block_n=16)


@kernel_case
@pytest.mark.parametrize("single", [False, True], ids=["split", "single"])
@pytest.mark.parametrize("hq,hkv", GROUPS[:2], ids=["g1", "g4"])
def test_case_fp8_cache_f16_loop(gen, kernels, monkeypatch, hq, hkv, single):
    """``FP8_F16``: the e4m3 tiles multiplied in fp16 against q in fp16 keep the oracle's one-rounding bound
    (bf16 q and output); the launch asked for it (``F16_MMA``), and not for a bf16 cache or an fp16 q."""
    from tpfuse.kernels import decode_attention as dak

    monkeypatch.setattr(dak, "FP8_F16", True)
    rec = record_launches(monkeypatch, dak, "_split_kernel")
    run_case(gen, DEVICE, lens=EDGE_LENS + [200], hq=hq, hkv=hkv, d=128, fp8=True,
             partition=64 if single else 16, block_n=16)
    run_case(gen, DEVICE, lens=[33, 0, 16, 5], hq=8, hkv=2, d=64, fp8=True)  # the launcher's own rule
    assert [kw["F16_MMA"] for _, kw in rec.launches] == [True, True]
    run_case(gen, DEVICE, lens=[33, 5], hq=8, hkv=2, d=64, fp8=False, partition=32, block_n=16)
    run_case(gen, DEVICE, lens=[33, 5], hq=8, hkv=2, d=64, dtype=torch.float16, fp8=True, partition=32, block_n=16)
    assert [kw["F16_MMA"] for _, kw in rec.launches[2:]] == [False, False]


@kernel_case
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_case_batch_33(gen, fp8):
    lens = torch.randint(0, 70, (33,), generator=gen).tolist()
    lens[:5] = [0, 1, 15, 16, 17]
    run_case(gen, DEVICE, lens=lens, hq=4, hkv=2, d=64, fp8=fp8, partition=64, block_n=32)  # group 2


@kernel_case
@pytest.mark.parametrize("n", [0, 1, 47])
def test_case_batch_1(gen, n):
    run_case(gen, DEVICE, lens=[n], hq=16, hkv=2, d=128)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("fp8", [False, True], ids=["samecache", "fp8cache"])
def test_case_q_dtypes(gen, dtype, fp8):
    run_case(gen, DEVICE, lens=[33, 0, 16, 5], hq=8, hkv=2, d=64, dtype=dtype, fp8=fp8, partition=32, block_n=16)


@kernel_case
def test_case_heuristic_many_splits_and_clamp(gen):
    # the launcher's own rule (16 splits for B * Hkv = 6, partitions of >= 128 keys): 300 keys in three
    # partitions, 130 in two, the other splits' programs exit; a block table of 40 columns (max_seq_len 640) the
    # kernel never reads past the lengths; then max_seq_len below some lengths: keys past it are ignored (as the
    # reference does)
    run_case(gen, DEVICE, lens=[0, 130, 300], hq=4, hkv=2, d=64, extra_cols=20)
    run_case(gen, DEVICE, lens=[50, 10, 33], hq=4, hkv=1, d=64, max_seq_len=32)


@kernel_case
def test_case_d256_and_d16(gen):
    run_case(gen, DEVICE, lens=[20, 0, 1], hq=4, hkv=2, d=256, partition=32, block_n=16)
    run_case(gen, DEVICE, lens=[20, 16], hq=2, hkv=1, d=16, fp8=True)


# --------------------------------------------------------------------------------------------------------------
# GPU only (marker gpu)



@gpu_only
@pytest.mark.parametrize("combine", ["kernel", "fused"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
@pytest.mark.parametrize("hq", [32, 64])
def test_gpu_big_shapes(gen, monkeypatch, hq, fp8, combine):
    from tpfuse.kernels import decode_attention as dak

    monkeypatch.setattr(dak, "FUSE_COMBINE", combine == "fused")
    recs = {name: record_launches(monkeypatch, dak, name) for name in FUSED_KERNELS}
    lens = torch.randint(0, 8193, (64,), generator=gen).tolist()
    lens[:4] = [8192, 0, 1, 4097]
    run_case(gen, "cuda", lens=lens, hq=hq, hkv=8, d=128, fp8=fp8)
    run_case(gen, "cuda", lens=[8192], hq=hq, hkv=8, d=128, fp8=fp8)  # B=1: many splits
    run_case(gen, "cuda", lens=[4096, 1000, 17], hq=hq, hkv=8, d=128, fp8=fp8, max_seq_len=16384, extra_cols=900)
    if combine == "fused":
        assert len(recs["_split_combine_kernel"].launches) >= 2  # B=1 and B=3 split (B=64: bf16 one split)
        assert_fused_where_split(recs, f"big shapes hq={hq} fp8={fp8}")


@gpu_only
def test_gpu_fp8_f16_loop_big_shapes(gen, monkeypatch):
    """``FP8_F16`` at the model's shapes (B 64 / 1, 32 q and 8 kv heads, up to 8192 keys, the launcher's rule):
    within one rounding of the oracle, and within one bf16 step of the bf16 loop's output."""
    from tpfuse.kernels import decode_attention as dak

    lens = torch.randint(0, 8193, (64,), generator=gen).tolist()
    lens[:4] = [8192, 0, 1, 4097]
    for batch_lens in (lens, [8192], [1024] * 8):
        outs = []
        for f16 in (False, True):
            monkeypatch.setattr(dak, "FP8_F16", f16)
            outs.append(run_case(torch.Generator().manual_seed(len(batch_lens)), "cuda", lens=batch_lens, hq=32,
                                 hkv=8, d=128, fp8=True))
        assert_within_one_step(outs[0], outs[1], f"f16 loop vs bf16 loop, B={len(batch_lens)}")


@gpu_only
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_gpu_long_context_any_capacity(gen, fp8):
    # the own rule at B=6, Hkv=8 on 132 SMs (5 splits for bf16, 8 for FP8): partitions of 6656 / 4096 keys at 32768
    # keys, 128 + 1 at 129; the same inputs at max_seq_len 32768 and 65536 (block tables 4096 columns): same bits
    lens, hq, hkv, d = [32768, 1, 1024, 0, 129, 16385], 32, 8, 128
    x = make_inputs(gen, lens=lens, hq=hq, hkv=hkv, d=d, fp8=fp8, extra_cols=2048)
    q, kc, vc, bt, sl = (t.cuda() for t in (q_of(x["qkv"], hq, d), x["kc"], x["vc"], x["bt"], x["sl"]))
    kvs = None if x["kv_scale"] is None else x["kv_scale"].cuda()
    outs = [A.decode_attention(q, kc, vc, bt, sl, scale=x["scale"], kv_scale=kvs, max_seq_len=cap).cpu()
            for cap in (32768, 65536)]
    oracle = A.decode_attention_math(q, kc, vc, bt, sl, scale=x["scale"], kv_scale=kvs, dtype=torch.float64)
    assert_elementwise(outs[0], oracle, torch.bfloat16, f"long context (fp8={fp8})")
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))


def _graph_inputs(gen, bsz, hq, hkv, d, max_blocks, num_blocks, block_size, fp8):
    """Random contents for the static tensors of the graph test (whole cache valid: lengths vary per replay)."""
    cdt = FP8 if fp8 else torch.bfloat16
    kc = (torch.randn(num_blocks, block_size, hkv, d, generator=gen) * (1.5 / 0.05 if fp8 else 1.0)).to(cdt)
    vc = (torch.randn(num_blocks, block_size, hkv, d, generator=gen) * (1.5 / 0.05 if fp8 else 1.0)).to(cdt)
    bt = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(bsz)]).to(torch.int32)
    q = (torch.randn(bsz, hq, d, generator=gen) * 3).bfloat16()
    return q, kc, vc, bt


@gpu_only
@pytest.mark.parametrize("combine", ["kernel", "fused"])
@pytest.mark.parametrize("max_blocks,num_blocks", [(128, 600), (2048, 2100)], ids=["cap2k", "cap32k"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_gpu_cuda_graph_capture_replay(gen, monkeypatch, fp8, max_blocks, num_blocks, combine):
    from tpfuse.kernels import decode_attention as dak

    monkeypatch.setattr(dak, "FUSE_COMBINE", combine == "fused")
    recs = {name: record_launches(monkeypatch, dak, name) for name in FUSED_KERNELS}
    bsz, hq, hkv, d, bs = 16, 32, 8, 128, 16
    cap = max_blocks * bs  # 2048 / 32768 keys; the own rule on 132 SMs: 2 splits (bf16), 4 (FP8) for B * Hkv = 128
    q, kc, vc, bt = (t.cuda() for t in _graph_inputs(gen, bsz, hq, hkv, d, max_blocks, num_blocks, bs, fp8))
    sl = torch.full((bsz,), 5, dtype=torch.int32, device="cuda")
    kvs = torch.tensor([0.05], device="cuda") if fp8 else None
    out = torch.empty(bsz, hq, d, dtype=torch.bfloat16, device="cuda")

    def step():
        A.decode_attention(q, kc, vc, bt, sl, scale=d ** -0.5, kv_scale=kvs, out=out, max_seq_len=cap)

    graph, _ = capture(step)
    replays = [torch.randint(0, cap + 1, (bsz,), generator=gen), torch.zeros(bsz, dtype=torch.long),
               torch.tensor([cap, 0, 1, 15, 16, 17, 2047, 129] * 2), torch.randint(0, 40, (bsz,), generator=gen)]
    for i, lens in enumerate(replays):
        nq, nkc, nvc, nbt = _graph_inputs(gen, bsz, hq, hkv, d, max_blocks, num_blocks, bs, fp8)
        for dst, src in ((q, nq), (kc, nkc), (vc, nvc), (bt, nbt), (sl, lens.to(torch.int32))):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        oracle = A.decode_attention_math(q, kc, vc, bt, sl, scale=d ** -0.5, kv_scale=kvs, dtype=torch.float64)
        assert_elementwise(out, oracle, torch.bfloat16, f"graph replay {i} (fp8={fp8})")
    if combine == "fused":  # 2 / 4 splits: the warm-up and the capture ran the fused kernel
        assert len(recs["_split_combine_kernel"].launches) == 2
        assert_fused_where_split(recs, f"graph fp8={fp8}")


def assert_within_one_step(a, b, what):
    """bf16 ``a`` and ``b`` equal or one bf16 step apart elementwise (the same fp32 sums in another order), plus a
    floor of 1/16 of a step at the largest magnitude for elements that cancel to ~0."""
    a32, b32 = a.float(), b.float()
    big = torch.maximum(a32.abs(), b32.abs())
    step = torch.where(big > 0, torch.ldexp(torch.ones_like(big), torch.frexp(big)[1] - 8), 0.0)
    floor = 2.0 ** -12 * b32.abs().max()
    bad = (a32 - b32).abs() > step + floor
    assert not bad.any(), f"{what}: {int(bad.sum())} elements more than one bf16 step apart"


@gpu_only
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_gpu_fused_combine_races(gen, monkeypatch, fp8):
    """The fused combine under contention: B=64 x 8 kv heads x the own rule's splits, 300 launches over lengths
    that change every time, the split workspace NaN-poisoned before each (a partial combined before it was
    written, or a combine run twice with one missing, shows as NaN or as a difference), each within one bf16 step
    of the split + combine kernels on the same inputs (the same sums in another order), the counters zero after every launch; then the
    same as one CUDA graph replayed 300 times."""
    from tpfuse.kernels import decode_attention as dak

    bsz, hq, hkv, d, bs, cap = 64, 32, 8, 128, 16, 2048
    q, kc, vc, bt = (t.cuda() for t in _graph_inputs(gen, bsz, hq, hkv, d, cap // bs, 9000, bs, fp8))
    kvs = torch.tensor([0.05], device="cuda") if fp8 else None
    sl = torch.zeros(bsz, dtype=torch.int32, device="cuda")
    ws = poison_workspace(monkeypatch, dak)
    outs = {}

    def step(fused):
        out = torch.full((bsz, hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        dak.launch_decode_attention(q, kc, vc, bt, sl, out, d ** -0.5, kvs, max_seq_len=cap, num_splits=8,
                                    min_partition=128, fuse_combine=fused)
        return out

    for it in range(300):
        sl.copy_(torch.randint(0, cap + 1, (bsz,), generator=gen).to(torch.int32))
        outs = {fused: step(fused) for fused in (True, False)}
        torch.cuda.synchronize()
        assert not torch.isnan(outs[True]).any(), f"launch {it}: NaN"
        assert_within_one_step(outs[True], outs[False], f"launch {it}")
        assert int(dak._COUNTERS[sl.device].abs().sum()) == 0, f"launch {it}: counters"
    assert ws  # the poisoned workspace served every launch (in the graph too: its fill is captured)
    graph, out = capture(lambda: step(True))
    for it in range(300):
        sl.copy_(torch.randint(0, cap + 1, (bsz,), generator=gen).to(torch.int32))
        graph.replay()
        ref = step(False)
        torch.cuda.synchronize()
        assert not torch.isnan(out).any(), f"replay {it}: NaN"
        assert_within_one_step(out, ref, f"replay {it}")
    assert int(dak._COUNTERS[sl.device].abs().sum()) == 0


@gpu_only
def test_gpu_fused_combine_capture_without_counters_falls_back(gen, monkeypatch):
    """A capture that would have to allocate the ticket counters (none yet on this device) captures the split +
    combine kernels instead, and replays correctly; the next eager call allocates them and fuses."""
    from tpfuse.kernels import decode_attention as dak

    x = make_inputs(gen, lens=[300, 0, 17], hq=8, hkv=2, d=128)
    q, kc, vc, bt, sl = (t.cuda() for t in (q_of(x["qkv"], 8, 128), x["kc"], x["vc"], x["bt"], x["sl"]))
    monkeypatch.setattr(dak, "FUSE_COMBINE", False)
    A.decode_attention(q, kc, vc, bt, sl, scale=x["scale"])  # compiles the split and combine kernels
    torch.cuda.synchronize()
    monkeypatch.setattr(dak, "FUSE_COMBINE", True)
    monkeypatch.setattr(dak, "_COUNTERS", {})
    recs = {name: record_launches(monkeypatch, dak, name) for name in FUSED_KERNELS}
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = A.decode_attention(q, kc, vc, bt, sl, scale=x["scale"])
    assert [len(recs[n].launches) for n in FUSED_KERNELS] == [1, 0, 1] and not dak._COUNTERS
    g.replay()
    eager = A.decode_attention(q, kc, vc, bt, sl, scale=x["scale"])
    torch.cuda.synchronize()
    assert len(recs["_split_combine_kernel"].launches) == 1 and dak._COUNTERS
    oracle = A.decode_attention_math(q, kc, vc, bt, sl, scale=x["scale"], dtype=torch.float64)
    assert_elementwise(out, oracle, torch.bfloat16, "captured fallback")
    assert_elementwise(eager, oracle, torch.bfloat16, "eager fused")


MIXED_LENS = [0, 1, 17, 300, 1023, 2048, 5]
WORD_CASES = [  # (lens, hq, hkv, d, block_size, (block_n, num_splits, num_warps) or None: the FP8 rule)
    ([1024] * 64, 32, 8, 128, 256, None), ([1024] * 8, 32, 8, 128, 256, None), ([4096], 32, 8, 128, 256, None),
    ([1024] * 64, 32, 8, 128, 256, (32, 2, 4)), ([1024] * 8, 32, 8, 128, 256, (32, 8, 4)),  # the swept FP8 rule
    (MIXED_LENS, 32, 8, 128, 16, None), (MIXED_LENS, 32, 8, 128, 16, (32, 2, 4)),
    ([700, 33, 129], 32, 4, 128, 16, (64, 8, 4)), ([700, 33, 129], 32, 4, 128, 16, (128, 1, 4)),
    ([511, 64, 1], 8, 8, 64, 16, (32, 1, 8)), ([2000, 3], 16, 2, 128, 256, (64, 32, 8))]


@gpu_only
@pytest.mark.parametrize("dtype,f16", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)],
                         ids=["bf16", "fp16", "bf16_f16_loop"])
def test_gpu_fp8_word_loads_match_byte_loads(gen, dtype, f16):
    """``FP8_WORDS``: e4m3 tiles loaded as int32 words and converted before the MMA layout change give the same bits
    as the e4m3 tile loads, at the FP8 rule's configs and forced tiles / splits / warps (the swept rule's among
    them: 32-key tiles with 2 and 8 splits), D 128 and 64, groups 1-8,
    NaN-poisoned unused slots, a shared block, empty and odd lengths; and both stay within the oracle's bound. A
    cache view that is not 4-byte aligned is not offered to the word loads, and its launch asking for them (the
    e4m3 loads then) gives the same bits as the aligned cache. ``f16``: both launches with the fp16 tile loop
    (``FP8_F16``)."""
    from tpfuse.kernels import decode_attention as dak

    for lens, hq, hkv, d, bs, forced in WORD_CASES:
        x = make_inputs(gen, lens=lens, hq=hq, hkv=hkv, d=d, block_size=bs, dtype=dtype, fp8=True)
        q, kc, vc, bt, sl = (t.cuda() for t in (q_of(x["qkv"], hq, d), x["kc"], x["vc"], x["bt"], x["sl"]))
        kvs, cap = x["kv_scale"].cuda(), x["bt"].shape[1] * bs
        assert dak.fp8_words_ok(q, kc, vc)
        cfg = {} if forced is None else dict(zip(("block_n", "num_splits", "num_warps"), forced), min_partition=128)
        outs = []
        for words in (False, True):
            out = torch.full_like(q, float("nan"))
            dak.launch_decode_attention(q, kc, vc, bt, sl, out, x["scale"], kvs, max_seq_len=cap, fp8_words=words,
                                        fp8_f16=f16, **cfg)
            outs.append(out.cpu())
        oracle = A.decode_attention_math(q, kc, vc, bt, sl, scale=x["scale"], kv_scale=kvs, max_seq_len=cap,
                                         dtype=torch.float64)
        tag = f"lens={lens[:4]} hq={hq} hkv={hkv} d={d} block {bs} config {forced} {dtype}"
        assert_elementwise(outs[1], oracle, dtype, "word loads " + tag)
        assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)), "words != bytes: " + tag
    shifted = torch.empty(kc.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view(FP8).view(kc.shape)
    shifted.copy_(kc)
    assert not dak.fp8_words_ok(q, shifted, vc)
    out = torch.full_like(q, float("nan"))
    dak.launch_decode_attention(q, shifted, vc, bt, sl, out, x["scale"], kvs, max_seq_len=cap, fp8_words=True,
                                fp8_f16=f16, **cfg)
    assert torch.equal(out.cpu().view(torch.int16), outs[0].view(torch.int16)), "misaligned cache: " + tag


@gpu_only
def test_gpu_torch_compile_fullgraph(gen):
    x = make_inputs(gen, lens=[300, 0, 17], hq=8, hkv=2, d=128)
    q, kc, vc, bt, sl = (t.cuda() for t in (q_of(x["qkv"], 8, 128), x["kc"], x["vc"], x["bt"], x["sl"]))

    def f(q, kc, vc, bt, sl):  # elementwise ops around the op only: eager and compiled round identically
        return A.decode_attention(q * 1.0, kc, vc, bt, sl, scale=x["scale"]) + 1.0

    eager = f(q, kc, vc, bt, sl)
    comp = torch.compile(f, fullgraph=True)(q, kc, vc, bt, sl)
    torch.cuda.synchronize()
    assert torch.equal(eager, comp)


@pytest.mark.parametrize("batch,bf16_cfg,fp8_cfg,bf16_parts,fp8_parts", [
    # (NUM_SPLITS, MIN_PARTITION, BLOCK_N, num_warps) and the partitions at 1024 / 4096 keys, at the points the
    # docstring names (Hkv 8, D 128, bf16 q, 132 SMs)
    (1, (16, 128, 128, 4), (32, 128, 64, 4), (128, 256), (128, 128)),
    (8, (4, 128, 128, 4), (8, 128, 32, 4), (256, 1024), (128, 512)),
    (64, (1, 128, 32, 4), (2, 128, 32, 4), (1024, 4096), (512, 2048)),
])
def test_pick_config_rule(kernels, batch, bf16_cfg, fp8_cfg, bf16_parts, fp8_parts):
    mod = kernels.decode_attention
    bf16, fp8 = mod.pick_config(batch, 8, 128, 2), mod.pick_config(batch, 8, 128, 2, cache_fp8=True)
    assert (bf16, fp8) == (bf16_cfg + (3,), fp8_cfg + (3,))  # num_stages: Triton's default
    assert tuple(mod.partition_len(n, bf16) for n in (1024, 4096)) == bf16_parts
    assert tuple(mod.partition_len(n, fp8) for n in (1024, 4096)) == fp8_parts
    pick = mod.pick_config
    assert pick(2, 4, 256, 2).block_n == 32 and pick(2, 4, 128, 4).block_n == 32  # D=256 / fp32 q: small tiles
    assert pick(2, 4, 256, 2, cache_fp8=True).block_n == 32
    assert pick(8, 8, 128, 2, sm_count=114).num_splits == 3  # splits follow the SM count: 228 // 64
    assert pick(1, 1, 128, 2).num_splits == 16 and pick(1, 1, 128, 2, cache_fp8=True).num_splits == 32  # the caps
    assert pick(256, 8, 128, 2).num_splits == 1 and pick(256, 8, 128, 2, cache_fp8=True).num_splits == 2  # FP8: >= 2
    assert pick(64, 8, 128, 2, cache_fp8=True, num_splits=1) == (1, 128, 32, 4, 3)  # forced splits: no minimum
    assert pick(4, 8, 128, 2, cache_fp8=True)[:3] == (16, 128, 32)  # 32 x 16 = 512 programs > 264: 32-key tiles
    assert pick(1, 4, 128, 2, cache_fp8=True)[:3] == (32, 128, 64)  # capped: 4 x 32 = 128 programs, wider tiles
    with pytest.raises(ValueError, match="multiple of block_n"):
        pick(1, 8, 128, 2, min_partition=192)


def test_one_split_tiles_follow_programs_per_sm(kernels, monkeypatch):
    """``ONE_SPLIT_TILES``: 128-key tiles x 8 warps where a sequence is one program, 32 x 4 from 3 programs an SM on
    (B 33-49 / 50+ at 8 kv heads on 132 SMs; the real SM count moves the step); small tiles (D 256), FP8 caches,
    split launches and explicit arguments keep theirs; the table is read at each pick (``bench_e2e.py --tile-ab``
    sets it)."""
    mod = kernels.decode_attention
    pick = mod.pick_config
    assert pick(49, 8, 128, 2) == (1, 128, 128, 8, 3)  # 392 programs < 3 x 132
    assert pick(50, 8, 128, 2) == (1, 128, 32, 4, 3)  # 400 programs
    assert pick(64, 8, 128, 2, sm_count=200) == (1, 128, 128, 8, 3)  # 512 < 600
    assert pick(8, 8, 128, 2) == (4, 128, 128, 4, 3)  # 4 splits: the rule's 128-key tiles
    assert pick(64, 8, 128, 2, cache_fp8=True) == (2, 128, 32, 4, 3)
    assert pick(64, 8, 256, 2)[2:4] == (32, 8)  # D 256: small tiles, the one-split rule's 8 warps
    assert pick(64, 8, 128, 2, block_n=64, num_warps=8)[2:4] == (64, 8)
    monkeypatch.setattr(mod, "ONE_SPLIT_TILES", ((0, (128, 8)),))
    assert pick(64, 8, 128, 2) == (1, 128, 128, 8, 3)


# --------------------------------------------------------------------------------------------------------------
# the work follows the lengths, not the capacity (max_seq_len)


def poison_workspace(monkeypatch, module):
    """Make the launcher's split workspace NaN before every launch (a partial the combine reads but no program
    wrote shows as NaN) and record each workspace's element count."""
    sizes = []
    real = module._workspace

    def poisoned_workspace(bsz, hq, d, splits, device):
        parts = real(bsz, hq, d, splits, device)
        for t in parts:
            t.fill_(float("nan"))
        sizes.append(sum(t.numel() for t in parts))
        return parts

    monkeypatch.setattr(module, "_workspace", poisoned_workspace)
    return sizes


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_launch_is_independent_of_max_seq_len(gen, kernels, monkeypatch, fp8):
    """For fixed (B, Hkv) the grids, constexprs, warps and workspace size are the same at every max_seq_len, and
    so is the output, bit for bit (the same partitions of the same keys; fp32 q and out, so that a partition that
    moved with the capacity would show in the last bits)."""
    mod = kernels.decode_attention
    launches = []
    record_launches(monkeypatch, mod, "_split_kernel", launches)
    record_launches(monkeypatch, mod, "_combine_kernel", launches)
    ws_sizes = poison_workspace(monkeypatch, mod)
    lens, hq, hkv, d = [300, 0, 17], 4, 2, 64
    x = make_inputs(gen, lens=lens, hq=hq, hkv=hkv, d=d, dtype=torch.float32, fp8=fp8, extra_cols=2048)  # 32.9k
    q = q_of(x["qkv"], hq, d)
    outs, configs = [], []
    for cap in (300, 1024, 8192, 32768):
        launches.clear()
        out = torch.empty(len(lens), hq, d, dtype=torch.float32, device=DEVICE)
        args = [t.to(DEVICE) for t in (q, x["kc"], x["vc"], x["bt"], x["sl"])]
        A.decode_attention(*args, scale=x["scale"], kv_scale=None if x["kv_scale"] is None else
                           x["kv_scale"].to(DEVICE), out=out, max_seq_len=cap)
        configs.append([(grid, kw) for grid, kw in launches])
        outs.append(out.cpu())
    assert [grid for grid, _ in configs[0]] == [(3, hkv, 16 if not fp8 else 32), (3, hq)]  # 264 // 6 -> cap 16
    assert all(c == configs[0] for c in configs[1:]), configs
    assert len(set(ws_sizes)) == 1 and ws_sizes[0] == 3 * hq * (16 if not fp8 else 32) * (d + 2)
    assert all(torch.equal(o.view(torch.int32), outs[0].view(torch.int32)) for o in outs[1:])
    oracle = A.decode_attention_math(q, x["kc"], x["vc"], x["bt"], x["sl"], scale=x["scale"],
                                     kv_scale=x["kv_scale"], dtype=torch.float64)
    assert_elementwise(outs[0], oracle, torch.float32, f"capacity-independent launch (fp8={fp8})")


# forced NUM_SPLITS 4, MIN_PARTITION 32, BLOCK_N 16 (block_size 16): part(n) = max(32, round_up(cdiv(n, 4), 16)),
# so 0 (no partition), 1 / 31 / 32 (one partition, the last one full), 33 (two), 127 / 128 (four of 32: the last
# one ends short / full), 129 (part 48: three, the last of 33 keys), 160 (four of 48, the last of 16), 200 (part 64,
# four, the last of 8) = max_seq_len; 200 and 1 in one batch (a long sequence with a short one)
PARTITION_EDGE_LENS = [0, 1, 31, 32, 33, 127, 128, 129, 160, 200]


FUSED_KERNELS = ("_split_kernel", "_split_combine_kernel", "_combine_kernel")


def fuse_combine(monkeypatch, module, names=FUSED_KERNELS):
    """Turn :data:`FUSE_COMBINE` on for the test; returns a launch recorder per kernel name."""
    monkeypatch.setattr(module, "FUSE_COMBINE", True)
    return {name: record_launches(monkeypatch, module, name) for name in names}


def assert_fused_where_split(recs, what, plain="_split_kernel"):
    """With :data:`FUSE_COMBINE` on (GPU tests at the launcher's own configs): no combine kernel ran, and every
    unfused split launch had one split (nothing to combine)."""
    assert not recs["_combine_kernel"].launches, f"{what}: a combine kernel ran"
    assert all(kw["NUM_SPLITS"] == 1 for _, kw in recs[plain].launches), f"{what}: an unfused split launch"


def assert_fused_combine_ran(module, recs, what, fused="_split_combine_kernel"):
    """Only the fused split kernel ran (no unfused split, no combine kernel) and every ticket counter is zero
    again (each launch re-arms the ones it used)."""
    ran = {name: len(rec.launches) for name, rec in recs.items()}
    assert ran[fused] > 0 and all(k == 0 for name, k in ran.items() if name != fused), f"{what}: {ran}"
    assert all(int(c.abs().sum()) == 0 for c in module._COUNTERS.values()), f"{what}: ticket counters not re-armed"


@kernel_case
@pytest.mark.parametrize("combine", ["kernel", "fused"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GROUPS, ids=["g1", "g4", "g8"])
def test_case_partition_edges(gen, kernels, monkeypatch, hq, hkv, d, fp8, combine):
    """Every partition edge, the split workspace NaN-poisoned; ``fused``: the combine in the split kernel's last
    programs (one partition: written directly; none: zeros from split 0)."""
    mod = kernels.decode_attention
    if combine == "fused" and d == 128 and not ON_GPU:
        pytest.skip("interpreter time: the fused combine's D = 128 cases run on GPUs")
    monkeypatch.setattr(mod, "FUSE_COMBINE", False)  # "kernel": whatever the default
    recs = fuse_combine(monkeypatch, mod) if combine == "fused" else None
    poison_workspace(monkeypatch, mod)
    run_case(gen, DEVICE, lens=PARTITION_EDGE_LENS, hq=hq, hkv=hkv, d=d, fp8=fp8, num_splits=4, min_partition=32,
             block_n=16, max_seq_len=200)
    if recs:
        assert_fused_combine_ran(mod, recs, f"partition edges hq={hq} hkv={hkv} d={d} fp8={fp8}")


@kernel_case
@pytest.mark.parametrize("combine", ["kernel", "fused"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_case_partition_edges_own_rule(gen, kernels, monkeypatch, fp8, combine):
    # the launcher's own config (MIN_PARTITION 128, BLOCK_N 128 / 64): one partition up to 128 keys, two from 129
    mod = kernels.decode_attention
    monkeypatch.setattr(mod, "FUSE_COMBINE", False)
    recs = fuse_combine(monkeypatch, mod) if combine == "fused" else None
    poison_workspace(monkeypatch, mod)
    run_case(gen, DEVICE, lens=[0, 1, 127, 128, 129, 257], hq=8, hkv=2, d=64, fp8=fp8)
    if recs:
        assert_fused_combine_ran(mod, recs, f"own rule fp8={fp8}")


@kernel_case
@pytest.mark.parametrize("combine", ["kernel", "fused"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_case_graph_style_relaunch(gen, kernels, monkeypatch, fp8, combine):
    """What a CUDA-graph replay does: the same launch (same tensors, same host arguments) with other lengths
    written into the same ``seq_lens`` tensor; each sequence is re-partitioned on the device from its new length
    (``fused``: the ticket counters each launch leaves zero serve the next)."""
    mod = kernels.decode_attention
    monkeypatch.setattr(mod, "FUSE_COMBINE", False)
    launches = []
    split_name = "_split_combine_kernel" if combine == "fused" else "_split_kernel"
    recs = fuse_combine(monkeypatch, mod, ("_split_kernel", "_combine_kernel")) if combine == "fused" else {}
    record_launches(monkeypatch, mod, split_name, launches)
    poison_workspace(monkeypatch, mod)
    hq, hkv, d, cap = 8, 2, 64, 200
    rounds = [[129, 0, 33, 200], [1, 200, 0, 64], [200, 31, 128, 0]]
    cover = [max(r[b] for r in rounds) for b in range(4)]  # the cache holds every round's keys
    x = make_inputs(gen, lens=cover, hq=hq, hkv=hkv, d=d, fp8=fp8)
    kvs = None if x["kv_scale"] is None else x["kv_scale"].to(DEVICE)
    q, kc, vc, bt = (t.to(DEVICE) for t in (q_of(x["qkv"], hq, d), x["kc"], x["vc"], x["bt"]))
    sl = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    out = torch.empty(4, hq, d, dtype=torch.bfloat16, device=DEVICE)
    for forced in (dict(num_splits=4, min_partition=32, block_n=16), {}):  # forced, then the launcher's own rule
        launches.clear()
        for lens in rounds:
            sl.copy_(torch.tensor(lens, dtype=torch.int32))
            out.fill_(float("nan"))
            mod.launch_decode_attention(q, kc, vc, bt, sl, out, x["scale"], kvs, max_seq_len=cap, **forced)
            oracle = A.decode_attention_math(q, kc, vc, bt, sl, scale=x["scale"], kv_scale=kvs, max_seq_len=cap,
                                             dtype=torch.float64)
            assert_elementwise(out, oracle, torch.bfloat16, f"relaunch lens={lens} {forced} fp8={fp8}")
        assert len(launches) == len(rounds) and all(rec == launches[0] for rec in launches)
        assert all(not rec.launches for rec in recs.values()), "fused combine: an unfused kernel ran"
        assert all(int(c.abs().sum()) == 0 for c in mod._COUNTERS.values()), "ticket counters not re-armed"


@pytest.mark.skipif(ON_GPU, reason="counts the interpreter's calls of a device function")
def test_fused_combine_runs_once_per_group(gen, kernels, monkeypatch):
    """The interpreter runs a launch's programs one after another (every split of one group before the next
    group), so an output that only the last program's combine gets right, or groups sharing one counter, would
    still pass there: count the combines (exactly one per (sequence, kv head) whose keys span two or more
    partitions, none for one partition (written directly) or none (zeros)), and give the counters of the groups
    that never draw a ticket, and those past ``B * Hkv``, a sentinel that must stay (a group counting on another's
    counter then never sees its last ticket)."""
    mod = kernels.decode_attention
    calls = []
    real = mod._combine_group

    def scalar(v):  # an interpreter scalar (a tl.tensor over a 1-element numpy array)
        return int(v.handle.data.reshape(-1)[0])

    def counting(*args, **kw):
        calls.append((scalar(args[6]), scalar(args[9])))  # (b, n_used)
        return real(*args, **kw)

    monkeypatch.setattr(mod, "_combine_group", counting)
    fuse_combine(monkeypatch, mod)
    lens, hkv, sentinel = [0, 1, 32, 33, 129, 200], 2, 1000  # partitions of 32 / 32 / 32 / 32 / 48 / 64 keys
    ticking = torch.zeros(mod.COUNTERS_MIN, dtype=torch.bool)  # 0, 1, 1, 2, 3, 4 of them used
    ticking[3 * hkv: 6 * hkv] = True
    cnt = torch.where(ticking, 0, sentinel).to(torch.int32).to(DEVICE)
    monkeypatch.setattr(mod, "_COUNTERS", {torch.device(DEVICE): cnt})
    run_case(gen, DEVICE, lens=lens, hq=4, hkv=hkv, d=64, num_splits=4, min_partition=32, block_n=16,
             max_seq_len=200)
    assert sorted(calls) == sorted((b, used) for b, used in [(3, 2), (4, 3), (5, 4)] for _ in range(2)), calls
    assert torch.equal(cnt.cpu(), torch.where(ticking, 0, sentinel).to(torch.int32)), "a counter of another group"


def test_combine_counters_rule_and_reset(kernels, monkeypatch):
    """The ticket counters a fused-combine launch gets: none for one split or with fusion off, one zeroed buffer per
    device (reused while big enough, grown past it), and ``reset_combine_counters`` re-arms them all."""
    mod = kernels.decode_attention
    monkeypatch.setattr(mod, "_COUNTERS", {})
    cfg = mod.pick_config(2, 2, 64, 2)
    out = torch.empty(2, 4, 64, device=DEVICE)
    assert cfg.num_splits > 1 and mod._combine_counters(cfg._replace(num_splits=1), out, 2, True) is None
    assert mod._combine_counters(cfg, out, 2, False) is None
    cnt = mod._combine_counters(cfg, out, 2, True)
    assert cnt.dtype == torch.int32 and cnt.numel() == mod.COUNTERS_MIN and int(cnt.abs().sum()) == 0
    assert mod._combine_counters(cfg, out, 2, None if mod.FUSE_COMBINE else True) is cnt
    big = torch.empty(mod.COUNTERS_MIN, 4, 64, device=DEVICE)  # B * Hkv = 2 * COUNTERS_MIN: a bigger buffer
    grown = mod._combine_counters(cfg, big, 2, True)
    assert grown.numel() == 2 * mod.COUNTERS_MIN and any(k is cnt for k in mod._KEEP)  # alive for old graphs
    cnt[:3] = 7
    grown[-1] = 5
    mod.reset_combine_counters()
    assert int(cnt.abs().sum()) == 0 and int(grown.abs().sum()) == 0


def test_split_rule_candidate(kernels, monkeypatch):
    """``SPLIT_WAVES`` / ``MULTI_SPLIT_TILE`` (``bench_e2e.py --split-ab`` sets 4 / 64): more splits from the larger
    target, and their tile where the splits make at least 2 programs an SM; B 1 (128 programs) and one-split
    launches keep theirs."""
    mod = kernels.decode_attention
    monkeypatch.setattr(mod, "SPLIT_WAVES", 4)
    monkeypatch.setattr(mod, "MULTI_SPLIT_TILE", 64)
    pick = mod.pick_config
    assert pick(8, 8, 128, 2) == (8, 128, 64, 4, 3)  # the B 8 sweep's best at 1040 / 1088 keys
    assert tuple(mod.partition_len(n, pick(8, 8, 128, 2)) for n in (1040, 4096)) == (192, 512)
    assert pick(1, 8, 128, 2) == (16, 128, 128, 4, 3)
    assert pick(64, 8, 128, 2) == (1, 128, 32, 4, 3)
    assert pick(32, 8, 128, 2)[:3] == (2, 128, 64)  # 256 programs: one split under the default rule
    assert pick(8, 8, 128, 2, cache_fp8=True) == (8, 128, 32, 4, 3)  # the FP8 rule keeps WAVES
