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


def run_case(gen, device, *, lens, hq, hkv, d, block_size=16, dtype=torch.bfloat16, fp8=False, partition=None,
             block_n=None, max_seq_len=None, extra_cols=1):
    """Build the inputs, run the op on ``device`` (public op, or the launcher with a forced partition / tile),
    check against the oracle and the reference; returns the output (CPU)."""
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
    if partition is None and block_n is None:
        got = A.decode_attention(q, *dev[1:], scale=x["scale"], kv_scale=kvs, out=out, max_seq_len=max_seq_len)
        assert got is out
    else:
        from tpfuse.kernels.decode_attention import launch_decode_attention

        cap = max_seq_len or x["bt"].shape[1] * block_size
        launch_decode_attention(q, *dev[1:], out, x["scale"], kvs, max_seq_len=cap, partition=partition,
                                block_n=block_n)
    tag = f"lens={lens[:6]}{'...' if bsz > 6 else ''} hq={hq} hkv={hkv} d={d} {dtype} fp8={fp8} p={partition}"
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
    # a block table of 40 columns: the launcher's own heuristic picks several partitions (max_seq_len 640), most
    # of them empty; then max_seq_len below some lengths: keys past it are ignored (as the reference does)
    run_case(gen, DEVICE, lens=[0, 130, 300], hq=4, hkv=2, d=64, extra_cols=20)
    run_case(gen, DEVICE, lens=[50, 10, 33], hq=4, hkv=1, d=64, max_seq_len=32)


@kernel_case
def test_case_d256_and_d16(gen):
    run_case(gen, DEVICE, lens=[20, 0, 1], hq=4, hkv=2, d=256, partition=32, block_n=16)
    run_case(gen, DEVICE, lens=[20, 16], hq=2, hkv=1, d=16, fp8=True)


# --------------------------------------------------------------------------------------------------------------
# GPU only (marker gpu)



@gpu_only
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
@pytest.mark.parametrize("hq", [32, 64])
def test_gpu_big_shapes(gen, hq, fp8):
    lens = torch.randint(0, 8193, (64,), generator=gen).tolist()
    lens[:4] = [8192, 0, 1, 4097]
    run_case(gen, "cuda", lens=lens, hq=hq, hkv=8, d=128, fp8=fp8)
    run_case(gen, "cuda", lens=[8192], hq=hq, hkv=8, d=128, fp8=fp8)  # B=1: many splits
    run_case(gen, "cuda", lens=[4096, 1000, 17], hq=hq, hkv=8, d=128, fp8=fp8, max_seq_len=16384, extra_cols=900)


def _graph_inputs(gen, bsz, hq, hkv, d, max_blocks, num_blocks, block_size, fp8):
    """Random contents for the static tensors of the graph test (whole cache valid: lengths vary per replay)."""
    cdt = FP8 if fp8 else torch.bfloat16
    kc = (torch.randn(num_blocks, block_size, hkv, d, generator=gen) * (1.5 / 0.05 if fp8 else 1.0)).to(cdt)
    vc = (torch.randn(num_blocks, block_size, hkv, d, generator=gen) * (1.5 / 0.05 if fp8 else 1.0)).to(cdt)
    bt = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(bsz)]).to(torch.int32)
    q = (torch.randn(bsz, hq, d, generator=gen) * 3).bfloat16()
    return q, kc, vc, bt


@gpu_only
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_gpu_cuda_graph_capture_replay(gen, fp8):
    bsz, hq, hkv, d, bs, max_blocks, num_blocks = 16, 32, 8, 128, 16, 128, 600
    cap = max_blocks * bs  # 2048: the heuristic splits (B * Hkv = 128 programs per partition)
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


@pytest.mark.parametrize("batch,keys,bf16_cfg,fp8_cfg", [
    # (PARTITION, BLOCK_N, NUM_SPLITS, num_warps) at the points the docstring names (Hkv 8, D 128, bf16 q)
    (1, 1024, (128, 128, 8, 4), (128, 64, 8, 4)),
    (1, 4096, (256, 128, 16, 4), (128, 64, 32, 4)),
    (8, 1024, (256, 128, 4, 4), (128, 64, 8, 4)),
    (8, 4096, (1024, 128, 4, 8), (512, 64, 8, 4)),
    (64, 1024, (1024, 128, 1, 8), (1024, 64, 1, 4)),
    (64, 4096, (2048, 128, 2, 8), (2048, 64, 2, 4)),
])
def test_pick_config_rule(kernels, batch, keys, bf16_cfg, fp8_cfg):
    pick = kernels.decode_attention.pick_config
    assert pick(batch, 8, keys, 128, 2) == bf16_cfg
    assert pick(batch, 8, keys, 128, 2, cache_fp8=True) == fp8_cfg
    assert pick(1, 8, 1 << 17, 128, 2)[0] == 2048  # the partition cap: long contexts get more splits, not longer loops
    assert pick(2, 4, 4096, 256, 2)[1] == 32 and pick(2, 4, 4096, 128, 4)[1] == 32  # D=256 / fp32 q: small tiles
    with pytest.raises(ValueError, match="multiple of block_n"):
        pick(1, 8, 1024, 128, 2, partition=192)
