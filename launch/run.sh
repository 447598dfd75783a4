#!/usr/bin/env bash
# Run a tpfuse entry point (a module or a script) on N ranks through torchrun.
#
#   launch/run.sh [-n NPROC] [-m] TARGET [ARGS...]                       # one node, NPROC local ranks
#   launch/run.sh -n 8 --one-gpu -m TARGET [ARGS...]                       # TP=8 as 8 processes on one GPU
#   launch/run.sh -n 8 --nnodes 2 --node-rank R --rdzv HOST:PORT -m TARGET [ARGS...]   # several nodes
#
# TARGET is a module with -m (e.g. `-m tpfuse.demo`) or a script path. NPROC defaults to the number of GPUs, or 2
# on a machine without GPUs. Inside, tpfuse.init_distributed() picks NCCL when every local rank has its own GPU and
# gloo otherwise, and binds each rank to the GPU of its LOCAL_RANK. --one-gpu (TPFUSE_ONE_GPU=1): the ranks share the
# machine's GPU(s) over gloo with tpfuse's kernels on CUDA, to try a TP=N setup on one GPU (correctness, not speed;
# tpfuse.distributed explains). Multi-node: run the same command on every node
# with its own --node-rank; HOST:PORT is a reachable address of node 0 (c10d rendezvous). Extra torchrun options
# can be passed in $TORCHRUN_ARGS.
set -euo pipefail
nproc="" nnodes=1 node_rank=0 rdzv="" module=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--nproc) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --rdzv) rdzv="$2"; shift 2 ;;
    -m) module=(-m); shift ;;
    --one-gpu) export TPFUSE_ONE_GPU=1; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { echo "launch/run.sh: missing TARGET (see --help)" >&2; exit 2; }
if [[ -z "$nproc" ]]; then
  nproc=$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
export PYTHONUNBUFFERED=1
if [[ "$nnodes" == 1 ]]; then
  where=(--standalone)
else
  [[ -n "$rdzv" ]] || { echo "launch/run.sh: --nnodes > 1 needs --rdzv HOST:PORT" >&2; exit 2; }
  where=(--nnodes="$nnodes" --node-rank="$node_rank" --rdzv-backend=c10d --rdzv-endpoint="$rdzv" --rdzv-id=tpfuse)
fi
# shellcheck disable=SC2086
exec python3 -m torch.distributed.run "${where[@]}" --nproc-per-node="$nproc" ${TORCHRUN_ARGS:-} "${module[@]}" "$@"
