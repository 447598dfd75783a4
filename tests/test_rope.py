"""QK-norm + RoPE and RoPE + paged KV-cache write (:mod:`tpfuse.rope`): Triton kernels vs the plain-torch reference
vs an fp64 oracle.

Where the kernel cases run (``test_case_*``, the ``kernels`` fixture of tests/conftest.py): compiled on a GPU;
through the Triton interpreter on a CPU-only machine (``TPFUSE_TRITON_CPU=1`` makes the public ops take the Triton
path on CPU tensors). GPU machines (marker ``gpu``) add bigger shapes, CUDA-graph capture/replay and
``torch.compile(fullgraph=True)``.

Checks: every output element against the fp64 oracle (NaN where the oracle has NaN, else within 2 bf16 ulps of it;
an element the kernel forgot to write keeps its input value and fails), the relative norm error against the
shared tolerance, untouched v columns and row padding (poisoned, must keep their bytes), caches poisoned with NaN
bytes where unwritten slots (slot -1, or never addressed) must keep the poison and written slots must equal, byte
for byte, the reference cache write of the kernel's own roped k and v (bf16 and FP8 e4m3).
"""

import pytest
import torch

from kernel_env import DEVICE, POISON, capture, gpu_only, poisoned, record_launches
from tpfuse import rope as R
from tpfuse.errors import TPFuseInputError
from tpfuse.tolerance import assert_close

FP8 = torch.float8_e4m3fn


# --------------------------------------------------------------------------------------------------------------
# helpers


def make_cos_sin_cache(max_pos, rot_dim, dtype=torch.float32, base=10000.0):
    """vLLM's layout: ``[max_pos, rot_dim]``, cos of the ``rot_dim / 2`` frequencies first, then sin."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    f = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((f.cos(), f.sin()), dim=-1).to(dtype)


def same_bytes_or_both_nan(a, b):
    """Elementwise: identical values, or both NaN (NaN payloads may differ)."""
    a32, b32 = a.float(), b.float()
    return (a32 == b32) | (torch.isnan(a32) & torch.isnan(b32))


def assert_elementwise(out, oracle, dtype, what, ulps=None):
    """Every element within ``ulps`` units in the last place of ``dtype`` of the oracle (NaN exactly where it has
    NaN): 2 for bf16/fp16 (one final rounding), 64 for fp32 (the fp32 norm and rope arithmetic itself)."""
    ulps = ulps if ulps is not None else (64.0 if dtype == torch.float32 else 2.0)
    o, r = out.double().cpu(), oracle.double().cpu()
    nan_r = torch.isnan(r)
    assert torch.equal(torch.isnan(o), nan_r), f"{what}: NaN positions differ from the oracle"
    eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[dtype]
    # relative to the element, with a floor at the tensor's largest finite magnitude (rope's a*c - b*s cancels)
    finite = r[torch.isfinite(r)]
    floor = ulps * eps * 0.25 * (finite.abs().max() if finite.numel() else torch.tensor(0.0, dtype=r.dtype))
    tol = ulps * eps * r.abs() + floor
    bad = (~nan_r) & ((o - r).abs() > tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {r.numel()} elements off the oracle, first at "
                           f"{bad.nonzero()[0].tolist()}: {o[bad][0].item()} vs {r[bad][0].item()}")
    if (~nan_r).any():
        assert_close(o[~nan_r], r[~nan_r], dtype, what)


def launch_qk(qkv, qw, kw, cs, pos, hq, hkv, d, eps, neox, gemma, block_h):
    if block_h is None:
        return R.qk_norm_rope(qkv, qw, kw, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d, eps=eps,
                              is_neox=neox, gemma=gemma)
    from tpfuse.kernels.rope import launch_qk_norm_rope

    launch_qk_norm_rope(qkv, qw, kw, cs, pos, hq, hkv, d, eps, neox, gemma, block_h=block_h)
    return qkv[:, : hq * d], qkv[:, hq * d: (hq + hkv) * d]


def launch_kv(q, k, v, pos, cs, kc, vc, slots, neox, scale, block_h):
    if block_h is None:
        return R.rope_kv_cache_write(q, k, v, pos, cs, kc, vc, slots, is_neox=neox, kv_scale=scale)
    from tpfuse.kernels.rope import launch_rope_kv_cache_write

    launch_rope_kv_cache_write(q, k, v, pos, cs, kc, vc, slots, neox, scale, block_h=block_h)
    return q, k


def run_qk_case(gen, device, *, t, hq, hkv, d, neox, cache_dtype=torch.float32, dtype=torch.bfloat16,
                gemma=False, nan=False, block_h=None, eps=1e-6, pad=24):
    width = (hq + 2 * hkv) * d
    base = poisoned((t, width + pad), dtype, "cpu")  # row stride > width; the padding must keep its poison
    base[:, :width] = (torch.randn(t, width, generator=gen) * 3.0).to(dtype)
    if nan and t > 1:
        base[1, 1 * d + 5] = float("nan")  # q head 1 of token 1 -> whole head NaN
        base[0, (hq + 0) * d + 3] = float("inf")  # k head 0 of token 0: rstd = 0, inf * 0 = NaN there (+ partner)
    qw = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    kw = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    max_pos = 4 * t + 64
    cs = make_cos_sin_cache(max_pos, d, cache_dtype)
    pos = torch.randperm(max_pos, generator=gen)[:t]  # out of order, not a range
    before = base.clone()
    qkv_in = base[:, :width]
    oracle_q, oracle_k = R.qk_norm_rope_math(qkv_in, qw, kw, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                                             eps=eps, is_neox=neox, gemma=gemma, dtype=torch.float64)
    ref_q, ref_k = R.qk_norm_rope_ref(qkv_in, qw, kw, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d, eps=eps,
                                      is_neox=neox, gemma=gemma)
    dev_base = base.to(device)
    qkv = dev_base[:, :width]
    q, k = launch_qk(qkv, qw.to(device), kw.to(device), cs.to(device), pos.to(device), hq, hkv, d, eps, neox,
                     gemma, block_h)
    assert q.data_ptr() == qkv.data_ptr() and q.shape == (t, hq * d) and k.shape == (t, hkv * d)
    out = dev_base.cpu()
    tag = f"qk t={t} hq={hq} hkv={hkv} d={d} neox={neox} bh={block_h}"
    assert_elementwise(out[:, : hq * d].reshape(t, hq, d), oracle_q, dtype, tag + " q")
    assert_elementwise(out[:, hq * d: (hq + hkv) * d].reshape(t, hkv, d), oracle_k, dtype, tag + " k")
    assert_elementwise(out[:, : hq * d], ref_q.float(), dtype, tag + " q vs reference")
    assert_elementwise(out[:, hq * d: (hq + hkv) * d], ref_k.float(), dtype, tag + " k vs reference")
    v_and_pad = slice((hq + hkv) * d, None)
    assert torch.equal(out[:, v_and_pad].view(torch.uint8 if dtype.itemsize == 1 else torch.int16 if
                                              dtype.itemsize == 2 else torch.int32),
                       before[:, v_and_pad].view(torch.uint8 if dtype.itemsize == 1 else torch.int16 if
                                                 dtype.itemsize == 2 else torch.int32)), tag + ": v/padding changed"
    if nan and t > 1:
        assert torch.isnan(out[1, d: 2 * d].float()).all() and torch.isnan(out[0, hq * d: (hq + 1) * d].float()).any()
        assert not torch.isnan(out[:, : hq * d].reshape(t, hq, d)[2:]).any()


def run_kv_case(gen, device, *, t, hq, hkv, d, neox, fp8=False, cache_dtype=torch.float32, dtype=torch.bfloat16,
                nan=False, block_h=None, block_size=4):
    # q/k/v as views of one qkv buffer (the layout attention layers pass)
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, generator=gen) * 2.0).to(dtype)
    if nan and t > 2:
        qkv[2, 3] = float("nan")  # q head 0 element 3: NaN spreads to its rotation partner only
        qkv[1, (hq + hkv) * d + 7] = float("nan")  # v: stays NaN in the cache
    q0, k0, v0 = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q0, k0, v0 = q0.view(t, hq, d), k0.view(t, hkv, d), v0.view(t, hkv, d)
    max_pos = 2 * t + 32
    cs = make_cos_sin_cache(max_pos, d, cache_dtype)
    pos = torch.randperm(max_pos, generator=gen)[:t]
    num_blocks = (t + 3) // block_size + 2
    cdt = FP8 if fp8 else dtype
    perm = torch.randperm(num_blocks * block_size, generator=gen)[:t]  # out of order, never repeated
    slots = perm.clone()
    slots[1::3] = -1  # every third token from the second on is skipped
    scale = torch.tensor(0.037, dtype=torch.float32) if fp8 else None
    kc_dev = poisoned((num_blocks, block_size, hkv, d), cdt, device)
    vc_dev = poisoned((num_blocks, block_size, hkv, d), cdt, device)
    oq, ok = R.rope_math(q0.double(), *R.cos_sin(cs, pos, torch.float64), neox), \
        R.rope_math(k0.double(), *R.cos_sin(cs, pos, torch.float64), neox)
    qkv_dev = qkv.to(device)
    qd, kd, vd = qkv_dev.split([hq * d, hkv * d, hkv * d], dim=-1)
    qd, kd, vd = qd.view(t, hq, d), kd.view(t, hkv, d), vd.view(t, hkv, d)
    q, k = launch_kv(qd, kd, vd, pos.to(device), cs.to(device), kc_dev, vc_dev, slots.to(device), neox,
                     None if scale is None else scale.to(device), block_h)
    assert q.data_ptr() == qd.data_ptr() and k.data_ptr() == kd.data_ptr()
    tag = f"kv t={t} hq={hq} hkv={hkv} d={d} neox={neox} fp8={fp8} bh={block_h}"
    q_out, k_out, v_out = q.cpu(), k.cpu(), vd.cpu()
    assert_elementwise(q_out, oq, dtype, tag + " q")
    assert_elementwise(k_out, ok, dtype, tag + " k")
    assert torch.equal(v_out.view(torch.int16), v0.view(torch.int16)), tag + ": v changed"
    # the caches: exactly the reference write of the kernel's own roped k and v, poison elsewhere
    kc_exp = poisoned(kc_dev.shape, cdt, "cpu")
    vc_exp = poisoned(vc_dev.shape, cdt, "cpu")
    R.kv_cache_write_ref(k_out, v0, kc_exp, vc_exp, slots, scale)
    for name, got, exp in (("key_cache", kc_dev.cpu(), kc_exp), ("value_cache", vc_dev.cpu(), vc_exp)):
        ok_el = same_bytes_or_both_nan(got, exp)
        assert ok_el.all(), f"{tag}: {name} differs from the reference write at {int((~ok_el).sum())} elements"
        written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        written[slots[slots >= 0]] = True
        untouched = got.reshape(num_blocks * block_size, -1)[~written]
        assert torch.equal(untouched.view(torch.uint8), torch.full_like(untouched.view(torch.uint8), POISON)), \
            f"{tag}: {name} slots that were not addressed lost their poison"
        if not nan:
            assert not torch.isnan(got.reshape(num_blocks * block_size, -1)[written].float()).any(), \
                f"{tag}: {name} has unwritten (poisoned) elements in written slots"
    if fp8:  # and within one e4m3 step of the oracle: dequantized cache k vs oracle k
        from tpfuse.tolerance import fp8_step

        valid = slots >= 0
        s = slots[valid]
        deq = kc_dev.cpu().reshape(-1, hkv, d)[s].float() * scale
        r = ok[valid].float()
        step = fp8_step(r / scale) * scale
        assert ((deq - r).abs() <= step * 1.001 + 2.0 ** -8 * r.abs() * 2).all(), tag + ": fp8 k off the oracle"
    if nan and t > 2:
        nq = torch.isnan(q_out[2, 0].float())
        assert int(nq.sum()) == 2 and not torch.isnan(q_out[3:].float()).any()


# --------------------------------------------------------------------------------------------------------------
# reference path (CPU, plain torch): always runs here


def test_reference_matches_oracle_and_gpt_j_differs(gen):
    t, hq, hkv, d = 5, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen)
    qw, kw = torch.rand(d, generator=gen) + 0.5, torch.rand(d, generator=gen) + 0.5
    cs = make_cos_sin_cache(64, d)
    pos = torch.tensor([7, 0, 63, 3, 12])
    outs = {}
    for neox in (True, False):
        ref_q, ref_k = R.qk_norm_rope_ref(qkv, qw, kw, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-6,
                                          is_neox=neox)
        oq, ok = R.qk_norm_rope_math(qkv, qw, kw, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-6,
                                     is_neox=neox, dtype=torch.float64)
        assert_close(ref_q, oq.reshape(t, -1), torch.float32, "q")
        assert_close(ref_k, ok.reshape(t, -1), torch.float32, "k")
        outs[neox] = ref_q
    assert not torch.allclose(outs[True], outs[False])  # the two styles really differ
    # rope preserves each pair's norm: |rope(norm(x))| == |norm(x)| per head
    n = R.rmsnorm_math(qkv[:, : hq * d].reshape(t, hq, d).double(), qw, 1e-6)
    assert torch.allclose(outs[True].reshape(t, hq, d).double().norm(dim=-1), n.norm(dim=-1), rtol=1e-5)


def test_rope_math_against_complex_rotation(gen):
    """Independent oracle: GPT-J rope == multiplying (x_2i + i x_2i+1) by e^{i p f}; NeoX the same on halves."""
    t, h, d = 3, 2, 16
    x = torch.randn(t, h, d, generator=gen, dtype=torch.float64)
    cs = make_cos_sin_cache(10, d, torch.float64)
    pos = torch.tensor([9, 1, 4])
    c, s = R.cos_sin(cs, pos, torch.float64)
    rot = torch.polar(torch.ones_like(c), torch.atan2(s, c))[:, None, :]
    gptj = torch.view_as_real(torch.view_as_complex(x.reshape(t, h, d // 2, 2).contiguous()) * rot).reshape(t, h, d)
    assert torch.allclose(R.rope_math(x, c, s, False), gptj)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * rot
    assert torch.allclose(R.rope_math(x, c, s, True), torch.cat((z.real, z.imag), dim=-1))


def test_public_ops_cpu_reference_path(gen, monkeypatch):
    monkeypatch.delenv("TPFUSE_TRITON_CPU", raising=False)
    run_qk_case(gen, "cpu", t=3, hq=4, hkv=2, d=64, neox=True)
    run_kv_case(gen, "cpu", t=7, hq=4, hkv=2, d=64, neox=False, fp8=True)


def test_opcheck_fake_impls(gen, monkeypatch):
    monkeypatch.delenv("TPFUSE_TRITON_CPU", raising=False)
    t, hq, hkv, d = 3, 2, 1, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).bfloat16()
    w = torch.ones(d)
    cs, pos = make_cos_sin_cache(16, d), torch.tensor([3, 1, 2])
    torch.library.opcheck(torch.ops.tpfuse.qk_norm_rope_.default, (qkv, w, w, cs, pos, hq, hkv, d, 1e-6, True, False))
    q, k, v = (torch.randn(t, h, d, generator=gen).bfloat16() for h in (hq, hkv, hkv))
    # bf16 cache: opcheck's schema test multiplies the mutated tensors, which e4m3 tensors do not support on CPU
    kc, vc = torch.zeros(2, 4, hkv, d).bfloat16(), torch.zeros(2, 4, hkv, d).bfloat16()
    torch.library.opcheck(torch.ops.tpfuse.rope_kv_cache_write_.default,
                          (q, k, v, pos, cs, kc, vc, torch.tensor([0, -1, 5]), False, None))


def test_input_validation():
    qkv = torch.zeros(2, 4 * 64)
    w = torch.ones(64)
    cs = make_cos_sin_cache(8, 64)
    pos = torch.zeros(2, dtype=torch.long)
    with pytest.raises(TPFuseInputError):
        R.qk_norm_rope(qkv, w, w, cs, pos, num_heads=2, num_kv_heads=2, head_dim=64)  # width mismatch
    with pytest.raises(TPFuseInputError):
        R.qk_norm_rope(torch.zeros(2, 4 * 64), w, w, cs[:, :32], pos, num_heads=2, num_kv_heads=1, head_dim=64)
    q, k = torch.zeros(2, 2, 64), torch.zeros(2, 1, 64)
    kc = torch.zeros(2, 4, 1, 64).to(FP8)
    with pytest.raises(TPFuseInputError):  # FP8 cache without a scale
        R.rope_kv_cache_write(q, k, k.clone(), pos, cs, kc, kc.clone(), pos, is_neox=True)


def test_public_ops_launch_the_triton_kernels(gen, kernels, monkeypatch):
    """Under the ``kernels`` fixture (every ``test_case_*`` below) the public ops run the Triton kernels, not the
    torch reference: interpreted on CPU (the fixture checks that), compiled on CUDA."""
    qk = record_launches(monkeypatch, kernels.rope, "_qk_norm_rope_kernel")
    kv = record_launches(monkeypatch, kernels.rope, "_rope_kv_cache_kernel")
    run_qk_case(gen, DEVICE, t=3, hq=4, hkv=2, d=64, neox=True)
    run_kv_case(gen, DEVICE, t=7, hq=4, hkv=2, d=64, neox=False, fp8=True)
    assert len(qk.launches) == 1 and len(kv.launches) == 1


# --------------------------------------------------------------------------------------------------------------
# kernel cases: Triton interpreter (CPU) or CUDA


kernel_case = pytest.mark.usefixtures("kernels")  # compiled on CUDA, interpreted on CPU


@kernel_case
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("t,block_h", [(1, None), (7, None), (5, 4)])
def test_case_qk_norm_rope(gen, neox, d, t, block_h):
    # GQA; with block_h=4 the 6 + 3 = 9 heads leave a partial head block (q and k heads mixed in one program)
    run_qk_case(gen, DEVICE, t=t, hq=6, hkv=3, d=d, neox=neox, block_h=block_h,
                cache_dtype=torch.bfloat16 if t == 7 else torch.float32)


@kernel_case
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_case_qk_norm_rope_gemma_fp32_nan(gen, neox):
    run_qk_case(gen, DEVICE, t=4, hq=4, hkv=1, d=64, neox=neox, gemma=True, nan=True)
    run_qk_case(gen, DEVICE, t=3, hq=2, hkv=2, d=64, neox=neox, dtype=torch.float32, block_h=2, nan=True)


@kernel_case
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
@pytest.mark.parametrize("t,block_h", [(7, None), (5, 4)])
def test_case_rope_kv_cache_write(gen, neox, d, fp8, t, block_h):
    run_kv_case(gen, DEVICE, t=t, hq=6, hkv=3, d=d, neox=neox, fp8=fp8, block_h=block_h,
                cache_dtype=torch.bfloat16 if d == 128 else torch.float32)


@kernel_case
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16cache", "fp8cache"])
def test_case_rope_kv_cache_write_one_token_and_nan(gen, fp8):
    run_kv_case(gen, DEVICE, t=1, hq=4, hkv=2, d=128, neox=True, fp8=fp8)
    run_kv_case(gen, DEVICE, t=9, hq=4, hkv=2, d=64, neox=False, fp8=fp8, nan=True)


# --------------------------------------------------------------------------------------------------------------
# GPU only


@gpu_only
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("t", [333, 4096])
def test_gpu_big_shapes(gen, neox, t):
    run_qk_case(gen, "cuda", t=t, hq=32, hkv=8, d=128, neox=neox)
    run_kv_case(gen, "cuda", t=t, hq=32, hkv=8, d=128, neox=neox, fp8=(t == 333), block_size=16)
    run_qk_case(gen, "cuda", t=t // 3, hq=16, hkv=4, d=256, neox=neox)


def _qwen_inputs(t, hq=8, hkv=2, d=128, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device, generator=g).bfloat16()
    w = (torch.rand(d, device=device, generator=g) + 0.5).bfloat16()
    cs = make_cos_sin_cache(4096, d).to(device)
    pos = torch.randint(0, 4096, (t,), device=device, generator=g)
    return qkv, w, cs, pos


@gpu_only
def test_gpu_cuda_graph_capture_replay():
    t, hq, hkv, d = 37, 8, 2, 128
    qkv, w, cs, pos = _qwen_inputs(t)
    static = qkv.clone()
    kc = torch.zeros(8, 16, hkv, d, device="cuda", dtype=FP8)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(128, device="cuda")[:t]
    scale = torch.tensor(0.05, device="cuda")
    q2, k2, v2 = (torch.randn(t, h, d, device="cuda").bfloat16() for h in (hq, hkv, hkv))
    sq, sk = q2.clone(), k2.clone()

    def step():
        R.qk_norm_rope(static, w, w, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-6, is_neox=True)
        R.rope_kv_cache_write(sq, sk, v2, pos, cs, kc, vc, slots, is_neox=True, kv_scale=scale)

    graph, _ = capture(step)
    for seed in (1, 2):
        new_qkv, _, _, new_pos = _qwen_inputs(t, seed=seed)
        static.copy_(new_qkv)
        pos.copy_(new_pos)
        sq.copy_(q2)
        sk.copy_(k2)
        graph.replay()
        torch.cuda.synchronize()
        ref_q, ref_k = R.qk_norm_rope_ref(new_qkv.cpu(), w.cpu(), w.cpu(), cs.cpu(), new_pos.cpu(), num_heads=hq,
                                          num_kv_heads=hkv, head_dim=d, eps=1e-6, is_neox=True)
        assert_close(static[:, : hq * d], ref_q.cuda(), torch.bfloat16, "graph q")
        assert_close(static[:, hq * d: (hq + hkv) * d], ref_k.cuda(), torch.bfloat16, "graph k")
        kc_ref = torch.zeros(kc.shape, dtype=FP8)
        vc_ref = torch.zeros_like(kc_ref)
        rq, rk = R.rope_kv_cache_write_ref(q2.cpu(), k2.cpu(), v2.cpu(), new_pos.cpu(), cs.cpu(), kc_ref, vc_ref,
                                           slots.cpu(), is_neox=True, kv_scale=scale.cpu())
        assert_close(sq, rq.cuda(), torch.bfloat16, "graph rope q")
        assert_close(kc.float(), kc_ref.cuda().float(), torch.bfloat16, "graph fp8 key cache", factor=6.0)
        assert same_bytes_or_both_nan(vc.cpu(), vc_ref).all()


@gpu_only
def test_gpu_torch_compile_fullgraph():
    t, hq, hkv, d = 19, 8, 2, 128
    qkv, w, cs, pos = _qwen_inputs(t)
    kc = torch.zeros(4, 16, hkv, d, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(t, device="cuda")

    def block(qkv, kc, vc):
        q, k = R.qk_norm_rope(qkv, w, w, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-6, is_neox=True)
        v = qkv[:, (hq + hkv) * d:]
        q3 = q.clone().view(t, hq, d)
        k3 = k.clone().view(t, hkv, d)
        q3, k3 = R.rope_kv_cache_write(q3, k3, v.view(t, hkv, d), pos, cs, kc, vc, slots, is_neox=False)
        return q3.sum(dim=-1) * 2.0, k3 + 1.0

    eager_in, comp_in = qkv.clone(), qkv.clone()
    kc_e, vc_e, kc_c, vc_c = kc.clone(), kc.clone(), kc.clone(), kc.clone()
    e_out = block(eager_in, kc_e, vc_e)
    compiled = torch.compile(block, fullgraph=True)
    c_out = compiled(comp_in, kc_c, vc_c)
    torch.cuda.synchronize()
    for a, b in zip(e_out, c_out):
        assert torch.equal(a, b)
    assert torch.equal(eager_in, comp_in)  # the in-place update of qkv is kept under compile
    assert torch.equal(kc_e, kc_c) and torch.equal(vc_e, vc_c)
