"""End-to-end benchmark through the product: ``tpfuse.parallelize(<HF model>)`` at real layer shapes (Llama-3.1-8B,
Llama-3.1-70B, Qwen3-32B; ``--layers`` decoder layers, random bf16 weights, nothing downloaded).

    torchrun --standalone --nproc-per-node=N bench/bench_e2e.py [--models 8B,70B,Qwen3-32B] [--layers 4]
        [--decode-batches 1,8,64] [--context 1024] [--prefill 1024,4096,8192] [--compile-batches 1,64] [--flashinfer]

Providers (every one is the model a user runs, called with Hugging Face arguments):

* ``tpfuse`` - the parallelized model: eager batched prefill, decode steps replayed from its CUDA graphs;
* ``hf_eager`` (TP=1) - the unmodified transformers model with a ``StaticCache`` (decode) / no cache (prefill);
* ``hf_compiled`` (TP=1, decode) - the same with ``torch.compile(model.forward, mode="reduce-overhead")``, HF's
  documented fast path; compiled per batch size in ``--compile-batches`` (each compile costs ~1 min);
* ``tpfuse_nocomm`` (TP > 1) - the parallelized model with its reductions made local (``model._tpfuse.local``):
  the floor that perfect communication would reach (its logits are wrong by design);
* ``vllm_policy`` (TP > 1, ``--flashinfer``) - the parallelized model on a communicator that loads vLLM's sm90
  policy table (``bench/policies/vllm_sm90_tp2.json``);
* ``tpfuse_fp8_static`` - a fresh copy calibrated (static activation scales) and converted with per-tensor weight
  scales, so its GEMMs are per-tensor ``_scaled_mm`` (``--no-fp8`` skips it too);
* ``tpfuse_fp8`` - the same parallelized model converted after its bf16 rows by ``tpfuse.parallel.quantize_fp8``
  (e4m3 weights with per-channel scales; per-token FP8 activations straight out of the fused norm / SiLU-mul
  kernels into ``torch._scaled_mm``). Targets at TP=1: decode batch 1 <= 0.65x and prefill 4k <= 0.7x ``tpfuse``.
  ``--no-fp8`` skips it. The run also records one ``fp8_quality`` row (``bench/fp8_quality.py``: greedy agreement of
  the FP8 tiny model with the bf16 one over 64 steps, logits error vs fp64).

Decode: a batch of ``B`` random prompts of ``--context`` tokens is prefilled, then ``--steps`` decode steps (one
token per sequence) are timed as a user sees them: host wall time between two device syncs over all steps, per step
(so host work, launch gaps and graph replays all count). Prefill: one sequence of ``T`` tokens, last-token logits.
Each decode row also reports the step's memory floor: the bytes it must read (this rank's weights without the
embedding table, plus the KV cache) over the device-to-device copy bandwidth measured in the same run.

Writes ``e2e_tp{N}_{device}.json`` and ``.png`` to ``$OUT`` (or ``bench/results``) after every model.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import tpfuse  # noqa: E402
from tpfuse.parallel import KVCacheConfig  # noqa: E402

POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies", "vllm_sm90_tp2.json")
SHAPES = {
    "8B": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=14336, rope_theta=500000.0)),
    "70B": ("llama", dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                          intermediate_size=28672, rope_theta=500000.0)),
    "Qwen3-32B": ("qwen3", dict(hidden_size=5120, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                                intermediate_size=25600, rope_theta=1000000.0)),
    # families whose layers differ from a row above (Mistral-7B is the 8B row's shape): biased q/k/v, 28 q heads;
    # fused qkv_proj / gate_up_proj, 40 q / 10 kv heads (TP 2; Phi-3's config derives head_dim = 128, and its
    # token ids default past VOCAB). Phi-3-mini's head_dim 96 is not supported by the kernels.
    "Qwen2.5-7B": ("qwen2", dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                 intermediate_size=18944, rope_theta=1000000.0)),
    "Phi-3-medium": ("phi3", dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=10,
                                  intermediate_size=17920, rope_theta=10000.0, pad_token_id=0, eos_token_id=2)),
}
ARCHS = {"llama": "Llama", "qwen3": "Qwen3", "qwen2": "Qwen2", "phi3": "Phi3"}
"""SHAPES' architectures -> the transformers ``<prefix>ForCausalLM`` / ``<prefix>Config`` they build."""
VOCAB = 32000


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = (lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--models", default="8B,70B,Qwen3-32B")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--decode-batches", type=ints, default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024, help="tokens cached per sequence before the timed steps")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--prefill", type=ints, default=[1024, 4096, 8192])
    ap.add_argument("--compile-batches", type=ints, default=[1, 64],
                    help="decode batches for hf_compiled (TP=1; first model only)")
    ap.add_argument("--hf-models", default="8B", help="models that also run the hf_* providers (TP=1)")
    ap.add_argument("--flashinfer", action="store_true", help="add the vllm_policy provider (TP > 1)")
    ap.add_argument("--no-fp8", action="store_true", help="skip the tpfuse_fp8 provider and the fp8_quality row")
    return ap.parse_args(argv)


def build_model(name: str, layers: int, dev):
    """A random-weight transformers model of ``name``'s layer shapes, built on ``dev`` in bf16."""
    import transformers

    arch, shape = SHAPES[name]
    prefix = ARCHS[arch]
    cls, cfg_cls = getattr(transformers, f"{prefix}ForCausalLM"), getattr(transformers, f"{prefix}Config")
    cfg = cfg_cls(vocab_size=VOCAB, num_hidden_layers=layers, max_position_embeddings=32768, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device(dev):
        model = cls(cfg).to(torch.bfloat16).eval()
    return model


def copy_bandwidth(dev) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 20 copies of 1 GiB."""
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    ts = []
    for _ in range(23):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * (1 << 30) / sorted(ts[3:])[len(ts[3:]) // 2]


def decode_bytes(model, batch: int, context: int) -> int:
    """Bytes a decode step must read on this rank: every weight except the embedding table (B rows of it) plus
    the KV cache of ``batch`` sequences of ``context`` tokens."""
    st = model._tpfuse
    emb = model.get_input_embeddings().weight
    w = sum(p.numel() * p.element_size() for p in model.parameters()) - emb.numel() * emb.element_size()
    w += batch * emb.shape[1] * emb.element_size()
    kv = 2 * len(st.layers) * batch * context * st.kv_heads * st.head_dim * 2
    return w + kv


def _wall_per_call(fn, n: int, dev) -> float:
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize(dev)
    return (time.perf_counter() - t0) / n * 1e6


def _cache_kw(model) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def tpfuse_decode_us(model, batch, context, steps, dev) -> float:
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, context), device=dev, generator=g)
    out = model(ids, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    box = {"tok": tok}

    def step():
        box["tok"] = model(box["tok"], cache=cache).logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(3):  # captures the bucket's graph, then warm replays
        step()
    return _wall_per_call(step, steps, dev)


def hf_decode_us(model, batch, context, steps, dev, compiled: bool) -> float:
    import transformers

    kw = _cache_kw(model)
    cache = transformers.StaticCache(config=model.config, max_cache_len=context + steps + 16)
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, context), device=dev, generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) if compiled else model.forward
    box = {"tok": out.logits[:, -1].argmax(-1, keepdim=True), "pos": context}

    def step():
        pos = torch.full((batch, 1), box["pos"], dtype=torch.long, device=dev)
        with torch.no_grad():
            o = fwd(input_ids=box["tok"], position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
        box["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)
        box["pos"] += 1

    for _ in range(3):
        step()
    return _wall_per_call(step, steps, dev)


def prefill_us(model, t, dev) -> float:
    ids = torch.randint(0, VOCAB, (1, t), device=dev)

    def call():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    call()
    return _wall_per_call(call, 5 if t >= 4096 else 10, dev)


def _measure(rows, base, provider, fn, dev, after=None):
    """Run one timing; an exception becomes a NaN row with the error text (the run goes on). ``after()`` returns
    fields recorded once the timing ran (the mode and paths of the last call)."""
    try:
        us, err = fn(), None
    except Exception as ex:  # noqa: BLE001 - recorded in the row
        us, err = float("nan"), f"{type(ex).__name__}: {ex}"[:300]
        torch.cuda.synchronize(dev)
    row = dict(base, provider=provider, us=common.slowest_rank(us, dev), **(after() if after else {}))
    if err:
        row["error"] = err
    rows.append(row)
    return row


def hf_rows(name, model, args, dev, rows, compile_batches):
    """The unmodified HF model (TP=1): eager decode / prefill, and compiled decode for ``compile_batches``."""
    for b in args.decode_batches:
        base = dict(model=name, mode="decode", tokens=b, context=args.context, layers=args.layers)
        _measure(rows, base, "hf_eager", lambda: hf_decode_us(model, b, args.context, args.steps, dev, False), dev)
        if b in compile_batches:
            _measure(rows, base, "hf_compiled", lambda: hf_decode_us(model, b, args.context, args.steps, dev, True),
                     dev)
            torch._dynamo.reset()
    for t in args.prefill:
        base = dict(model=name, mode="prefill", tokens=t, layers=args.layers)
        _measure(rows, base, "hf_eager", lambda: prefill_us(model, t, dev), dev)


def tpfuse_rows(name, model, comm, args, dev, rows, bandwidth, provider="tpfuse"):
    st = model._tpfuse
    for b in args.decode_batches:
        base = dict(model=name, mode="decode", tokens=b, context=args.context, layers=args.layers)
        comm.last_path.clear()
        r = _measure(rows, base, provider, lambda: tpfuse_decode_us(model, b, args.context, args.steps, dev), dev,
                     lambda: dict(last_mode=st.last_mode, paths=dict(comm.last_path)))
        if provider == "tpfuse":
            nbytes = decode_bytes(model, b, args.context)
            rows.append(dict(base, provider="memory_floor", us=nbytes / bandwidth * 1e6, bytes=nbytes))
            _print(r, rows)
    for t in args.prefill:
        base = dict(model=name, mode="prefill", tokens=t, layers=args.layers)
        comm.last_path.clear()
        r = _measure(rows, base, provider, lambda: prefill_us(model, t, dev), dev,
                     lambda: dict(last_mode=st.last_mode, paths=dict(comm.last_path)))
        _print(r, rows)


def _print(r, rows):
    if dist.get_rank() != 0:
        return
    same = [x for x in rows if all(x.get(k) == r.get(k) for k in ("model", "mode", "tokens"))]
    cells = "  ".join(f"{x['provider']}={x['us']:.0f}" for x in same)
    print(f"[{r['model']} {r['mode']} {'batch' if r['mode'] == 'decode' else 'tokens'}={r['tokens']}] us: {cells}"
          f"  ({r.get('last_mode')}){'  ERROR ' + r['error'] if 'error' in r else ''}", flush=True)


def _comm(args, hidden, config=None):
    max_tokens = max(max(args.prefill), max(args.decode_batches) * args.context)
    return tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=hidden, dtype=torch.bfloat16, config=config)


def run_model(name, args, dev, rows, bandwidth, first: bool):
    tp = dist.get_world_size()
    model = build_model(name, args.layers, dev)
    if tp == 1 and name in args.hf_models.split(","):
        hf_rows(name, model, args, dev, rows, args.compile_batches if first else [])
    comm = _comm(args, model.config.hidden_size)
    cache = KVCacheConfig(max_batch=max(args.decode_batches), max_seq_len=args.context + args.steps + 16)
    model = tpfuse.parallelize(model, comm, cache=cache)
    if dist.get_rank() == 0:
        print(f"{name}: {model._tpfuse.cache_storage().describe()}", flush=True)
    tpfuse_rows(name, model, comm, args, dev, rows, bandwidth)
    if tp > 1:
        model._tpfuse.local = True  # the no-communication floor (wrong logits by design)
        tpfuse_rows(name, model, comm, args, dev, rows, bandwidth, provider="tpfuse_nocomm")
        model._tpfuse.local = False
        if args.flashinfer:
            policy = _comm(args, model.config.hidden_size, tpfuse.CommConfig(thresholds_path=POLICY))
            model._tpfuse.comm = policy
            tpfuse_rows(name, model, policy, args, dev, rows, bandwidth, provider="vllm_policy")
            model._tpfuse.comm = comm
            policy.close()  # collective: frees FlashInfer's IPC buffers
    if not args.no_fp8:
        from tpfuse.parallel import quantize_fp8

        quantize_fp8(model)  # in place, after the bf16 rows: the same weights, e4m3 per-channel
        tpfuse_rows(name, model, comm, args, dev, rows, bandwidth, provider="tpfuse_fp8")
        del model
        fp8_static_rows(name, args, dev, rows, bandwidth, comm, cache)
    comm.close()
    torch.cuda.empty_cache()


def fp8_static_rows(name, args, dev, rows, bandwidth, comm, cache):
    """``tpfuse_fp8_static``: per-tensor weight scales and static activation scales calibrated on the unsharded
    model (64 random tokens), so every GEMM is a per-tensor ``_scaled_mm`` (cuBLASLt) instead of a row-wise one."""
    from tpfuse.parallel import calibrate_input_scales, quantize_fp8

    model = build_model(name, args.layers, dev)
    ids = torch.randint(0, VOCAB, (1, 64), device=dev, generator=torch.Generator(device=dev).manual_seed(3))
    scales = calibrate_input_scales(model, ids)
    model = tpfuse.parallelize(model, comm, cache=cache)
    quantize_fp8(model, activation="static", weight="per_tensor", input_scales=scales)
    tpfuse_rows(name, model, comm, args, dev, rows, bandwidth, provider="tpfuse_fp8_static")


def main(argv=None):
    args = parse_args(argv)
    with common.rank_context() as ranks:
        dev = ranks.device
        bandwidth = copy_bandwidth(dev)
        if ranks.rank == 0:
            print(f"device-to-device copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)
        rows = []
        if not args.no_fp8:
            from fp8_quality import fp8_quality

            q = fp8_quality(ranks.world, dev)
            rows.append(dict(model="tiny", mode="fp8_quality", tokens=q["steps"], provider="tpfuse_fp8",
                             us=float("nan"), **q))
            if ranks.rank == 0:
                print(f"fp8 quality (tiny model): {q}", flush=True)
        for i, name in enumerate(args.models.split(",")):
            run_model(name, args, dev, rows, bandwidth, first=i == 0)
            if ranks.rank == 0:  # after every model: a run cut off later keeps the finished models' rows
                _write(rows, args, bandwidth)


def _write(rows, args, bandwidth):
    tp = dist.get_world_size()
    hdr = common.header("e2e", tp=tp, layers=args.layers, context=args.context, steps=args.steps,
                        copy_bandwidth_tb_s=round(bandwidth / 1e12, 3), timing="host wall time per call between "
                        "device syncs (decode: per step over --steps steps)")
    path = common.write_json(common.result_path("e2e", tp=tp), hdr, rows)
    common.plot_ratio_panels(path.replace(".json", ".png"), [r for r in rows if r["us"] == r["us"]],
                             panel=("model", "mode"), x="tokens", y="us", baseline="tpfuse",
                             ylabel="time / tpfuse (above 1: tpfuse faster)",
                             xlabel=lambda key: "batch (context %d)" % args.context if key[1] == "decode"
                             else "prefill tokens",
                             title=f"E2E through tpfuse.parallelize, TP={tp}, {args.layers} layers, {hdr['device']}, "
                                   f"{hdr['commit'][:10]}")
    print("wrote", path, flush=True)


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
