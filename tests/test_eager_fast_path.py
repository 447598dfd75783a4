"""The eager fast path of the local ops (public functions call the op bodies and launchers directly, no custom-op
dispatch) gives the same bytes as the custom-op path, and torch.compile(fullgraph=True) still goes through the
custom ops. CPU: Triton interpreter (the ``kernels`` fixture, tests/kernel_env.py); GPU: the compiled kernels.

GPU only (``gpu`` marker): the direct ``CompiledKernel`` launches of :mod:`tpfuse.kernels.fast_launch` against the
normal JIT call, bit for bit, over shapes, formats and pointer alignments (misaligned views included), and the
cached compiled kernel of every call is the very one the JIT picks for those arguments.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernel_env import DEVICE, ON_GPU
from tpfuse import ops, rope
from tpfuse import quant as q

pytestmark = pytest.mark.usefixtures("kernels")


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t  # 0-d scales too


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
        return
    if isinstance(a, q.QuantizedActivation):
        _same((a.data, a.scale), (b.data, b.scale))
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(_bytes(a), _bytes(b))


def _specs():
    return [None, q.FP8Static(torch.tensor(0.02, device=DEVICE)), q.FP8PerToken(), q.FP8PerGroup(128),
            q.NVFP4(torch.tensor(448.0 * 6 / 4.0, device=DEVICE)), q.NVFP4(torch.tensor(300.0, device=DEVICE),
                                                                           "linear")]


def _rand(gen, *shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


class _OpLog(TorchDispatchMode):
    """Records the tpfuse custom ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "tpfuse" in str(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec_i", range(6))
def test_add_rmsnorm_eager_equals_custom_op(gen, spec_i):
    spec = _specs()[spec_i]
    t, h = 3, 256
    x, r, w = _rand(gen, t, h), _rand(gen, t, h), _rand(gen, h)
    fmt, group, in_scale = ops.spec_to_args(spec)
    with _OpLog() as log:
        out, res = ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
    assert log.ops == []  # eager: no custom-op dispatch
    data, scale, res_op = torch.ops.tpfuse.add_rmsnorm(x, r, w, 1e-6, fmt, group, in_scale, False)
    _same(res, res_op)
    if spec is None:
        _same(out, data)
    else:
        _same(out.data, data)
        if not isinstance(spec, q.FP8Static):
            _same(out.scale, scale)
    # no residual, and the in-place residual form
    out0, _ = ops.add_rmsnorm(x, None, w, 1e-6, quant=spec)
    d0, _, _ = torch.ops.tpfuse.add_rmsnorm(x, None, w, 1e-6, fmt, group, in_scale, False)
    _same(out0 if spec is None else out0.data, d0)
    r_a, r_b = r.clone(), r.clone()
    out_a, res_a = ops.add_rmsnorm(x, r_a, w, 1e-6, quant=spec, residual_inplace=True)
    d_b, _ = torch.ops.tpfuse.add_rmsnorm_(x, r_b, w, 1e-6, fmt, group, in_scale, False)
    assert res_a is r_a
    _same(r_a, r_b)
    _same(out_a if spec is None else out_a.data, d_b)


@pytest.mark.parametrize("spec_i", [0, 1, 3, 5])
def test_silu_mul_and_quantize_eager_equal_custom_ops(gen, spec_i):
    spec = _specs()[spec_i]
    t, i = 3, 256
    gu = _rand(gen, t, 2 * i)
    fmt, group, in_scale = ops.spec_to_args(spec)
    with _OpLog() as log:
        out = ops.silu_mul(gu, quant=spec)
        qa = ops.quantize(gu, spec) if spec is not None else None
    assert log.ops == []
    data, scale = torch.ops.tpfuse.silu_mul(gu, fmt, group, in_scale)
    _same(out if spec is None else out.data, data)
    if spec is not None:
        qd, qs = torch.ops.tpfuse.quantize(gu, fmt, group, in_scale)
        _same(qa.data, qd)
        if not isinstance(spec, q.FP8Static):
            _same(qa.scale, qs)


def _rope_inputs(gen, t=3, hq=4, hkv=2, d=64, p=32):
    ang = torch.arange(p, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
    cs = torch.cat([ang.cos(), ang.sin()], dim=-1).to(DEVICE)
    pos = torch.randint(0, p, (t,), generator=gen).to(DEVICE)
    return cs, pos


@pytest.mark.parametrize("is_neox", [True, False])
def test_rope_eager_equals_custom_ops(gen, is_neox):
    t, hq, hkv, d = 3, 4, 2, 64
    cs, pos = _rope_inputs(gen, t, hq, hkv, d)
    qkv = _rand(gen, t, (hq + 2 * hkv) * d)
    qw, kw = _rand(gen, d), _rand(gen, d)
    a, b = qkv.clone(), qkv.clone()
    with _OpLog() as log:
        rope.qk_norm_rope(a, qw, kw, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d, is_neox=is_neox)
    assert log.ops == []
    torch.ops.tpfuse.qk_norm_rope_(b, qw, kw, cs, pos, hq, hkv, d, 1e-6, is_neox, False)
    _same(a, b)

    qq, kk, vv = _rand(gen, t, hq, d), _rand(gen, t, hkv, d), _rand(gen, t, hkv, d)
    slots = torch.tensor([5, -1, 9], device=DEVICE)[:t]
    kc = torch.zeros(4, 4, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    res = []
    for use_op in (False, True):
        q2, k2, kc2, vc2 = qq.clone(), kk.clone(), kc.clone(), kc.clone()
        if use_op:
            torch.ops.tpfuse.rope_kv_cache_write_(q2, k2, vv, pos, cs, kc2, vc2, slots, is_neox, None)
        else:
            with _OpLog() as log:
                rope.rope_kv_cache_write(q2, k2, vv, pos, cs, kc2, vc2, slots, is_neox=is_neox)
            assert log.ops == []
        res.append((q2, k2, kc2, vc2))
    _same(res[0], res[1])


def test_compile_fullgraph_goes_through_custom_ops(gen):
    torch._dynamo.reset()
    t, h, d, hq, hkv = 3, 256, 64, 4, 2
    x, r, w = _rand(gen, t, h), _rand(gen, t, h), _rand(gen, h)
    gu = _rand(gen, t, 2 * h)
    cs, pos = _rope_inputs(gen, t, hq, hkv, d)
    qkv = _rand(gen, t, (hq + 2 * hkv) * d)
    qw, kw = _rand(gen, d), _rand(gen, d)
    spec = q.FP8PerToken()

    def block(x, r, gu, qkv):
        out, res = ops.add_rmsnorm(x, r, w, 1e-6)
        y = ops.silu_mul(gu, quant=spec)
        z = ops.quantize(x, spec)
        qv, kv = rope.qk_norm_rope(qkv, qw, kw, cs, pos, num_heads=hq, num_kv_heads=hkv, head_dim=d)
        return out, res, y.data, y.scale, z.data, z.scale, qv.clone(), kv.clone()

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    eager = block(x, r, gu, qkv.clone())
    compiled = torch.compile(block, fullgraph=True, backend=backend)(x, r, gu, qkv.clone())
    _same(tuple(eager), tuple(compiled))
    for op in ("add_rmsnorm", "silu_mul", "quantize", "qk_norm_rope_"):
        assert any(s == f"tpfuse.{op}" or s.startswith(f"tpfuse.{op}.") for s in seen), (op, seen)


# --------------------------------------------------------------------------------------------------------------
# GPU: direct CompiledKernel launches (kernels/fast_launch.py) against the normal JIT path


def _views(gen, t, h, misalign):
    """``x [t, h]`` and a residual: plain, or views whose data pointers are off 16-byte alignment (``misalign``
    elements into a buffer) and whose row stride is not a multiple of 16 elements."""
    if not misalign:
        return _rand(gen, t, h), _rand(gen, t, h)
    stride = h + 3
    bx = _rand(gen, t * stride + misalign)
    br = _rand(gen, t * stride + misalign + 1)
    return (bx[misalign:misalign + t * stride].view(t, stride)[:, :h],
            br[misalign + 1:misalign + 1 + t * stride].view(t, stride)[:, :h])


def _run_all(gen_seed, shapes):
    """Outputs of every op for each shape: one list per shape (so a reversed shape order can be realigned)."""
    per_shape = []
    for t, h, misalign in shapes:
        out = []
        per_shape.append(out)
        g = torch.Generator().manual_seed(gen_seed + t * 7 + h + misalign)
        x, r = _views(g, t, h, misalign)
        w = _rand(g, h)
        for spec in _specs():
            if spec is not None and h % 128:
                continue
            o, res = ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
            out.append((o, res))
            gu = _rand(g, t, 2 * h)
            out.append(ops.silu_mul(gu, quant=spec))
            if spec is not None:
                out.append(ops.quantize(x.contiguous(), spec))
        if t <= 64:  # the small-M GEMM (decode rows), x read in place from the view
            from tpfuse import small_gemm

            out.append(small_gemm.small_m_gemm(x, _rand(g, 192, h)))
        cs, pos = _rope_inputs(g, t, 8, 2, 128, 64)
        qkv = _rand(g, t, (8 + 4) * 128)
        rope.qk_norm_rope(qkv, _rand(g, 128), _rand(g, 128), cs, pos, num_heads=8, num_kv_heads=2, head_dim=128)
        out.append(qkv)
        qq, kk, vv = _rand(g, t, 8, 128), _rand(g, t, 2, 128), _rand(g, t, 2, 128)
        blocks = max(8, -(-t // 16))  # every token gets its own slot
        kc, vc = torch.zeros(blocks, 16, 2, 128, dtype=torch.bfloat16, device=DEVICE), \
            torch.zeros(blocks, 16, 2, 128, dtype=torch.bfloat16, device=DEVICE)
        slots = torch.randperm(blocks * 16, generator=g)[:t].to(DEVICE)
        rope.rope_kv_cache_write(qq, kk, vv, pos, cs, kc, vc, slots)
        out.append((qq, kk, kc, vc))
    torch.cuda.synchronize()
    return per_shape


GPU_SHAPES = [(1, 4096, 0), (4, 4096, 0), (4, 4096, 1), (5, 4096, 8), (17, 8192, 0), (33, 2048, 3), (129, 4096, 0),
              (7, 5120, 0), (2, 640, 1), (300, 4096, 0)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_fast_launch_bit_exact_vs_jit():
    from tpfuse.kernels import fast_launch

    old = fast_launch.ENABLED
    try:
        fast_launch.ENABLED = False
        ref = _run_all(11, GPU_SHAPES)
        fast_launch.ENABLED = True
        fast_launch.clear()
        first = _run_all(11, GPU_SHAPES)   # fills the caches through the JIT
        direct = fast_launch.STATS["direct"]
        second = _run_all(11, GPU_SHAPES)  # direct launches
        assert fast_launch.STATS["direct"] > direct, fast_launch.STATS  # the direct path really ran
        third = _run_all(11, GPU_SHAPES[::-1])[::-1]  # other call order: hits found by key, not by sequence
    finally:
        fast_launch.ENABLED = old
    _same(ref, first)
    _same(ref, second)
    _same(ref, third)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_fast_launch_caches_the_kernel_the_jit_picks(monkeypatch):
    """For every call, the CompiledKernel the direct path launches is the one the JIT itself selects for those
    arguments (``JITFunction.warmup`` with the same arguments returns it)."""
    from tpfuse.kernels import fast_launch

    calls = []
    real = fast_launch.launch

    def recording(kernel, grid, args, consts, num_warps, num_stages=None, pdl=False):
        real(kernel, grid, args, consts, num_warps, num_stages, pdl)
        calls.append((kernel, grid, args, consts, num_warps, num_stages, pdl))

    monkeypatch.setattr(fast_launch, "launch", recording)  # the launchers call fast_launch.launch by attribute
    monkeypatch.setattr(fast_launch, "ENABLED", True)
    _run_all(5, GPU_SHAPES)
    _run_all(5, GPU_SHAPES)
    assert calls
    checked = 0
    for kernel, grid, args, consts, nw, ns, pdl in calls:
        state = getattr(kernel, "_tpfuse_compiled")
        key = fast_launch.key_for(state[0], args, consts, nw, ns, pdl)
        opts = {"num_warps": nw} if ns is None else {"num_warps": nw, "num_stages": ns}
        opts.update({"launch_pdl": True} if pdl else {})
        jit_pick = kernel.warmup(*args, grid=grid, **consts, **opts)
        assert fast_launch.cached_kernels(kernel)[key][3] is jit_pick
        checked += 1
    assert checked == len(calls)


# --------------------------------------------------------------------------------------------------------------
# every launcher: constexprs passed as the direct path needs them (CPU and GPU)


def _launch_attn_o_gemm(gen):
    """o_proj with the attention's combine folded in, plain and with the residual-add epilogue."""
    from tpfuse import attention_o as AO

    p = _rand(gen, 2, 4, 8, 32)  # [B, splits, Hq, D]
    ml = torch.zeros(2, 2 * 8 * 4, device=DEVICE)
    parts = AO.AttentionPartials(p, ml[0], ml[1] + 1.0, torch.tensor([300, 5], device=DEVICE), 512, 4, 128, 128)
    w = _rand(gen, 64, 256)
    AO.attn_o_gemm(parts, w)
    AO.attn_o_gemm_add(parts, w, _rand(gen, 2, 64), _rand(gen, 64))


def _launch_all_small_m(gen):
    """One small-M GEMM launch of every kernel entry: plain, serial and reduce split-K, folded norm, residual add
    (split 1 and 2: its reduce kernel), partial maxima (each with pointer and TMA weight loads), the CUDA-core
    loop."""
    from tpfuse import small_gemm
    from tpfuse.kernels import small_m_configs as smc
    from tpfuse.kernels import small_m_gemm as smg

    x, w = _rand(gen, 3, 256), _rand(gen, 64, 256)
    w8 = q._fp8_cast(w.float())
    ws = torch.ones(64, 1, device=DEVICE)
    sq = torch.rand(256 // smc.SUMSQ_ROWS, 3, generator=gen).to(DEVICE)
    for split, serial, tma in ((1, True, 0), (2, True, 0), (2, False, 0), (1, True, 1), (2, True, 1), (2, False, 1)):
        cfg = smc.GemmConfig(block_n=32, block_k=64, split_k=split, num_warps=4, num_stages=2, tma=tma)
        with smc.forced(cfg):
            old, smg.SERIAL = smg.SERIAL, serial
            try:
                small_gemm.small_m_gemm(x, w)
                small_gemm.small_m_gemm(x, w, norm_sumsq=sq)
                small_gemm.small_m_gemm_add(x, w, _rand(gen, 3, 64), _rand(gen, 64))
                small_gemm.small_m_gemm_amax(x, w)
            finally:
                smg.SERIAL = old
    old, smg.FMA_MAX_M = smg.FMA_MAX_M, 4
    try:
        small_gemm.small_m_gemm(x, w8, w_scale=ws)
    finally:
        smg.FMA_MAX_M = old


def test_every_fast_launch_passes_constexprs_in_signature_order(gen, monkeypatch):
    """The direct path (:func:`tpfuse.kernels.fast_launch.launch`) caches a kernel only when the constexprs it is
    given are exactly the kernel's parameters after the runtime arguments, in order (it passes them
    positionally): a launcher that leaves out a defaulted constexpr silently sends every call through the JIT.
    Checked for each kernel the local ops and the small-M GEMM launch (their interpreter runs on CPU)."""
    from tpfuse.kernels import fast_launch

    calls = []
    real = fast_launch.launch

    def recording(kernel, grid, args, consts, num_warps, num_stages=None, pdl=False):
        calls.append((kernel, args, consts))
        real(kernel, grid, args, consts, num_warps, num_stages, pdl)

    monkeypatch.setattr(fast_launch, "launch", recording)
    g = torch.Generator().manual_seed(3)
    x, r, w = _rand(g, 3, 256), _rand(g, 3, 256), _rand(g, 256)
    for spec in _specs():
        ops.add_rmsnorm(x, r, w, 1e-6, quant=spec)
        ops.silu_mul(_rand(g, 3, 512), quant=spec)
        if spec is not None:
            ops.quantize(x, spec)
    cs, pos = _rope_inputs(g, 3, 8, 2, 128, 64)
    rope.qk_norm_rope(_rand(g, 3, 12 * 128), _rand(g, 128), _rand(g, 128), cs, pos, num_heads=8, num_kv_heads=2,
                      head_dim=128)
    kc, vc = (torch.zeros(8, 16, 2, 128, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    rope.rope_kv_cache_write(_rand(g, 3, 8, 128), _rand(g, 3, 2, 128), _rand(g, 3, 2, 128), pos, cs, kc, vc,
                             torch.arange(3, device=DEVICE))
    _launch_all_small_m(g)
    _launch_attn_o_gemm(g)
    names = {getattr(k, "__name__", None) or k.fn.__name__ for k, _, _ in calls}
    for want in ("_small_m_gemm_kernel", "_small_m_gemm_serial_kernel", "_small_m_gemm_norm_kernel",
                 "_split_k_reduce_kernel", "_split_k_reduce_add_kernel", "_attn_o_gemm_kernel"):
        assert want in names, (want, sorted(names))
    bad = {(getattr(k, "__name__", None) or k.fn.__name__, tuple(set(k.arg_names[len(args):]) ^ set(consts)))
           for k, args, consts in calls if list(consts) != list(k.arg_names[len(args):])}
    assert not bad, sorted(bad)  # (kernel, the constexprs missing or extra)
