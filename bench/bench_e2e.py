"""End-to-end benchmark: Llama-3.1-8B / 70B-shaped TP decoder stacks (a few layers, random weights), bf16.

    torchrun --standalone --nproc_per_node=2 bench/bench_e2e.py [--quick] [--layers 4] [--flashinfer]

Decode: batch B of single-token sequences attending to a KV cache of 1024 tokens each. Prefill: one causal
sequence of T tokens. Every provider runs the same GEMMs, attention and SiLU·mul; they differ only in how the
row-parallel outputs are combined with the residual stream:

* ``nocomm``  - the floor: collectives removed (partial sums used as if reduced; local add + RMSNorm);
* ``unfused`` - NCCL all-reduce + torch eager add + RMSNorm (a gpt-fast-style TP transform);
* ``nccl_fused_norm`` - NCCL all-reduce + tpfuse's local fused add+RMSNorm;
* ``tpfuse_ar`` / ``tpfuse_sp`` (prefill only) - the communicator forced into one form, to place the switch;
* ``tpfuse``  - the communicator: ``fused_add_rmsnorm`` in the all-reduce form, and above the SP threshold the
  sequence-parallel form (``all_gather_matmul`` -> attention/MLP -> ``matmul_reduce_scatter_rmsnorm``), with
  whatever paths ``plan()`` picks on this machine;
* ``vllm_policy`` (with ``--flashinfer``, when FlashInfer's paths can run here) - vLLM's sm90 TP=2 policy for the
  same step, as data: a communicator loading ``bench/policies/vllm_sm90_tp2.json`` (FlashInfer's fused kernel up to
  64 MiB of activation, one-shot up to 32 MiB, two-shot above; NCCL all-reduce + tpfuse's fused add+RMSNorm beyond;
  always the all-reduce form). Skipped where that table has no row for this arch / TP.

Rows of the communicator providers record ``plan_mode`` and ``paths`` (the path each op last ran).

CUDA graphs (one step captured, median of replays); reported per layer and per step. Writes
``bench/results/e2e_tp{TP}_{device}.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import tpfuse  # noqa: E402
from tpfuse import ops  # noqa: E402
from tpfuse.sharding import shard_range  # noqa: E402

POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies", "vllm_sm90_tp2.json")
COMM_PROVIDERS = ("tpfuse", "vllm_policy")  # the step goes through a TPCommunicator's fused_add_rmsnorm
SHAPES = {"8B": dict(h=4096, heads=32, kv=8, d=128, inter=14336), "70B": dict(h=8192, heads=64, kv=8, d=128,
                                                                              inter=28672)}


def _eager_add_rmsnorm(x, residual, w, eps):
    s = x + residual if residual is not None else x
    sf = s.float()
    return (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype), s


class Stack:
    """``layers`` decoder layers of one TP rank (random weights; shapes of the named model)."""

    def __init__(self, shape, layers, tp, rank, dev, gen):
        self.__dict__.update(shape)
        self.tp, self.rank, self.layers = tp, rank, layers
        self.hq, self.hk, self.i_s = self.heads // tp, max(1, self.kv // tp), self.inter // tp
        d, h = self.d, self.h

        def rnd(*s):
            return torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=gen) / s[-1] ** 0.5

        self.w = [dict(qkv=rnd((self.hq + 2 * self.hk) * d, h), o=rnd(h, self.hq * d), gu=rnd(2 * self.i_s, h),
                       down=rnd(h, self.i_s), n1=1 + 0.1 * rnd(h), n2=1 + 0.1 * rnd(h)) for _ in range(layers)]
        self.final = 1 + 0.1 * rnd(h)

    def attention(self, qkv, mode, cache):
        t, d = qkv.shape[0], self.d
        q, k, v = qkv.split([self.hq * d, self.hk * d, self.hk * d], dim=-1)
        if mode == "decode":  # t sequences of one new token each; cache [t, hk, L + 1, d], new token in slot L
            kc, vc = cache
            kc[:, :, -1].copy_(k.view(t, self.hk, d))
            vc[:, :, -1].copy_(v.view(t, self.hk, d))
            o = F.scaled_dot_product_attention(q.view(t, self.hq, 1, d), kc, vc, enable_gqa=True)
            return o.reshape(t, self.hq * d)
        # [1, heads, T, d]: 4-D inputs keep SDPA on its flash kernel
        q = q.view(1, t, self.hq, d).transpose(1, 2)
        k = k.view(1, t, self.hk, d).transpose(1, 2)
        v = v.view(1, t, self.hk, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(t, self.hq * d)

    def forward(self, provider, comm, h_in, mode, caches, eps=1e-5):
        t = h_in.shape[0]
        sp = provider == "tpfuse" and comm.plan(t).mode == "sequence_parallel"
        if sp:
            s, e = shard_range(t, self.tp, self.rank)
            x, residual = ops.add_rmsnorm(h_in[s:e].contiguous(), None, self.w[0]["n1"], eps)
        else:
            x, residual = ops.add_rmsnorm(h_in, None, self.w[0]["n1"], eps)

        def combine(partial, residual, w):
            if provider == "nocomm":
                return ops.add_rmsnorm(partial, residual, w, eps)
            if provider in COMM_PROVIDERS:
                return comm.fused_add_rmsnorm(partial, residual, w, eps)
            dist.all_reduce(partial)
            if provider == "unfused":
                return _eager_add_rmsnorm(partial, residual, w, eps)
            return ops.add_rmsnorm(partial, residual, w, eps)

        for li, w in enumerate(self.w):
            nxt = self.w[li + 1]["n1"] if li + 1 < self.layers else self.final
            if sp:
                qkv = comm.all_gather_matmul(x, w["qkv"], num_tokens=t)
                x, residual = comm.matmul_reduce_scatter_rmsnorm(self.attention(qkv, mode, caches[li]), w["o"],
                                                                 residual, w["n2"], eps)
                gu = comm.all_gather_matmul(x, w["gu"], num_tokens=t)
                x, residual = comm.matmul_reduce_scatter_rmsnorm(ops.silu_mul(gu), w["down"], residual, nxt, eps)
            else:
                a = self.attention(x @ w["qkv"].t(), mode, caches[li]) @ w["o"].t()
                x, residual = combine(a, residual, w["n2"])
                m = ops.silu_mul(x @ w["gu"].t()) @ w["down"].t()
                x, residual = combine(m, residual, nxt)
        return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--models", default="8B,70B")
    ap.add_argument("--kv-len", type=int, default=1024)
    ap.add_argument("--flashinfer", action="store_true",
                    help="add the vllm_policy provider (FlashInfer's fused kernel; JIT ~100 s on a fresh machine)")
    args = ap.parse_args()
    tpfuse.init_distributed()
    rank, tp = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    decode = [1, 64] if args.quick else [1, 8, 32, 64, 256]
    prefill = [1024, 4096] if args.quick else [1024, 4096, 8192, 16384]
    providers = ["nocomm", "unfused", "nccl_fused_norm", "tpfuse"]
    if args.flashinfer and rank == 0 and not _flashinfer_importable():
        print("vllm_policy: flashinfer is not importable here; provider skipped", flush=True)
    # prefill also runs tpfuse forced into each form, so the AR -> SP switch can be placed from data
    forced = {"tpfuse_ar": tpfuse.CommConfig(sp_min_tokens=1 << 30), "tpfuse_sp": tpfuse.CommConfig(sp_min_tokens=1)}
    rows = []
    for model in args.models.split(","):
        shape = SHAPES[model]
        gen = torch.Generator(device=dev).manual_seed(7 + rank)
        stack = Stack(shape, args.layers, tp, rank, dev, gen)
        comm = tpfuse.TPCommunicator(max_tokens=max(prefill + decode), hidden_size=shape["h"], dtype=torch.bfloat16)
        forced_comms = {k: tpfuse.TPCommunicator(max_tokens=max(prefill), hidden_size=shape["h"], dtype=torch.bfloat16,
                                                 config=cfg) for k, cfg in forced.items()}
        policy_comm = _policy_comm(max(prefill + decode), shape["h"], rank) if args.flashinfer else None
        model_providers = providers + (["vllm_policy"] if policy_comm is not None else [])
        for mode, sizes in (("decode", decode), ("prefill", prefill)):
            for t in sizes:
                h_in = torch.randn(t, shape["h"], device=dev, dtype=torch.bfloat16, generator=gen)
                caches = [None] * args.layers
                if mode == "decode":
                    caches = [tuple(torch.randn(t, stack.hk, args.kv_len + 1, stack.d, device=dev,
                                                dtype=torch.bfloat16, generator=gen) for _ in range(2))
                              for _ in range(args.layers)]
                res = {}
                for prov in model_providers + (list(forced) if mode == "prefill" else []):
                    c = policy_comm if prov == "vllm_policy" else forced_comms.get(prov, comm)
                    c.last_path.clear()
                    kind = "tpfuse" if prov in forced else prov
                    try:
                        us, timing = common.time_us(lambda: stack.forward(kind, c, h_in, mode, caches),
                                                    calls=1, replays=10 if t < 8192 else 5)
                    except Exception as ex:
                        us, timing = float("nan"), f"error: {type(ex).__name__}: {ex}"[:200]
                        torch.cuda.synchronize()
                    us_t = torch.tensor([us], dtype=torch.float64, device=dev)
                    dist.all_reduce(us_t, op=dist.ReduceOp.MAX)
                    res[prov] = float(us_t.item())
                    rows.append({"model": model, "mode": mode, "tokens": t, "layers": args.layers, "provider": prov,
                                 "us_per_step": res[prov], "us_per_layer": res[prov] / args.layers,
                                 "timing": timing, "plan_mode": c.plan(t).mode if kind in COMM_PROVIDERS else None,
                                 "paths": dict(c.last_path) if kind in COMM_PROVIDERS else None})
                if rank == 0:
                    cells = "  ".join(f"{p}={v:.0f}" for p, v in res.items())
                    vp = (f" tpfuse/vllm_policy={res['tpfuse'] / res['vllm_policy']:.3f} "
                          f"(vllm_policy ran {policy_comm.last_path.get('fused_add_rmsnorm')})"
                          if "vllm_policy" in res else "")
                    print(f"[{model} {mode} {t}] us/step ({args.layers} layers): {cells}  "
                          f"tpfuse/nocomm={res['tpfuse'] / res['nocomm']:.3f} "
                          f"tpfuse/unfused={res['tpfuse'] / res['unfused']:.3f}{vp} (plan: {comm.plan(t).mode})",
                          flush=True)
        comm.close()
        for c in forced_comms.values():
            c.close()
        if policy_comm is not None:
            policy_comm.close()  # collective: frees FlashInfer's IPC buffers
        del stack
        torch.cuda.empty_cache()
        if rank == 0:  # after every model: a run cut off later still leaves the finished models' rows
            _write(rows, tp, args)
    dist.barrier()
    dist.destroy_process_group()


def _write(rows, tp, args):
    hdr = common.header("e2e", tp=tp, layers=args.layers, kv_len=args.kv_len,
                        **({"vllm_policy": "bench/policies/vllm_sm90_tp2.json"}
                           if any(r["provider"] == "vllm_policy" for r in rows) else {}))
    path = os.path.join(os.environ.get("OUT") or common.RESULTS, f"e2e_tp{tp}_{common.device_slug()}.json")
    common.write_json(path, hdr, rows)
    _plot(path.replace(".json", ".png"), rows, hdr)
    print("wrote", path, flush=True)


def _flashinfer_importable() -> bool:
    from tpfuse.backends import flashinfer as fi

    return fi._installed_reason() is None and fi._import_reason() is None


def _policy_comm(max_tokens, hidden, rank):
    """The vllm_policy communicator, or None (reason printed) where its FlashInfer paths cannot run or the policy
    table has no row for this machine. Collective: every rank decides alike."""
    from tpfuse import dispatch

    ok = torch.tensor([1 if _flashinfer_importable() else 0], device=torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank builds it, or none
    if not ok.item():
        return None
    c = tpfuse.TPCommunicator(max_tokens=max_tokens, hidden_size=hidden, dtype=torch.bfloat16,
                              config=tpfuse.CommConfig(thresholds_path=POLICY))
    why = None
    if c.row.arch == "*":
        why = f"{os.path.basename(POLICY)} has no row for arch {c.arch} TP={c.tp} (only vLLM's sm90 TP=2 policy)"
    else:
        why = dispatch.unavailable_reason("fused_add_rmsnorm", "flashinfer_oneshot", c)
    if why:
        if rank == 0:
            print(f"vllm_policy (hidden {hidden}) skipped: {why}", flush=True)
        c.close()
        return None
    if rank == 0:
        print(f"vllm_policy (hidden {hidden}): {c.table.path} row [{c.row.key()}], FlashInfer workspace "
              f"{c.flashinfer.rows} rows", flush=True)
    return c


def _plot(path, rows, hdr):
    return common.plot_ratio_panels(path, rows, panel=("model", "mode"), x="tokens", y="us_per_step",
                                    baseline="nocomm", ylabel="time / no-comm floor",
                                    xlabel=lambda key: "batch" if key[1] == "decode" else "tokens",
                                    title=f"E2E TP={hdr['tp']} {hdr['layers']} layers, {hdr['device']}, "
                                          f"{hdr['commit'][:10]}")


if __name__ == "__main__":
    main()
    from tpfuse.distributed import exit_rank

    exit_rank(0)  # no interpreter finalization: gloo's exit race (see tpfuse/distributed.py)
